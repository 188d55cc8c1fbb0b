"""Batched greedy generation (left-padded), with stop strings."""

from __future__ import annotations

from typing import Sequence

import torch

from fedkt import progress


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 128, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             stop: Sequence[str] = (), desc: str = "generate") -> list[str]:
    """Continue each prompt; returns only the new text, cut at the first stop string."""
    old_side = tok.padding_side
    tok.padding_side = "left"
    outs: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    try:
        with progress.bar(desc, len(prompts)) as pb:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, do_sample=do_sample)
                if do_sample:
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                    kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
                else:
                    kwargs.update(temperature=None, top_p=None, top_k=None)
                out = model.generate(**enc, **kwargs)
                new = out[:, enc["input_ids"].shape[1]:]
                for text in tok.batch_decode(new, skip_special_tokens=True):
                    for s in stop:
                        if s in text:
                            text = text[: text.index(s)]
                    outs.append(text)
                pb.advance(len(chunk))
    finally:
        tok.padding_side = old_side
    return outs
