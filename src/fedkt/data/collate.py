"""Tokenisation and batching for training (answer-only labels) and scoring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE = -100


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split exactly as lm-evaluation-harness's ``_encode_pair``."""
    return encode_pairs(tok, [(context, continuation)])[0]


def encode_pairs(tok, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of (context, continuation) pairs as lm-evaluation-harness 0.4.13 splits them
    (``TemplateLM._encode_pair``): trailing whitespace of the context moves to the front of the
    continuation; the context's ids are ``encode(context)`` and the continuation's are what follows them
    in ``encode(context + continuation)``. When the join merges tokens across the boundary (never for a
    continuation that starts with a space under a GPT-2-style pre-tokenizer) this is the harness's
    split all the same, so scores stay identical to its. Each distinct context is encoded once and all
    strings go through the tokenizer in one batched call."""
    ctxs, wholes = [], []
    for context, continuation in pairs:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctxs.append(context)
        wholes.append(context + continuation)
    unique = list(dict.fromkeys(ctxs))
    enc = tok(unique + wholes, add_special_tokens=False)["input_ids"] if pairs else []
    by_ctx = dict(zip(unique, enc[:len(unique)]))
    out = []
    for c, whole in zip(ctxs, enc[len(unique):]):
        ids = by_ctx[c]
        out.append((list(ids), whole[len(ids):]))
    return out


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
