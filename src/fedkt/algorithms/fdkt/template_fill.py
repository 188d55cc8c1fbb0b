"""Template filling with one KV cache per prompt: the model writes each field of ``render_mc``'s template
(the question, each choice, the answer) in turn, and each field *continues from the cache* of the previous
one instead of prefilling the prompt and every field so far again.

:func:`fedkt.data.synthetic.fill_mc_template` asks a ``complete`` function once per field, and a local
model then prefills ``prompt + fields so far`` on every call: a 3-shot augmentation prompt of a few hundred
tokens is prefilled 6 times for a 4-choice question. :func:`fill_mc_template_cached` writes the same
template with one prefill per prompt:

* Prompts are sorted by token length and cut into batches of ``batch_size`` (as ``fedkt.generate``).
  A batch is prefilled once (left padding, masked; explicit position ids), in length groups
  (``fedkt.generate._prefill_groups``) merged into one cache that grows in place
  (``fedkt.generate_cache``). A prefix every prompt shares (the augmentation prompts' system turn and
  instruction) is computed once per call and its KV cache copied into every batch.
* A field is decoded token by token with the KV cache. A row is finished with the field when its field
  text contains the stop string (``"\\n"``), it emits EOS, or it reaches the field's token limit. A
  finished row rides along (its column masked, no draw) until a quarter of the batch has finished; then
  the finished rows' cache rows are *parked* together (copied out of the batch cache), so the rows still
  writing run at the cost of a smaller batch.
* When every row has finished the field, the parked rows are put back into one cache (each padded on the
  left with masked zero keys/values to the widest), and one forward feeds each row the rest of its field's
  last token up to the stop (the sampled token itself is never fed: it holds the stop) followed by the
  template's next label (``"\\nB."``, ``"\\nAnswer:"``), left-padded and masked. The next field continues
  from that forward's logits.

What the model is conditioned on differs from the uncached path in one way: the fields are the generated
token ids, not the normalised text re-tokenised with the prompt (tokens cannot merge across a field
boundary, and whitespace inside a field is not collapsed). The returned texts are built exactly as
``fill_mc_template`` builds them (each field normalised), so parsing is unchanged.

Sampling (:func:`sample`: top-p without sorting the vocabulary) draws from one ``torch.Generator`` per field tag (seeded by ``seed_for(tag)``, as the uncached
path seeds one generation call per tag), so a call is reproducible given its seeds, prompts and
``batch_size``. Greedy decoding for the tags in ``greedy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from fedkt import generate as G
from fedkt.generate_cache import GROW_COLUMNS, GrowingLayer, compact, grow, merge, mergeable
from fedkt.data.synthetic import LETTERS, fill_mc_template, normalize

STOP = "\n"


@dataclass
class FillStats:
    """What a cached template fill cost: forwards, the multi-token ones among them, tokens fed."""

    forward_calls: int = 0  # all model forwards (prefills, field boundaries, decode steps)
    prefill_calls: int = 0  # forwards of more than one token per row (prompt prefills, field boundaries)
    input_tokens: int = 0  # non-padding tokens fed to the model over all forwards
    new_tokens: int = 0  # tokens sampled over all fields (each row's last one per field included)
    field_tokens: list[list[int]] = field(default_factory=list)  # per prompt: tokens sampled per field
    shared_prefix_tokens: int = 0  # length of the prompt prefix computed once for all prompts


@dataclass
class _Rows:
    """Rows of a batch with their cache: ids (batch-local), per-layer keys/values, mask, next positions."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    attn: torch.Tensor
    pos: torch.Tensor
    bufs: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer: the buffers ``kv`` are views of (``_join``)


RIDE_FRACTION = 4
"""Rows done with a field ride along in the batch (masked, no draw) until ``1 / RIDE_FRACTION`` of the live
rows are done; then they are parked together (one cache copy instead of one per finishing step)."""

NUCLEUS_TOP = 512
"""Tokens ``sample`` looks at before sorting the whole vocabulary: a row whose ``NUCLEUS_TOP`` most likely
tokens already hold ``top_p`` of the mass has its nucleus among them."""


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row from ``logits`` at ``temperature`` within the top-p nucleus (``fedkt.generate``'s
    rule: the most likely tokens until the mass before a token reaches ``top_p``), without sorting the
    vocabulary: the nucleus is found among the ``NUCLEUS_TOP`` most likely tokens (``topk``) and the draw is
    made among them; rows whose nucleus is larger, and any ``top_k``, go through ``fedkt.generate``'s
    sampler. Sorting 49,152 logits per row and step was a quarter of a client's sampling time."""
    if top_k or top_p >= 1.0:
        return G._sample(logits, temperature, top_k, top_p, gen)
    probs = (logits.float() / max(temperature, 1e-6)).softmax(-1)
    vals, idx = probs.topk(min(NUCLEUS_TOP, probs.shape[-1]), dim=-1)  # sorted, most likely first
    cum = vals.cumsum(-1)
    covered = cum[:, -1] >= top_p
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if bool(covered.any()):
        v, c = vals[covered], cum[covered]
        drop = c - v >= top_p  # mass before this token already reaches top_p
        drop[:, 0] = False
        pick = torch.multinomial(v.masked_fill(drop, 0.0), 1, generator=gen)
        out[covered] = idx[covered].gather(1, pick).squeeze(1)
    if not bool(covered.all()):
        out[~covered] = G._sample(logits[~covered], temperature, 0, top_p, gen)
    return out


def _prefill_batch(model, rows: list[list[int]], pad_id: int, stats: FillStats, prefix=None):
    """Prefill a batch's prompts (longest first) in length groups (``fedkt.generate._prefill_groups``: little
    padding) merged into one growing cache (``generate_cache``); None if the cache's rows cannot be merged.
    ``prefix``: (KV cache, P) of the P tokens every prompt starts with, computed once; ``rows`` are then the
    rest of each prompt (``fedkt.generate._prefill``'s layout ``[prefix][left padding][rest]``)."""
    parts, g0 = [], 0
    for size in G._prefill_groups([len(r) for r in rows]):
        parts.append(G._prefill(model, rows[g0:g0 + size], pad_id, prefix))
        if not mergeable(parts[-1][0]):
            return None
        stats.forward_calls += 1
        stats.prefill_calls += 1
        stats.input_tokens += sum(len(r) for r in rows[g0:g0 + size])
        g0 += size
    cache, attn, pos, logits = parts[0]
    if len(parts) > 1:
        attn = merge(cache, attn, [(c, a) for c, a, _, _ in parts[1:]])
        pos = torch.cat([p for _, _, p, _ in parts])
        logits = torch.cat([lg for _, _, _, lg in parts])
    grow(cache)  # decode steps write into spare columns instead of copying the cache (generate_cache)
    return cache, attn, pos, logits


def _take(cache, attn, pos, idx: list[int], ids: list[int]) -> _Rows:
    t = torch.tensor(idx, dtype=torch.long, device=attn.device)
    return _Rows([ids[j] for j in idx], [(layer.keys[t], layer.values[t]) for layer in cache.layers], attn[t], pos[t])


def _join(groups: list[_Rows]) -> _Rows:
    """One set of rows from parked groups, in ascending row id, written once into fresh key/value buffers
    with ``GROW_COLUMNS`` spare columns (the narrower caches padded on the left with masked zeros), so the
    next forward appends in place (``_feed``)."""
    width = max(g.attn.shape[1] for g in groups)
    ids = sorted(i for g in groups for i in g.ids)
    at = {r: j for j, r in enumerate(ids)}
    dev = groups[0].attn.device
    dest = [torch.tensor([at[r] for r in g.ids], dtype=torch.long, device=dev) for g in groups]
    kv, bufs = [], []
    for i in range(len(groups[0].kv)):
        pair = []
        for t in (0, 1):
            x = groups[0].kv[i][t]
            buf = x.new_zeros((len(ids), x.shape[1], width + GROW_COLUMNS, x.shape[3]))
            for g, d in zip(groups, dest):
                buf[:, :, width - g.attn.shape[1]:width].index_copy_(0, d, g.kv[i][t])
            pair.append(buf)
        bufs.append((pair[0], pair[1]))
        kv.append((pair[0][:, :, :width], pair[1][:, :, :width]))
    attn = groups[0].attn.new_zeros((len(ids), width))
    pos = groups[0].pos.new_zeros(len(ids))
    for g, d in zip(groups, dest):
        attn[:, width - g.attn.shape[1]:].index_copy_(0, d, g.attn)
        pos.index_copy_(0, d, g.pos)
    return _Rows(ids, kv, attn, pos, bufs)


def _trim(rows: _Rows) -> _Rows:
    used = rows.attn.any(0).nonzero()
    c0 = int(used[0]) if len(used) else 0
    if c0:
        rows.kv = [(k[:, :, c0:], v[:, :, c0:]) for k, v in rows.kv]
        rows.bufs = [(k[:, :, c0:], v[:, :, c0:]) for k, v in rows.bufs] if rows.bufs else None
        rows.attn = rows.attn[:, c0:]
    return rows


def _feed(model, cache, rows: _Rows, chunks: list[list[int]], pad_id: int, stats: FillStats):
    """Put ``rows`` back into ``cache`` and feed each row its token chunk (left-padded, masked) in one
    forward; returns (attention mask, next positions, last logits)."""
    dev = rows.attn.device
    width = max(len(c) for c in chunks)
    if rows.bufs and width > GROW_COLUMNS:
        rows.bufs = None  # (a chunk never is: the rest of a token and a label)
    ids = torch.tensor([[pad_id] * (width - len(c)) + c for c in chunks], dtype=torch.long, device=dev)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunks], dtype=torch.long, device=dev)
    pos = (rows.pos[:, None] + mask.cumsum(-1) - 1).clamp(min=0)
    for i, (layer, (k, v)) in enumerate(zip(cache.layers, rows.kv)):
        layer.keys, layer.values = k, v
        if rows.bufs and isinstance(layer, GrowingLayer):  # the forward appends into the joined buffers
            layer._kbuf, layer._vbuf = rows.bufs[i]
            layer._kview = layer.keys
    attn = torch.cat([rows.attn, mask], dim=1)
    out = G._forward(model, input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                     logits_to_keep=1, past_key_values=cache)
    stats.forward_calls += 1
    stats.prefill_calls += width > 1
    stats.input_tokens += int(mask.sum())
    return attn, rows.pos + mask.sum(-1), out.logits[:, -1, :]


def _field_end(tok, made: list[int]) -> tuple[str, str]:
    """(the field's text up to the stop, the part of it the cache has not seen: the last token's share)."""
    text = G.cut_at_stop(tok.decode(made, skip_special_tokens=True), [STOP])
    seen = tok.decode(made[:-1], skip_special_tokens=True)
    return text, text[len(seen):] if text.startswith(seen) else ""


def _uncached(model, tok, prompts, answers, n_choices, question_tokens, choice_tokens, batch_size, temperature,
              top_p, top_k, seed_for, greedy) -> list[str]:
    """The same fields through ``fill_mc_template`` and ``fedkt.generate`` (each field prefills again), for
    models whose KV cache rows cannot be moved between batches."""
    def complete(ps, max_new, stop, tag):
        sampled = tag not in greedy and temperature > 0
        return G.generate(model, tok, ps, max_new_tokens=max_new, batch_size=batch_size, do_sample=sampled,
                          temperature=temperature if sampled else 1.0, top_p=top_p, top_k=top_k,
                          seed=int(seed_for(tag)), stop=stop, desc=f"template {tag}")
    return fill_mc_template(complete, prompts, answers, n_choices, question_tokens, choice_tokens)


@torch.no_grad()
def fill_mc_template_cached(model, tok, prompts: Sequence[str], answers: Sequence[str | None] | None = None,
                            n_choices: int = 4, question_tokens: int = 64, choice_tokens: int = 24,
                            batch_size: int = 16, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                            seed_for: Callable[[str], int] = lambda tag: 0, greedy: Sequence[str] = (),
                            stats: FillStats | None = None) -> list[str]:
    """``fill_mc_template`` on a local model with one prefill per prompt (module docstring). Fields and
    tags as there (``"question"``, ``"choice-A"``, ..., ``"answer"``, the answer only for rows whose
    ``answers[i]`` is None; 3 tokens); sampled at ``temperature``/``top_p``/``top_k`` except the tags in
    ``greedy`` (every tag when ``temperature <= 0``). A model whose KV cache is not plain full-attention
layers (sliding window, static, quantised) takes the uncached path. Returns each filled template without its leading ``Question:``."""
    if not 1 <= n_choices <= len(LETTERS):
        raise ValueError(f"n_choices must be in 1..{len(LETTERS)}, got {n_choices}")
    prompts = list(prompts)
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = stats if stats is not None else FillStats()
    if not prompts:
        return []
    given = [None if answers is None else answers[j] for j in range(len(prompts))]
    fields = [("question", "", question_tokens)] + [(f"choice-{LETTERS[i]}", f"\n{LETTERS[i]}.", choice_tokens)
                                                     for i in range(n_choices)] + [("answer", "\nAnswer:", 3)]
    dev = G._device(model)
    gens = {tag: torch.Generator(device=dev).manual_seed(int(seed_for(tag))) for tag, _, _ in fields}
    samplers = {tag: (lambda lg: lg.argmax(-1)) if tag in greedy or temperature <= 0 else
                (lambda lg, g=gens[tag]: sample(lg, temperature, top_k, top_p, g)) for tag, _, _ in fields}
    eos = torch.tensor(G.eos_token_ids(model, tok), dtype=torch.long, device=dev)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else int(eos[0])
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    for i, r in enumerate(ids):
        if not r:
            if tok.bos_token_id is None:
                raise ValueError(f"prompt {i} is empty and the tokenizer has no BOS token to start from")
            ids[i] = [tok.bos_token_id]
    texts: list[list[str]] = [[] for _ in prompts]
    stats.field_tokens = [[] for _ in prompts]
    window = len(STOP) + G._STOP_WINDOW_SLACK
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    # a prefix every prompt shares (the augmentation prompts' system turn and instruction) runs once
    plen = G.shared_prefix_len(ids)
    prefix = None
    was_training = model.training
    model.eval()
    try:
        if plen >= G.MIN_SHARED_PREFIX:
            prefix = (G.prefix_cache(model, ids[0], plen, dev), plen)
            ids = [r[plen:] for r in ids]
            stats.forward_calls += 1
            stats.prefill_calls += 1
            stats.input_tokens += plen
            stats.shared_prefix_tokens = plen
        for b0 in range(0, len(order), batch_size):
            members = order[b0:b0 + batch_size]  # batch-local row j is prompt members[j]
            first = _prefill_batch(model, [ids[i] for i in members], pad_id, stats, prefix)
            if first is None:  # sliding-window, static or quantised caches: rows cannot be parked
                return _uncached(model, tok, prompts, answers, n_choices, question_tokens, choice_tokens,
                                 batch_size, temperature, top_p, top_k, seed_for, greedy)
            cache, attn, pos, logits = first
            rows = list(range(len(members)))
            tails: dict[int, str] = {}  # row -> the unseen end of its last field
            parked_groups: list[_Rows] = []
            for f, (tag, lead, limit) in enumerate(fields):
                if f > 0:  # every row has finished the previous field: put them back, feed the next label
                    cur = [r for r in rows if tag != "answer" or given[members[r]] is None]
                    if not cur:  # only the answer is left, and every row's letter is given
                        break
                    if len(cur) < len(rows):  # the answer, for the rows whose letter is not given
                        keep_r = set(cur)
                        for g in parked_groups:
                            sel = [j for j, r in enumerate(g.ids) if r in keep_r]
                            t = torch.tensor(sel, dtype=torch.long, device=dev)
                            g.ids, g.kv = [g.ids[j] for j in sel], [(k[t], v[t]) for k, v in g.kv]
                            g.attn, g.pos = g.attn[t], g.pos[t]
                        parked_groups = [g for g in parked_groups if g.ids]
                    parked = _join(parked_groups)
                    parked = _trim(parked)
                    chunks = [tok(tails[r] + lead, add_special_tokens=False)["input_ids"] for r in parked.ids]
                    attn, pos, logits = _feed(model, cache, parked, chunks, pad_id, stats)
                    rows = parked.ids
                live, made, gone = list(rows), [[] for _ in rows], [False] * len(rows)
                parked_groups = []
                while True:
                    # rows done with the field ride along (masked, no draw) until a quarter of the batch is done
                    fresh = [j for j in range(len(live)) if not gone[j]]
                    sel = None if len(fresh) == len(live) else torch.tensor(fresh, dtype=torch.long, device=dev)
                    nxt = samplers[tag](logits if sel is None else logits[sel])
                    done = torch.isin(nxt, eos).tolist()
                    toks = nxt.tolist()
                    for k, j in enumerate(fresh):
                        made[j].append(toks[k])
                    stats.new_tokens += len(fresh)
                    ends = tok.batch_decode([made[j][-window:] for j in fresh], skip_special_tokens=True)
                    for k, (j, tail) in enumerate(zip(fresh, ends)):
                        if not done[k] and STOP in tail:
                            done[k] = STOP in tok.decode(made[j], skip_special_tokens=True)
                        if len(made[j]) >= limit:
                            done[k] = True
                        if done[k]:
                            r = live[j]
                            text, tails[r] = _field_end(tok, made[j])
                            texts[members[r]].append(text)
                            stats.field_tokens[members[r]].append(len(made[j]))
                            gone[j] = True
                    n_gone = sum(gone)
                    if n_gone == len(live):
                        parked_groups.append(_take(cache, attn, pos, list(range(len(live))), live))
                        break
                    step = torch.full((len(live),), pad_id, dtype=torch.long, device=dev)
                    step[torch.tensor(fresh, dtype=torch.long, device=dev)] = nxt
                    if n_gone >= max(1, len(live) // RIDE_FRACTION):  # park the done rows; the cache keeps the others
                        parked_groups.append(_take(cache, attn, pos, [j for j in range(len(live)) if gone[j]], live))
                        keep = [j for j in range(len(live)) if not gone[j]]
                        t = torch.tensor(keep, dtype=torch.long, device=dev)
                        attn = compact(cache, attn, t, trim=True)  # the rows left, leading unused columns cut
                        live, made, gone = [live[j] for j in keep], [made[j] for j in keep], [False] * len(keep)
                        step, pos = step[t], pos[t]
                    col = torch.tensor([[not g] for g in gone], dtype=torch.long, device=dev)
                    attn = torch.cat([attn, col], dim=1)  # a riding row's column is masked
                    out = G._forward(model, input_ids=step[:, None], attention_mask=attn, position_ids=pos[:, None],
                                     past_key_values=cache, use_cache=True, logits_to_keep=1)
                    stats.forward_calls += 1
                    stats.input_tokens += len(live) - sum(gone)
                    logits, pos = out.logits[:, -1, :], pos + col[:, 0]  # a riding row keeps its position
    finally:
        model.train(was_training)
    out_texts = []
    for j, fs in enumerate(texts):
        body = " " + normalize(fs[0])
        for i in range(n_choices):
            body += f"\n{LETTERS[i]}. " + normalize(fs[1 + i])
        out_texts.append(body + "\nAnswer: " + (normalize(fs[-1]) if given[j] is None else str(given[j])))
    return out_texts
