"""Batched generation with a KV cache that stops as soon as each row is done; chat prompts.

``generate(model, tok, prompts, ...)`` continues every prompt and returns only the new text, cut at the
first stop string. The method, and why:

* **Own decode loop, not ``model.generate``.** One prefill forward on a left-padded batch (only the last
  position's logits are computed: ``logits_to_keep=1`` saves a ``prompt_len x vocab`` matmul), then one
  forward per new token with the KV cache. Position ids are ``cumsum(attention_mask) - 1`` so a padded
  row sees exactly the positions it would see alone; batched greedy output equals one-at-a-time greedy
  output token for token (tested).
* **Real stopping.** A row is finished when it emits an EOS token (the tokenizer's and the model's
  ``generation_config`` ones) or when its text contains a stop string. Stop strings are detected on the
  text, not on token ids (a string such as ``"\\nQuestion:"`` can be tokenised many ways): each step
  decodes only the last ``max(len(stop)) + 4`` tokens of every live row, and a hit is confirmed on the
  row's full decoded text. The loop ends when every row is finished, not at ``max_new_tokens``.
* **Finished rows leave the batch.** When rows finish, they are dropped from the batch and the KV cache
  (with continuous batching in bulk, once a quarter of the rows are done or new prompts join; a done row
  rides along until then, its output ignored), so the remaining rows run at the cost of a smaller batch.
  Prompts are bucketed by token length (sorted, then cut into batches; joining prompts are prefilled in
  length groups) so little compute goes to padding; outputs come back in the input order. The KV cache
  grows in place (``fedkt.generate_cache``), not by concatenating the whole cache every step.
* **A shared prompt prefix is computed once.** When all prompts start with the same tokens (a system
  prompt, few-shot examples: FedCoT's rationale prompts), that prefix runs once with batch 1 and its KV
  cache is copied into every batch; each row then holds ``[prefix][left padding][own suffix]``, the
  padding masked and positions continuing from the prefix, so results equal a plain prefill.
* **Deterministic sampling.** Sampling draws from one ``torch.Generator`` seeded with ``seed`` (the
  global RNG is untouched); batches run in a fixed order, so a call is reproducible given its seed,
  prompts and ``batch_size``. Temperature, then top-k, then top-p (nucleus), as in transformers.

``chat_prompt(tok, system, user, few_shot)`` renders a conversation with the tokenizer's chat template
(plain ``User:``/``Assistant:`` text when the tokenizer has none) ending where the assistant speaks.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fedkt import progress
from fedkt.generate_cache import compact, grow, merge, mergeable

_STOP_WINDOW_SLACK = 4  # tokens decoded beyond the longest stop string's length when looking for it
MIN_SHARED_PREFIX = 8  # shared prompt prefixes at least this long (tokens) are computed once per call
# what one prefill call costs beyond its tokens, in padded tokens (one CPU thread, SmolLM2-135M: ~70 ms for
# the call vs ~1.75 ms a token; docs/generation.md): joining prompts are cut into length groups by it
PREFILL_CALL_TOKENS = 40


@dataclass
class Generation:
    """What a generation call produced, for callers that want more than the texts."""

    texts: list[str]
    new_tokens: list[int]  # tokens generated per prompt, up to and including its EOS / stop string
    token_ids: list[list[int]] = field(default_factory=list)  # the generated ids (EOS included, if any)
    forward_calls: int = 0  # model forwards (prefills + decode steps) over all batches
    seconds: float = 0.0
    per_batch_steps: list[int] = field(default_factory=list)
    shared_prefix_tokens: int = 0  # length of the prompt prefix computed once for all prompts

    @property
    def total_new_tokens(self) -> int:
        return sum(self.new_tokens)


def eos_token_ids(model, tok) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (which may list several)."""
    ids: set[int] = set()
    for src in (tok.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return sorted(ids)


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
            gen: torch.Generator) -> torch.Tensor:
    logits = logits.float() / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop_sorted[:, 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def shared_prefix_len(ids: Sequence[Sequence[int]]) -> int:
    """Tokens every row of ``ids`` starts with, leaving each row at least one token of its own (0 for one row):
    the prefix a batch of prompts (system turn, instruction, few-shot examples) can compute once."""
    return min(len(os.path.commonprefix(ids)), min(len(r) for r in ids) - 1) if len(ids) > 1 else 0


def prefix_cache(model, row: Sequence[int], plen: int, device):
    """The KV cache of ``row``'s first ``plen`` tokens (one forward, last position's logits only)."""
    return _forward(model, input_ids=torch.tensor([list(row[:plen])], dtype=torch.long, device=device),
                    use_cache=True, logits_to_keep=1).past_key_values


def _forward(model, **kw):
    try:
        return model(**kw)
    except TypeError as e:  # a model without logits_to_keep: compute all logits
        if "logits_to_keep" not in str(e) or "logits_to_keep" not in kw:
            raise
        kw.pop("logits_to_keep")
        return model(**kw)


def _has_stop(text: str, stop: Sequence[str]) -> bool:
    return any(s in text for s in stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def _prefill(model, rows: list[list[int]], pad_id: int, prefix=None):
    """Prefill a left-padded batch of token-id prompts: (KV cache, attention mask, next positions, last logits).

    ``prefix`` = (KV cache of a shared prefix of P tokens, batch 1; P): ``rows`` are then the suffixes.
    Layout ``[prefix][left padding][suffix]``; the padding is masked and positions continue from P.
    """
    dev = _device(model)
    b = len(rows)
    width = max(len(r) for r in rows)
    flat, mask = [], []
    for r in rows:  # left padding
        flat += [pad_id] * (width - len(r)) + r
        mask += [0] * (width - len(r)) + [1] * len(r)
    input_ids = torch.tensor(flat, dtype=torch.long, device=dev).view(b, width)
    attn = torch.tensor(mask, dtype=torch.long, device=dev).view(b, width)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    kw = {}
    if prefix is not None:
        cache, plen = copy.deepcopy(prefix[0]), prefix[1]
        cache.batch_repeat_interleave(b)
        attn = torch.cat([torch.ones((b, plen), dtype=torch.long, device=dev), attn], dim=1)
        pos = pos + plen
        kw["past_key_values"] = cache
    out = _forward(model, input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True,
                   logits_to_keep=1, **kw)
    cache = out.past_key_values
    if not hasattr(cache, "batch_select_indices"):
        raise TypeError(f"{type(model).__name__} returned a {type(cache).__name__} KV cache without "
                        f"batch_select_indices; fedkt.generate needs a transformers Cache (transformers >= 5)")
    return cache, attn, pos[:, -1] + 1, out.logits[:, -1, :]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _prefill_groups(lengths: Sequence[int], call_tokens: int = None) -> list[int]:
    """Cut prompts of non-increasing ``lengths`` (tokens) into consecutive prefill groups: the sizes.

    Each group is left-padded to its first (longest) prompt, and a prefill call costs about as much as
    ``call_tokens`` padded tokens of its own, so the cut minimises ``sum(call_tokens + rows x width)`` over
    the groups (an exact O(n^2) dynamic programme; n is at most the batch size)."""
    c = PREFILL_CALL_TOKENS if call_tokens is None else call_tokens
    n = len(lengths)
    best, cut = [0] + [None] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + c + (j - i) * lengths[i]
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    sizes, j = [], n
    while j:
        sizes.append(j - cut[j])
        j = cut[j]
    return sizes[::-1]


def _decode(model, tok, queue: list[tuple[int, list[int]]], batch_size: int, max_new_tokens: int, pad_id: int,
            eos: torch.Tensor, stop: Sequence[str], sampler, on_finish, prefix=None,
            refill: bool = True) -> tuple[dict[int, list[int]], int, list[int]]:
    """Generate for ``queue`` ((prompt index, token ids), in the order to start them), at most ``batch_size``
    rows at a time. Returns ({prompt index: new ids}, forwards, decode steps per batch).

    Continuous batching (``refill``): finished rows leave the batch and KV cache in bulk (once a quarter of
    the rows are done, or when new prompts join; until then a done row rides along, its output ignored), and
    once a quarter of the batch (or all of it) is free, the next prompts of the queue are prefilled, in length groups cut
    by ``_prefill_groups``, and join the running batch (their cache padded to the batch's width, masked);
    leading columns no live row uses are trimmed. The cache grows in place (``generate_cache.grow``).
    Without ``refill`` (or with a cache whose layers cannot be merged), batches run one after another to
    their last row, as ``batch_size`` cuts the queue.
    """
    dev = eos.device
    done_ids: dict[int, list[int]] = {}
    forwards, steps = 0, []
    window = max((len(s) for s in stop), default=0) + _STOP_WINDOW_SLACK
    q = 0  # next queue entry to start
    cache = attn = next_pos = logits = None
    live: list[int] = []  # prompt indices of the rows in cache order (finished ones too, until compacted)
    made: list[list[int]] = []  # their new ids so far
    gone: list[bool] = []  # finished rows still in the batch (refill only: they leave in bulk)
    batch_steps = total = 0
    threshold = max(1, batch_size // 4)
    merge_ok = None  # whether this model's cache rows can be merged (known after the first prefill)
    while q < len(queue) or live:
        free = batch_size - len(live)
        if q < len(queue) and (not live or (refill and free >= threshold and mergeable(cache))):
            take = queue[q:q + free]
            # continuous batching: joining prompts are prefilled in length groups (little padding), then merged
            sizes = _prefill_groups([len(r) for _, r in take]) if refill and merge_ok is not False else [len(take)]
            parts, g0 = [], 0
            for size in sizes:
                if parts and not mergeable(parts[0][0]):  # cannot merge (sliding-window cache...): the rest of
                    merge_ok = False                      # this first batch waits; later batches are not cut
                    break
                parts.append(_prefill(model, [r for _, r in take[g0:g0 + size]], pad_id, prefix))
                grow(parts[-1][0])
                forwards += 1
                g0 += size
            take = take[:g0]
            q += len(take)
            if not live:
                if cache is not None:
                    steps.append(batch_steps)
                (cache, attn, next_pos, logits), parts, batch_steps = parts[0], parts[1:], 0
            if parts:
                attn = merge(cache, attn, [(c2, a2) for c2, a2, _, _ in parts])
                next_pos = torch.cat([next_pos] + [p2 for _, _, p2, _ in parts])
                logits = torch.cat([logits] + [l2 for _, _, _, l2 in parts])
            live += [i for i, _ in take]
            made += [[] for _ in take]
            gone += [False] * len(take)
        nxt = sampler(logits)
        nxt_list = nxt.tolist()
        eos_hit = torch.isin(nxt, eos).tolist()
        fresh = [j for j in range(len(live)) if not gone[j]]
        for j in fresh:
            made[j].append(nxt_list[j])
        total += len(fresh)
        if stop:
            tails = tok.batch_decode([made[j][-window:] for j in fresh], skip_special_tokens=True)
            for j, tail in zip(fresh, tails):  # a loop over rows; the text check has no tensor form
                if not eos_hit[j] and _has_stop(tail, stop):
                    eos_hit[j] = _has_stop(tok.decode(made[j], skip_special_tokens=True), stop)
        finished = [j for j in fresh if eos_hit[j] or len(made[j]) >= max_new_tokens]
        if finished:
            on_finish(len(finished), total)
            for j in finished:
                done_ids[live[j]] = made[j]
                gone[j] = True
        if len(finished) == len(fresh):
            live, made, gone = [], [], []
            continue
        attn = torch.cat([attn, torch.ones((len(live), 1), dtype=torch.long, device=dev)], dim=1)
        n_gone = sum(gone)
        # finished rows leave the batch and cache at once (fixed batches: what sampled runs' draws rely on), or,
        # with refill, in bulk: once a quarter of the rows are done or new prompts are to join (a compaction
        # copies the cache; a done row riding along costs only its share of a step)
        if n_gone and (not refill or n_gone >= max(1, len(live) // 4) or not mergeable(cache)
                       or (q < len(queue) and batch_size - (len(live) - n_gone) >= threshold)):
            kept = [j for j in range(len(live)) if not gone[j]]
            keep = torch.tensor(kept, dtype=torch.long, device=dev)
            attn = compact(cache, attn, keep, trim=refill and mergeable(cache))
            live, made, gone = [live[j] for j in kept], [made[j] for j in kept], [False] * len(kept)
            nxt, next_pos = nxt[keep], next_pos[keep]
        out = _forward(model, input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        forwards += 1
        batch_steps += 1
        logits = out.logits[:, -1, :]
        if any(gone):  # a done row riding along keeps its position (no position past the row's end)
            next_pos = next_pos + torch.tensor([not g for g in gone], dtype=next_pos.dtype, device=dev)
        else:
            next_pos = next_pos + 1
    if cache is not None:
        steps.append(batch_steps)
    return done_ids, forwards, steps


@torch.no_grad()
def generate_ex(model, tok, prompts: Sequence[str], max_new_tokens: int = 128, batch_size: int = 16,
                do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                seed: int = 0, stop: Sequence[str] = (), desc: str = "generate",
                refill: bool | None = None) -> Generation:
    """``generate`` with counts: texts, tokens generated per prompt, model forwards and wall time.

    ``refill`` (continuous batching: finished rows are replaced by the next prompts) defaults to on for
    greedy decoding, whose output does not depend on the batch a row runs in, and off for sampling, whose
    draws come from one generator in batch order: a sampled run keeps the fixed batches (``batch_size``
    consecutive prompts of the length order) so its outputs stay those of earlier fedkt versions."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop = [s for s in stop if s]
    t0 = time.perf_counter()
    n = len(prompts)
    if n == 0:
        return Generation([], [])
    ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
    for i, r in enumerate(ids):
        if not r:
            if tok.bos_token_id is None:
                raise ValueError(f"prompt {i} is empty and the tokenizer has no BOS token to start from; "
                                 f"give every prompt some text")
            ids[i] = [tok.bos_token_id]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_token_ids(model, tok)[0]
    dev = _device(model)
    eos = torch.tensor(eos_token_ids(model, tok), dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    if refill is None:
        refill = not do_sample
    was_training = model.training
    if do_sample:
        sampler = lambda logits: _sample(logits, temperature, top_k, top_p, gen)  # noqa: E731
    else:
        sampler = lambda logits: logits.argmax(-1)  # noqa: E731
    # a prefix all prompts share (system prompt, few-shot examples) is computed once, its KV cache reused
    plen = shared_prefix_len(ids)
    texts: list[str] = [""] * n
    counts: list[int] = [0] * n
    res = Generation(texts, counts, [[] for _ in range(n)])
    model.eval()
    try:
        prefix = None
        if plen >= MIN_SHARED_PREFIX:
            prefix = (prefix_cache(model, ids[0], plen, dev), plen)
            ids = [r[plen:] for r in ids]
            res.forward_calls += 1
            res.shared_prefix_tokens = plen
        order = sorted(range(n), key=lambda i: -len(ids[i]))  # length buckets, longest first (stable)
        with progress.bar(desc, n) as pb:
            def on_finish(k: int, made: int) -> None:
                pb.advance(k, tok_s=made / max(time.perf_counter() - t0, 1e-9))

            new, fw, steps = _decode(model, tok, [(i, ids[i]) for i in order], batch_size, max_new_tokens, pad_id,
                                     eos, stop, sampler, on_finish, prefix, refill=refill)
        res.forward_calls += fw
        res.per_batch_steps = steps
        decoded = tok.batch_decode([new[i] for i in range(n)], skip_special_tokens=True)
        for i in range(n):
            texts[i] = cut_at_stop(decoded[i], stop)
            counts[i] = len(new[i])
            res.token_ids[i] = new[i]
    finally:
        model.train(was_training)
    res.seconds = time.perf_counter() - t0
    return res


def generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 128, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             stop: Sequence[str] = (), desc: str = "generate", refill: bool | None = None) -> list[str]:
    """Continue each prompt; returns only the new text, cut at the first stop string.

    Greedy unless ``do_sample``; sampling is reproducible given ``seed`` (and ``batch_size``). Each row
    stops at EOS or its first stop string; the call returns when every row has stopped or reached
    ``max_new_tokens``.
    """
    return generate_ex(model, tok, prompts, max_new_tokens, batch_size, do_sample, temperature, top_p, top_k,
                       seed, stop, desc, refill).texts


# --------------------------------------------------------------------------------------------------
# chat prompts


def chat_messages(system: str | None, user: str,
                  few_shot: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """OpenAI-style messages: optional system turn, few-shot (user, assistant) pairs, the user turn."""
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in few_shot:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": user}]


def render_plain(messages: Sequence[dict[str, str]]) -> str:
    """Plain-text chat for models without a template: ``User: …\\nAssistant: …`` turns, open at the end.
    Use ``stop=["\\nUser:"]`` so the model does not write the next user turn."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        else:
            parts.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n")
    return "".join(parts) + "Assistant:"


def render_chat(tok, messages: Sequence[dict[str, str]]) -> str:
    """Messages -> prompt text with ``tok``'s chat template (generation prompt added), or plain text."""
    if getattr(tok, "chat_template", None):
        try:
            return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template without a system role (e.g. Gemma): fold it into the first turn
            if not messages or messages[0]["role"] != "system" or len(messages) < 2:
                raise
            first = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
            try:
                return tok.apply_chat_template([first, *messages[2:]], tokenize=False, add_generation_prompt=True)
            except Exception:
                raise e from None
    return render_plain(messages)


def chat_prompt(tok, system: str | None, user: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
    """A prompt that asks the model, as the assistant, to answer ``user`` (after ``few_shot`` examples)."""
    return render_chat(tok, chat_messages(system, user, few_shot))
