"""Evaluation: multiple-choice accuracy by answer log-likelihood; GSM8K exact match.

Multiple choice follows lm-evaluation-harness: each choice is scored by the summed log-probability of
its continuation tokens given the context; ``acc`` takes the argmax of that sum, ``acc_norm`` the
argmax of the sum divided by the continuation's length in bytes. The context of a question runs once and
its KV cache is shared by all its choices; questions are sorted by length and batched.
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
                   max_length: int = 1024, desc: str = "score", share_context: bool = True) -> list[float]:
    """Summed log p(continuation | context) for each (context, continuation) pair.

    Requests that share a context (the choices of one question) share its forward pass: the contexts of
    a batch run once, left-padded, and their KV cache is fanned out to every continuation, which then
    runs on top of it. ``batch_size`` bounds the continuation rows per batch. ``share_context=False``
    runs every request on its own copy of the context (same scores, more compute).
    """
    groups: dict[tuple, tuple[list[int], list[tuple[int, list[int]]]]] = {}
    for i, (ctx, cont) in enumerate(requests):
        c, k = encode_pair(tok, ctx, cont)
        if not k:
            raise ValueError(f"empty continuation for request {i}: {cont!r}")
        c = c[-max(1, max_length - len(k)):] if len(c) + len(k) > max_length else c
        key = tuple(c) if share_context else (i, *c)
        groups.setdefault(key, (c, []))[1].append((i, k))
    ordered = sorted(groups.values(), key=lambda g: len(g[0]), reverse=True)
    out = [0.0] * len(requests)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with progress.bar(desc, len(requests)) as pb:
        start = 0
        while start < len(ordered):
            chunk, rows = [], 0
            while start < len(ordered) and (not chunk or rows + len(ordered[start][1]) <= batch_size):
                chunk.append(ordered[start])
                rows += len(ordered[start][1])
                start += 1
            _score_chunk(model, chunk, pad, out)
            pb.advance(rows)
    return out


def _score_chunk(model, chunk, pad: int, out: list[float]) -> None:
    """Score one batch: ``chunk`` is a list of (context tokens, [(request index, continuation tokens)])."""
    width = max(len(c) for c, _ in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for r, (c, _) in enumerate(chunk):
        ids[r, width - len(c):] = torch.tensor(c)
        mask[r, width - len(c):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    first = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first_logp = torch.log_softmax(first.logits[:, -1].float(), dim=-1)  # predicts each continuation's 1st token
    owners, members = [], []
    for r, (_, group) in enumerate(chunk):
        for i, k in group:
            owners.append(r)
            members.append((i, k))
    owner_idx = torch.tensor(owners)
    cache = first.past_key_values
    cache.reorder_cache(owner_idx)
    lmax = max(len(k) for _, k in members)
    cont = torch.full((len(members), lmax), pad, dtype=torch.long)
    cmask = torch.zeros((len(members), lmax), dtype=torch.long)
    for r, (_, k) in enumerate(members):
        cont[r, :len(k)] = torch.tensor(k)
        cmask[r, :len(k)] = 1
    full_mask = torch.cat([mask[owner_idx], cmask], dim=1)
    cpos = mask.sum(-1)[owner_idx].unsqueeze(1) + torch.arange(lmax).unsqueeze(0)
    scores = first_logp[owner_idx].gather(-1, cont[:, :1]).squeeze(-1)
    if lmax > 1:
        rest = model(input_ids=cont[:, :-1], attention_mask=full_mask[:, :-1], position_ids=cpos[:, :-1],
                     past_key_values=cache, use_cache=True).logits
        logp = torch.log_softmax(rest.float(), dim=-1).gather(-1, cont[:, 1:].unsqueeze(-1)).squeeze(-1)
        scores = scores + (logp * cmask[:, 1:]).sum(-1)
    for r, (i, _) in enumerate(members):
        out[i] = scores[r].item()


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


def evaluate_tasks(model, tok, eval_sets: dict[str, Sequence[Example]], batch_size: int = 32,
                   max_new_tokens: int = 256, desc: str = "eval") -> dict[str, dict[str, float]]:
    """``evaluate`` on every task of ``eval_sets`` ({task: examples}) -> {task: metrics}."""
    return {t: evaluate(model, tok, exs, batch_size, max_new_tokens, desc=f"{desc} {t}")
            for t, exs in eval_sets.items()}


def evaluate_model(spec: str, tasks: Sequence[str], adapter=None, split: str = "test", data_dir: str = "",
                   limit: int = 0, batch_size: int = 32, seed: int = 0, dtype: str = "float32"
                   ) -> dict[str, dict[str, float]]:
    """Load model ``spec`` (plus a peft ``adapter`` directory) and score it on ``tasks``' ``split``, each a
    seeded subsample of ``limit`` questions (0 = all): what ``fedkt eval`` runs."""
    from fedkt.config import TASKS, ConfigError
    from fedkt.data.partition import subsample
    from fedkt.data.tasks import load_task
    from fedkt.models import load_model
    from fedkt.seeds import derive_seed

    for t in tasks:
        if t not in TASKS:
            raise ConfigError(f"--tasks: {t!r} is not a task; allowed values: {', '.join(TASKS)}")
    model, tok = load_model(spec, dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    sets = {t: subsample(load_task(t, split, data_dir), limit, derive_seed(seed, "eval", t)) for t in tasks}
    return {t: evaluate(model, tok, exs, batch_size, desc=f"eval {t}") for t, exs in sets.items()}
