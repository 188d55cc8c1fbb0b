"""Tokenisation and batching for training (answer-only labels) and scoring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE = -100


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as lm-evaluation-harness splits them: the continuation is
    what encoding ``context + continuation`` adds after the encoding of ``context``."""
    whole = encode(tok, context + continuation)
    ctx = encode(tok, context)
    if whole[: len(ctx)] != ctx:  # the join merged tokens across the boundary; fall back to separate
        return ctx, encode(tok, continuation)
    return ctx, whole[len(ctx):]


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]


def make_sft_example(tok, prompt: str, answer: str, max_length: int, add_eos: bool = True) -> SFTExample:
    """Prompt tokens are masked out of the loss; the answer (plus EOS) is supervised. Over-long
    prompts are cut from the left so the answer always survives."""
    ctx, ans = encode_pair(tok, prompt, answer)
    if add_eos and tok.eos_token_id is not None:
        ans = ans + [tok.eos_token_id]
    ans = ans[:max_length - 1] if len(ans) >= max_length else ans
    ctx = ctx[-(max_length - len(ans)):] if len(ctx) + len(ans) > max_length else ctx
    return SFTExample(ctx + ans, [IGNORE] * len(ctx) + ans)


def collate_sft(batch: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels."""
    width = max(len(b.input_ids) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b.input_ids)
        ids[i, :n] = torch.tensor(b.input_ids)
        labels[i, :n] = torch.tensor(b.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
