"""Evaluation: multiple-choice accuracy by answer log-likelihood; GSM8K exact match.

Multiple choice follows lm-evaluation-harness: each choice is scored by the summed log-probability of
its continuation tokens given the context; ``acc`` takes the argmax of that sum, ``acc_norm`` the
argmax of the sum divided by the continuation's length in bytes. All (question, choice) requests of a
task are sorted by length and batched together, left-padded so every continuation ends the row.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedkt import progress
from fedkt.data.collate import encode_pair
from fedkt.data.prompts import context, continuation
from fedkt.data.tasks import Example, final_number


@torch.no_grad()
def loglikelihoods(model, tok, requests: Sequence[tuple[str, str]], batch_size: int = 32,
                   max_length: int = 1024, desc: str = "score") -> list[float]:
    """Summed log p(continuation | context) for each (context, continuation) pair."""
    encoded = []
    for ctx, cont in requests:
        c, k = encode_pair(tok, ctx, cont)
        full = (c + k)[-(max_length + 1):]
        encoded.append((full[:-1], k))  # inputs; the last len(k) logits predict the continuation
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out = [0.0] * len(encoded)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with progress.bar(desc, len(order)) as pb:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i][0]) for i in idx)
            keep = max(len(encoded[i][1]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            targets = torch.full((len(idx), keep), 0, dtype=torch.long)
            tmask = torch.zeros((len(idx), keep), dtype=torch.bool)
            for r, i in enumerate(idx):
                inp, cont = encoded[i]
                ids[r, width - len(inp):] = torch.tensor(inp)
                mask[r, width - len(inp):] = 1
                targets[r, keep - len(cont):] = torch.tensor(cont)
                tmask[r, keep - len(cont):] = True
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            sums = (logp * tmask).sum(-1)
            for r, i in enumerate(idx):
                out[i] = sums[r].item()
            pb.advance(len(idx))
    return out


def score_multiple_choice(model, tok, examples: Sequence[Example], batch_size: int = 32,
                          desc: str = "eval") -> dict[str, float]:
    requests, owners = [], []
    for qi, ex in enumerate(examples):
        if not ex.is_mc:
            raise ValueError(f"example {ex.id} of task {ex.task} is not multiple choice")
        for choice in ex.choices:
            requests.append((context(ex), continuation(choice)))
            owners.append(qi)
    lls = loglikelihoods(model, tok, requests, batch_size=batch_size, desc=desc)
    per_q: list[list[tuple[float, int]]] = [[] for _ in examples]
    for (ctx, cont), q, ll in zip(requests, owners, lls):
        per_q[q].append((ll, len(cont.encode("utf-8"))))
    acc = acc_norm = 0
    for ex, scores in zip(examples, per_q):
        best = max(range(len(scores)), key=lambda j: scores[j][0])
        best_norm = max(range(len(scores)), key=lambda j: scores[j][0] / scores[j][1])
        acc += best == ex.answer
        acc_norm += best_norm == ex.answer
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def score_generation(model, tok, examples: Sequence[Example], batch_size: int = 16,
                     max_new_tokens: int = 256, desc: str = "eval") -> dict[str, float]:
    """GSM8K-style exact match of the final number of a greedy generation."""
    from fedkt.generate import generate

    outputs = generate(model, tok, [context(ex) for ex in examples], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, desc=desc, stop=["\nQuestion:", "\n\n\n"])
    correct = sum(final_number(o) == ex.label for o, ex in zip(outputs, examples))
    n = len(examples)
    return {"acc": correct / n, "exact_match": correct / n, "n": n}


def evaluate(model, tok, examples: Sequence[Example], batch_size: int = 32, max_new_tokens: int = 256,
             desc: str = "eval") -> dict[str, float]:
    if examples and examples[0].is_mc:
        r = score_multiple_choice(model, tok, examples, batch_size, desc)
    else:
        r = score_generation(model, tok, examples, max(1, batch_size // 2), max_new_tokens, desc)
    return r
