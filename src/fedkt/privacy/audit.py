"""Audits of token-level text DP: what a server-side attacker recovers from perturbed prompts.

The attacker is the server: it knows the embedding matrix, the kit (the mechanism is public) and ε, and
sees the perturbed tokens one at a time (no language-model context). Three guesses of the original
token t from the observed token t' are scored, as the fraction of tokens recovered:

* ``recovery_nn1``: the nearest neighbour of t' in embedding space, i.e. t' itself (the InferDPT
  "embedding revision" attack with K = 1). It equals the fraction of tokens left unchanged.
* ``recovery_topk``: success when t is among the K nearest covered tokens of t' (same class, t'
  included), read from the kit's neighbour table: the InferDPT attack with K candidates, which
  reports protection as 1 - this rate.
* ``recovery_map``: the Bayes-optimal single guess under a uniform prior over the class's covered
  tokens, ``argmax_t P(t' | t)``, computed exactly from the kit in O(V N) (reverse neighbour lists
  scattered once per ε, plus the token with the smallest normaliser for the non-neighbour case).

Also reported: ``unchanged`` (fraction of tokens left as they were), ``in_neighbourhood`` (fraction of
outputs inside the original's top-N list: a utility proxy, how often the replacement is semantically
near) and ``mean_eps_per_prompt`` (n_tokens × ε averaged over prompts, basic composition).

``scan_for_canaries`` searches payloads (strings, or nested dicts/lists of strings as ledgered
messages hold) for planted canary strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from fedkt.privacy.text_dp import EmbeddingKit, neighbour_log_weights, sample_replacements
from fedkt.privacy.text_dp_frame import Segment, private_token_ids


def map_attack(kit: EmbeddingKit, observed: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Bayes-optimal guess of each original token given the observed output (uniform prior per class)."""
    observed = torch.as_tensor(observed, dtype=torch.long)
    if math.isinf(epsilon):
        return observed.clone()
    a = epsilon * kit.exponent_scale
    V, N = kit.vocab_size, kit.n_neighbors
    members, offsets, sizes = kit.class_members()
    cls = kit.token_class.long()
    logw_nb = neighbour_log_weights(kit, torch.arange(V), epsilon)
    log_z = torch.logaddexp(torch.log(sizes[cls].double()) - a, torch.logsumexp(logw_nb, dim=1))  # [V]
    # log P(t' | t) for t' in N(t) (u > -1); other outputs have log P = -a - log Z(t)
    valid = kit.covered[:, None] & (kit.utility > -1)
    pair = (a * kit.utility.double() - log_z[:, None]).masked_fill(~valid, -math.inf)
    target = kit.neighbors.long()
    best = torch.full((V,), -math.inf, dtype=torch.float64).scatter_reduce(
        0, target.flatten(), pair.flatten(), reduce="amax")
    hit = valid & (pair == best[target])
    src = torch.arange(V)[:, None].expand(V, N)
    best_src = torch.full((V,), -1, dtype=torch.long).scatter_reduce(0, target[hit], src[hit], reduce="amax")
    # best original among non-reverse-neighbours: the covered token of the class with the smallest Z
    n_cls = len(sizes)
    far_tok = torch.empty(n_cls, dtype=torch.long)
    far_score = torch.empty(n_cls, dtype=torch.float64)
    for k in range(n_cls):
        grp = members[offsets[k]: offsets[k] + sizes[k]]
        j = int(torch.argmin(log_z[grp]))
        far_tok[k], far_score[k] = grp[j], -a - log_z[grp[j]]
    k_obs = cls[observed]
    use_rev = (best[observed] >= far_score[k_obs]) & (best_src[observed] >= 0)
    return torch.where(use_rev, best_src[observed], far_tok[k_obs])


def text_dp_audit(texts: Sequence[str | Sequence[Segment]], kit: EmbeddingKit, tok,
                  epsilons: Iterable[float] = (1, 3, 6, 10, math.inf), seed: int = 0, top_k: int = 10) -> list[dict[str, Any]]:
    """One row per ε: recovery rates of the attackers above, unchanged fraction, mean ε per prompt.

    ``texts``: plain strings (every token private) or FedCoT's framed prompts (segment lists: only the
    private segments' tokens are perturbed, scored and charged, as the client perturbs them; the public
    frame is sent verbatim and is not a secret to recover)."""
    if isinstance(texts, str):
        raise TypeError("text_dp_audit takes a list of prompts")
    if not 1 <= top_k <= kit.n_neighbors:
        raise ValueError(f"top_k must be in [1, {kit.n_neighbors}] (the kit's N), got {top_k}")
    ids = private_token_ids(texts, tok)
    flat = torch.tensor([i for x in ids for i in x], dtype=torch.long)
    n_tok = [len(x) for x in ids]
    rows = []
    for i, eps in enumerate(epsilons):
        eps = float(eps)
        new = sample_replacements(flat, kit, eps, torch.Generator().manual_seed(seed * 1000 + i))
        same = new == flat
        topk = (kit.neighbors[new, :top_k].long() == flat[:, None]).any(dim=1)
        near = (kit.neighbors[flat].long() == new[:, None]).any(dim=1)
        guess = map_attack(kit, new, eps)
        n = max(len(flat), 1)
        rows.append({
            "epsilon": eps, "n_texts": len(ids), "n_tokens": int(len(flat)),
            "unchanged": float(same.sum()) / n,
            "recovery_nn1": float(same.sum()) / n,
            "top_k": top_k, "recovery_topk": float(topk.sum()) / n,
            "recovery_map": float((guess == flat).sum()) / n,
            "in_neighbourhood": float(near.sum()) / n,
            "mean_eps_per_prompt": (sum(n_tok) * eps / len(ids)) if ids and sum(n_tok) else 0.0,
        })
    return rows


def _fmt_eps(e: float) -> str:
    return "∞" if math.isinf(e) else f"{e:g}"


def render_audit_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of ``text_dp_audit`` rows (rates in percent)."""
    k = rows[0]["top_k"] if rows else 10
    head = ("| ε per token | mean ε per prompt | tokens unchanged | recovered: NN@1 | "
            f"recovered: NN@{k} | recovered: MAP | protection (1 − NN@{k}) | output in top-N |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        mp = r["mean_eps_per_prompt"]
        lines.append(
            f"| {_fmt_eps(r['epsilon'])} | {'∞' if math.isinf(mp) else f'{mp:.0f}'} | {100 * r['unchanged']:.1f}% | "
            f"{100 * r['recovery_nn1']:.1f}% | {100 * r['recovery_topk']:.1f}% | {100 * r['recovery_map']:.1f}% | "
            f"{100 * (1 - r['recovery_topk']):.1f}% | {100 * r['in_neighbourhood']:.1f}% |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CanaryHit:
    location: str  # "3" for the 4th text of a list; "clients.0.prompts[2]" in nested payloads
    canary: str
    start: int  # character offset in that text
    context: str  # up to 20 characters either side


def _flatten(payload: Any, path: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(payload, str):
        yield path, payload
    elif isinstance(payload, dict):
        for key, value in payload.items():
            yield from _flatten(value, f"{path}.{key}" if path else str(key))
    elif isinstance(payload, (list, tuple)):
        for i, value in enumerate(payload):
            yield from _flatten(value, f"{path}[{i}]" if path else str(i))


def scan_for_canaries(payload_texts: Any, canaries: Iterable[str], case_sensitive: bool = False) -> list[CanaryHit]:
    """Every occurrence of every canary in the payload texts (a list of strings, or nested dicts/lists
    of strings such as ledgered messages); non-string leaves are ignored."""
    canaries = list(canaries)
    if any(not isinstance(c, str) or not c for c in canaries):
        raise ValueError("canaries must be non-empty strings")
    hits = []
    for location, text in _flatten(payload_texts):
        hay = text if case_sensitive else text.casefold()
        for canary in canaries:
            needle = canary if case_sensitive else canary.casefold()
            start = hay.find(needle)
            while start >= 0:
                hits.append(CanaryHit(location, canary, start, text[max(0, start - 20): start + len(canary) + 20]))
                start = hay.find(needle, start + 1)
    return hits
