"""Evaluation: multiple-choice accuracy by answer log-likelihood, identical to lm-evaluation-harness;
GSM8K exact match.

Multiple choice reproduces lm-evaluation-harness 0.4.13's ``multiple_choice`` tasks:

* prompt, choices and target delimiter per task (:mod:`fedkt.data.prompts`, chosen by ``Example.task``);
  the request of a choice is ``(context, " " + choice)``;
* tokenisation as the harness's ``_encode_pair`` (:func:`fedkt.data.collate.encode_pairs`): trailing
  context whitespace moves to the continuation, the continuation's ids are what ``encode(context +
  continuation)`` adds after ``encode(context)``; no BOS; an empty context becomes the BOS (else EOS)
  token, as the harness's ``prefix_token_id``;
* the score of a choice is the summed log-probability of its continuation tokens; ``acc`` takes the
  argmax of the scores, ``acc_norm`` the argmax of score / ``len(choice)`` -- the *character* length of
  the choice string, without the delimiter (``completion_len`` in the harness's ``process_results``);
  ties go to the first choice (``np.argmax``).

Speed (the harness runs every (context, choice) row in full and takes a log-softmax over every position):
the context of a question runs once with ``logits_to_keep=1`` and its KV cache is fanned out to all its
choices, which then run on top of it; only continuation positions reach the LM head. Questions are sorted
by context length (length bucketing keeps padding small), tokenised in one batched call, scored under
``torch.inference_mode``, and per-row scores leave the tensor once per batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedkt import eval_checked, progress
from fedkt.config import TASKS, ConfigError, EvalConfig, Placement
from fedkt.data.collate import encode, encode_pairs
from fedkt.data.partition import subsample
from fedkt.data.prompts import context, continuations, per_char, with_format
from fedkt.data.tasks import Example, final_number, load_task
from fedkt.generate import generate
from fedkt.models import load_model
from fedkt.run_results import bits, ids_fingerprint, question_ids
from fedkt.seeds import derive_seed


def _prefix_token(tok) -> int:
    """The harness's ``prefix_token_id``: the context of a request whose context is empty."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


MIN_FILL = 0.75
"""A batch stops growing where another row would leave less than this share of its padded area real tokens
(a small, scattered set of questions: a few short batches instead of one mostly padding)."""

PACKABLE_ATTENTION = {"sdpa", "eager"}
"""Attention implementations that take a custom 4D additive mask (needed to pack choices in one row)."""


def _packable(model) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in PACKABLE_ATTENTION


@torch.inference_mode()
def loglikelihoods(model, tok, requests: Sequence[tuple[str, str]], batch_size: int = 32,
                   max_length: int = 1024, desc: str = "score", share_context: bool = True,
                   method: str = "auto", fast_single: bool = True) -> list[float]:
    """Summed log p(continuation | context) for each (context, continuation) pair.

    Requests with the same context tokens (the choices of one question) share its computation.
    ``method="packed"`` (the default where the model's attention takes a 4D mask: sdpa, eager) lays
    each question out as one row, ``context + choice 1 + choice 2 + ...``, with an attention mask that
    lets every choice see the context and itself only and position ids that restart after the context,
    so each context token and each choice token runs exactly once in a single forward pass (a choice's
    last token not at all: it is only a target).
    ``method="cache"`` runs the contexts of a batch once, left-padded, and fans their KV cache out to the
    continuations, which run in a second pass (any attention implementation). ``batch_size`` bounds
    the continuation rows per batch (packed: the padded tokens of a batch, to those of ``batch_size``
    separate (context, continuation) rows as wide as its widest request). ``share_context=False`` gives
    every request its own copy of the context (same scores, more compute). Inputs longer than
    ``max_length`` lose context tokens from the left, as in the harness. Questions whose continuations
    are all one token long (lettered choices) take a third path whatever ``method`` says
    (``fast_single=False`` turns it off): one right-padded row per context and one log-softmax at its
    last position give all its choices' scores; ``batch_size`` then bounds the contexts per batch.
    """
    if method == "auto":
        method = "packed" if _packable(model) else "cache"
    if method not in ("packed", "cache"):
        raise ValueError(f"method must be 'auto', 'packed' or 'cache', not {method!r}")
    prefix = [_prefix_token(tok)]  # an empty context is scored after this token, as in the harness
    enc = iter(encode_pairs(tok, [r for r in requests if r[0] != ""]))
    pairs = [next(enc) if ctx != "" else (prefix, encode(tok, cont)) for ctx, cont in requests]
    groups: dict[tuple, tuple[list[int], list[tuple[int, list[int]]]]] = {}
    for i, (c, k) in enumerate(pairs):
        if not k:
            raise ValueError(f"empty continuation for request {i}: {requests[i][1]!r}")
        if len(c) + len(k) > max_length:
            c = c[-max(1, max_length - len(k)):]
        key = tuple(c) if share_context else (i, *c)
        groups.setdefault(key, (c, []))[1].append((i, k))
    # groups whose continuations are all one token (lettered choices " A", " B", ...) need only the
    # context's last position: the "last" path; the others run packed (or through the KV cache)
    last = [g for g in groups.values() if all(len(k) == 1 for _, k in g[1])] if fast_single else []
    rest = [g for g in groups.values() if not all(len(k) == 1 for _, k in g[1])] if fast_single else \
        list(groups.values())
    # length bucketing: neighbours in this order have similar lengths, so batches carry little padding
    # (per pass: its groups, scorer, a group's padded row length, and whether a group would overfill a batch)
    def rows(chunk):  # continuation rows
        return sum(len(g[1]) for g in chunk)

    passes = [(last, _score_last, lambda g: len(g[0]), lambda chunk: len(chunk) > batch_size),
              (rest, _score_packed, _packed_len, lambda chunk: _packed_area(chunk) > batch_size * _widest(chunk))
              if method == "packed" else
              (rest, _score_chunk, lambda g: len(g[0]), lambda chunk: rows(chunk) > batch_size)]
    out = [0.0] * len(requests)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with progress.bar(desc, len(requests)) as pb:
        for groups_of_pass, score, length, overfull in passes:
            ordered = sorted(groups_of_pass, key=length, reverse=True)
            start = 0
            while start < len(ordered):
                chunk, filled = [ordered[start]], length(ordered[start])  # the first row is the widest
                start += 1
                while start < len(ordered) and not overfull(chunk + [ordered[start]]):
                    n = length(ordered[start])
                    if filled + n < MIN_FILL * length(chunk[0]) * (len(chunk) + 1):
                        break  # a row this short would make the batch mostly padding: start the next one
                    chunk.append(ordered[start])
                    filled += n
                    start += 1
                score(model, chunk, pad, out)
                pb.advance(rows(chunk))
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _logits_at(model, rows: torch.Tensor, cols: torch.Tensor, keep: int, **inputs) -> torch.Tensor:
    """Logits [N, V] of the positions (rows[i], cols[i]) only: a pre-hook on the output embedding hands
    the LM head just those hidden states (the vocabulary projection is the costliest layer of a small
    model). Models without an output embedding module compute the last ``keep`` positions and pick."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        width = inputs["input_ids"].shape[1]
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        return logits[rows, cols - (width - keep)]
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0][rows, cols], *args[1:]))
    try:
        return model(**inputs, use_cache=False).logits
    finally:
        handle.remove()


def _score_last(model, chunk, pad: int, out: list[float]) -> None:
    """Score one batch of questions whose continuations are all single tokens: one row per context,
    right-padded, no attention mask (causal attention: padding after a row's end is never seen, as in
    the harness's own batches), and the LM head only at each row's last context position, whose
    log-softmax gives every choice's score at once."""
    dev = _device(model)
    lengths = [len(c) for c, _ in chunk]
    width = max(lengths)
    flat = []
    for c, _ in chunk:
        flat += c + [pad] * (width - len(c))
    ids = torch.tensor(flat, dtype=torch.long, device=dev).view(len(chunk), width)
    rows = torch.arange(len(chunk), device=dev)
    cols = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=dev)
    logp = torch.log_softmax(_logits_at(model, rows, cols, width - min(lengths) + 1, input_ids=ids).float(), dim=-1)
    owner = [r for r, (_, g) in enumerate(chunk) for _ in g]
    target = [k[0] for _, g in chunk for _, k in g]
    scores = logp[torch.tensor(owner, dtype=torch.long, device=dev),
                  torch.tensor(target, dtype=torch.long, device=dev)].tolist()
    for (i, _), v in zip((m for _, g in chunk for m in g), scores):
        out[i] = v


def _packed_len(group) -> int:
    """Tokens of a question's packed row: its context and each choice but the choice's last token."""
    return len(group[0]) + sum(len(k) - 1 for _, k in group[1])


def _packed_area(chunk) -> int:
    """Padded tokens of a packed batch (its rows as wide as its widest)."""
    return len(chunk) * max(_packed_len(g) for g in chunk)


def _widest(chunk) -> int:
    """Tokens of the widest single (context, choice) request of ``chunk``: a packed batch holds at most
    ``batch_size`` times this, the padded tokens of ``batch_size`` such rows (the harness's batch)."""
    return max(len(c) + len(k) for c, g in chunk for _, k in g)


def _score_packed(model, chunk, pad: int, out: list[float]) -> None:
    """Score one batch, one question per row: ``[context | choice 1 | choice 2 | ...]`` right-padded.

    Segment ids (0 context, s for choice s, -1 padding) give the mask: a query attends to an earlier
    key of the context or of its own segment. Choice tokens take positions ``len(context) + t``, as if
    each followed the context alone, so every score equals a separate (context, choice) pass. A choice's
    last token predicts nothing that is scored, so it is left out of the row (as the harness leaves it
    out of its inputs): a choice of m tokens takes m - 1 positions. The LM head runs only on the
    positions that predict continuation tokens, once on the context's last (every choice's first)."""
    lengths = [_packed_len(g) for g in chunk]
    width = max(lengths)
    flat_ids, flat_seg, flat_pos = [], [], []
    q_row, q_col, targets, member = [], [], [], []
    members = []
    at_head = []  # per target token, its position among the LM head's positions (q_row, q_col)
    for r, (c, group) in enumerate(chunk):
        n = len(c)
        flat_ids += c
        flat_seg += [0] * n
        flat_pos += range(n)
        at = n
        first = len(q_col)  # the context's last token predicts every choice's first: one LM head position
        q_row.append(r)
        q_col.append(n - 1)
        for s, (i, k) in enumerate(group, 1):
            m = len(k)
            flat_ids += k[:-1]  # the last token is a target only
            flat_seg += [s] * (m - 1)
            flat_pos += range(n, n + m - 1)
            at_head.append(first)
            at_head += range(len(q_col), len(q_col) + m - 1)
            q_row += [r] * (m - 1)
            q_col += range(at, at + m - 1)
            targets += k
            member += [len(members)] * m
            members.append(i)
            at += m - 1
        pad_n = width - lengths[r]
        flat_ids += [pad] * pad_n
        flat_seg += [-1] * pad_n
        flat_pos += [0] * pad_n
    B, dev = len(chunk), _device(model)
    ids = torch.tensor(flat_ids, dtype=torch.long, device=dev).view(B, width)
    seg = torch.tensor(flat_seg, dtype=torch.long, device=dev).view(B, width)
    pos = torch.tensor(flat_pos, dtype=torch.long, device=dev).view(B, width)
    idx = torch.arange(width, device=dev)
    causal = idx[None, :] <= idx[:, None]
    allowed = causal[None] & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    dtype = next(model.parameters()).dtype
    mask = torch.zeros((B, 1, width, width), dtype=dtype, device=dev)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    sel = _logits_at(model, torch.tensor(q_row, device=dev), torch.tensor(q_col, device=dev), width - min(q_col),
                     input_ids=ids, attention_mask=mask, position_ids=pos)
    logp = torch.log_softmax(sel.float(), dim=-1)[torch.tensor(at_head, dtype=torch.long, device=dev),
                                                   torch.tensor(targets, dtype=torch.long, device=dev)]
    scores = torch.zeros(len(members), dtype=logp.dtype, device=dev).index_add_(
        0, torch.tensor(member, dtype=torch.long, device=dev), logp)
    for i, v in zip(members, scores.tolist()):
        out[i] = v


def _score_chunk(model, chunk, pad: int, out: list[float]) -> None:
    """Score one batch: ``chunk`` is a list of (context tokens, [(request index, continuation tokens)])."""
    width, dev = max(len(c) for c, _ in chunk), _device(model)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=dev)
    mask = torch.zeros((len(chunk), width), dtype=torch.long, device=dev)
    for r, (c, _) in enumerate(chunk):
        ids[r, width - len(c):] = torch.tensor(c, dtype=torch.long, device=dev)
        mask[r, width - len(c):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    first = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first_logp = torch.log_softmax(first.logits[:, -1].float(), dim=-1)  # predicts each continuation's 1st token
    owners = [r for r, (_, group) in enumerate(chunk) for _ in group]
    members = [m for _, group in chunk for m in group]
    owner_idx = torch.tensor(owners, dtype=torch.long, device=dev)
    cache = first.past_key_values
    if owners != list(range(len(chunk))):
        cache.reorder_cache(owner_idx)
    lmax = max(len(k) for _, k in members)
    cont = torch.full((len(members), lmax), pad, dtype=torch.long, device=dev)
    cmask = torch.zeros((len(members), lmax), dtype=torch.long, device=dev)
    for r, (_, k) in enumerate(members):
        cont[r, :len(k)] = torch.tensor(k, dtype=torch.long, device=dev)
        cmask[r, :len(k)] = 1
    full_mask = torch.cat([mask[owner_idx], cmask], dim=1)
    cpos = mask.sum(-1)[owner_idx].unsqueeze(1) + torch.arange(lmax, device=dev).unsqueeze(0)
    scores = first_logp[owner_idx].gather(-1, cont[:, :1]).squeeze(-1)
    if lmax > 1:
        rest = model(input_ids=cont[:, :-1], attention_mask=full_mask[:, :-1], position_ids=cpos[:, :-1],
                     past_key_values=cache, use_cache=True).logits
        logp = torch.log_softmax(rest.float(), dim=-1).gather(-1, cont[:, 1:].unsqueeze(-1)).squeeze(-1)
        scores = scores + (logp * cmask[:, 1:]).sum(-1)
    for (i, _), v in zip(members, scores.tolist()):
        out[i] = v


def choice_loglikelihoods(model, tok, examples: Sequence[Example], batch_size: int = 32,
                          desc: str = "eval", precision: str = "model", stats=None) -> list[list[float]]:
    """Per question, the summed log-likelihood of each choice's continuation (the harness's ``lls``).
    ``precision="bf16-checked"``: a bf16 copy scores, questions too close to call are re-scored in the
    model's precision (same predictions, :mod:`fedkt.eval_checked`; ``stats`` receives its
    :class:`~fedkt.eval_checked.CheckStats`)."""
    if precision == "bf16-checked":
        return eval_checked.checked_choice_loglikelihoods(
            model, tok, examples, lambda m, t, exs, label: choice_loglikelihoods(
                m, t, exs, batch_size, f"{desc} {label}".strip()),
            stats=stats)
    if precision != "model":
        raise ValueError(f"precision must be 'model' or 'bf16-checked', not {precision!r}")
    requests, sizes = [], []
    for ex in examples:
        if not ex.is_mc:
            raise ValueError(f"example {ex.id} of task {ex.task} is not multiple choice")
        ctx = context(ex)
        conts = continuations(ex)
        requests.extend((ctx, c) for c in conts)
        sizes.append(len(conts))
    lls = loglikelihoods(model, tok, requests, batch_size=batch_size, desc=desc)
    out, i = [], 0
    for n in sizes:
        out.append(lls[i:i + n])
        i += n
    return out


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (``np.argmax``; NaN counts as the maximum, as there)."""
    best = 0
    for j, v in enumerate(values):
        if v != v:
            return j
        if v > values[best]:
            best = j
    return best


def predictions(ex: Example, lls: Sequence[float]) -> tuple[int, int]:
    """(pred, pred_norm) of one question from its choices' log-likelihoods, as the harness picks them:
    argmax of ``lls`` and of ``lls / len(choice)`` (characters of the choice, delimiter excluded)."""
    return _argmax(lls), _argmax(per_char(ex, lls))


def score_multiple_choice(model, tok, examples: Sequence[Example], batch_size: int = 32,
                          desc: str = "eval", per_question: dict | None = None, precision: str = "model"
                          ) -> dict[str, float]:
    """``acc`` and ``acc_norm`` exactly as lm-evaluation-harness computes them for ``examples``; a
    ``per_question`` dict receives each question's correctness as bit-strings ``{"acc", "acc_norm"}``
    (``precision``: as :func:`choice_loglikelihoods`)."""
    per_q = choice_loglikelihoods(model, tok, examples, batch_size, desc, precision)
    acc, acc_norm = [], []
    for ex, lls in zip(examples, per_q):
        pred, pred_norm = predictions(ex, lls)
        acc.append(pred == ex.answer)
        acc_norm.append(pred_norm == ex.answer)
    if per_question is not None:
        per_question.update(acc=bits(acc), acc_norm=bits(acc_norm))
    n = len(examples)
    return {"acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n, "n": n}


def score_generation(model, tok, examples: Sequence[Example], batch_size: int = 16,
                     max_new_tokens: int = 256, desc: str = "eval", per_question: dict | None = None
                     ) -> dict[str, float]:
    """GSM8K-style exact match of the final number of a greedy generation (``per_question``: as
    :func:`score_multiple_choice`'s, ``{"acc"}`` = exact match)."""
    outputs = generate(model, tok, [context(ex) for ex in examples], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, desc=desc, stop=["\nQuestion:", "\n\n\n"])
    flags = [final_number(o) == ex.label for o, ex in zip(outputs, examples)]
    if per_question is not None:
        per_question.update(acc=bits(flags))
    correct = sum(flags)
    n = len(examples)
    return {"acc": correct / n, "exact_match": correct / n, "n": n}


def evaluate(model, tok, examples: Sequence[Example], batch_size: int = 32, max_new_tokens: int = 256,
             desc: str = "eval", per_question: dict | None = None, precision: str = "model") -> dict[str, float]:
    if examples and examples[0].is_mc:
        r = score_multiple_choice(model, tok, examples, batch_size, desc, per_question, precision)
    else:
        r = score_generation(model, tok, examples, max(1, batch_size // 2), max_new_tokens, desc, per_question)
    return r


def evaluate_tasks(model, tok, eval_sets: dict[str, Sequence[Example]], batch_size: int = 32,
                   max_new_tokens: int = 256, desc: str = "eval", correct: dict | None = None,
                   precision: str = "model") -> dict[str, dict[str, float]]:
    """``evaluate`` on every task of ``eval_sets`` ({task: examples}) -> {task: metrics}. A ``correct`` dict
    receives the per-question correctness, ``{task: {"ids": fingerprint of the question ids, "acc": bits,
    ...}}`` (:data:`fedkt.run_results.Correct`); ``precision``: ``eval.precision``."""
    out = {}
    for t, exs in eval_sets.items():
        pq = {"ids": ids_fingerprint(question_ids(exs))} if correct is not None else None
        out[t] = evaluate(model, tok, exs, batch_size, max_new_tokens, desc=f"{desc} {t}", per_question=pq,
                          precision=precision)
        if correct is not None:
            correct[t] = pq
    return out


def evaluate_model(spec: str, tasks: Sequence[str], adapter=None, split: str = "test", data_dir: str = "",
                   limit: int = 0, batch_size: int = 32, seed: int = 0, dtype: str = "float32",
                   prompt_format: str = "harness", device: str = "cpu", precision: str = "model"
                   ) -> dict[str, dict[str, float]]:
    """Load model ``spec`` (plus a peft ``adapter`` directory) on ``device`` in ``dtype`` (as
    ``model.device``/``model.dtype``) and score it on ``tasks``' ``split``, each a seeded subsample of
    ``limit`` questions (0 = all), in ``prompt_format`` ("harness" or "cloze", as ``eval.format``), multiple
    choice at ``precision`` (as ``eval.precision``): what ``fedkt eval`` runs."""
    for t in tasks:
        if t not in TASKS:
            raise ConfigError(f"--tasks: {t!r} is not a task; allowed values: {', '.join(TASKS)}")
    try:
        formats = EvalConfig(format=prompt_format, precision=precision)
    except ConfigError as e:
        raise ConfigError(f"--{e}") from None
    model, tok = load_model(spec, placement=Placement(device=device, dtype=dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    sets = {t: with_format(subsample(load_task(t, split, data_dir), limit, derive_seed(seed, "eval", t)), formats)
            for t in tasks}
    return {t: evaluate(model, tok, exs, batch_size, desc=f"eval {t}", precision=precision) for t, exs in sets.items()}
