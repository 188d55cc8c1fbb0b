"""Text DP over a public frame: only the client's own text is perturbed and charged to ε.

A FedCoT prompt is a *public template* filled with *private text*::

    Question:| Which gas do plants take in?|\\nChoices:| (A)| oxygen| (B)| carbon dioxide
    public   | private                       | public    |public| private|public| private

The template tokens ("Question:", "\\nChoices:", the choice labels " (A)", " (B)", ...) are the same for
every client and every question of the task: the server knows them already (it wrote the protocol), so
they carry no private information and perturbing them only destroys the frame the LLM reads. A prompt is
therefore a list of segments ``(text, private)``; each segment is tokenised on its own, the private
tokens go through the exponential mechanism (``text_dp.sample_replacements``), the public ones pass
verbatim, and the prompt is charged ``ε`` per *private* token only. What the frame discloses: the task's
template and the number of choices (both public by the protocol), and, as for any prompt, the number of
tokens of each private segment (docs/text-dp.md, "Limits").

Two mechanisms (``fedcot.mechanism``):

* ``"exponential"``: every private token gets the same ε; a prompt with n private tokens costs n·ε.
* ``"adaptive"`` (the Adaptive Exponential Mechanism, fedkt's reading of the FedCoT paper's second
  strategy): the client's budget for its P prompts is the same as the exponential mechanism's,
  E = ε · Σᵢ nᵢ, but it is spread so that **every prompt costs the same**, E / P = ε · n̄: prompt i's
  private tokens each get εᵢ = ε · n̄ / nᵢ. Short prompts keep more of their words, long prompts are
  perturbed harder, and the worst prompt's ε falls from ε · max nᵢ to ε · n̄. The allocation depends only
  on the token counts nᵢ, which the mechanism discloses anyway (the perturbed prompt has nᵢ private
  tokens), so it spends no extra privacy; each token is εᵢ-DP as in ``text_dp``, and a prompt is
  (nᵢ · εᵢ = ε · n̄)-DP by basic composition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fedkt.privacy.text_dp import _check_epsilon, sample_replacements
from fedkt.privacy.text_dp_kit import EmbeddingKit

MECHANISMS = ("exponential", "adaptive")

Segment = tuple[str, bool]
"""(text, private): one piece of a prompt; public pieces pass unperturbed and cost nothing."""


@dataclass
class FramedResult:
    """The perturbed prompt (``text``: what leaves the client) and its accounting."""

    text: str
    n_tokens: int  # private (charged) tokens
    n_public: int  # template tokens passed verbatim, not charged
    n_changed: int
    epsilon_per_token: float  # the ε each private token of this prompt got
    epsilon_total: float  # n_tokens · epsilon_per_token (basic composition); 0 without private tokens


def token_epsilons(n_private: Sequence[int], epsilon: float, mechanism: str = "exponential") -> list[float]:
    """ε per private token for each prompt: ``epsilon`` for all (exponential), or ε · n̄ / nᵢ (adaptive,
    n̄ the mean private length over the prompts that have any). Prompts without private tokens get
    ``epsilon`` (they spend nothing)."""
    epsilon = _check_epsilon(epsilon)
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if mechanism == "exponential" or math.isinf(epsilon):
        return [epsilon] * len(n_private)
    counted = [n for n in n_private if n > 0]
    mean = sum(counted) / len(counted) if counted else 0.0
    return [epsilon * mean / n if n > 0 else epsilon for n in n_private]


def tokenize_segments(prompts: Sequence[Sequence[Segment]], tok) -> tuple[list[list[int]], list[list[bool]]]:
    """Each prompt's token ids and, per token, whether it is private: every segment tokenised on its own
    (so the frame's tokens are the same in every prompt), as :func:`perturb_framed` perturbs them."""
    texts = [s for p in prompts for s, _ in p]
    enc = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids: list[list[int]] = []
    private: list[list[bool]] = []
    i = 0
    for p in prompts:
        row, mask = [], []
        for _, priv in p:
            row += list(enc[i])
            mask += [priv] * len(enc[i])
            i += 1
        ids.append(row)
        private.append(mask)
    return ids, private


def private_token_ids(prompts: Sequence[str | Sequence[Segment]], tok) -> list[list[int]]:
    """The tokens text DP perturbs and charges, per prompt: a plain string is private as a whole; a
    segment list keeps its private segments' tokens only (the frame passes verbatim)."""
    framed = [[(p, True)] if isinstance(p, str) else list(p) for p in prompts]
    ids, private = tokenize_segments(framed, tok)
    return [[t for t, pv in zip(r, m) if pv] for r, m in zip(ids, private)]


def perturb_framed(prompts: Sequence[Sequence[Segment]], kit: EmbeddingKit | None, tok, epsilon: float,
                   seed, mechanism: str = "exponential") -> list[FramedResult]:
    """Perturb the private segments of every prompt (one vectorised draw for the batch); public segments
    pass verbatim. ε = ∞ returns every prompt verbatim (``kit`` may then be None)."""
    ids, private = tokenize_segments(prompts, tok)
    n_priv = [sum(m) for m in private]
    eps = token_epsilons(n_priv, epsilon, mechanism)
    if math.isinf(_check_epsilon(epsilon)):
        return [FramedResult("".join(s for s, _ in p), n, len(r) - n, 0, math.inf, math.inf if n else 0.0)
                for p, r, n in zip(prompts, ids, n_priv)]
    flat = torch.tensor([t for r, m in zip(ids, private) for t, pv in zip(r, m) if pv], dtype=torch.long)
    per_tok = torch.tensor([e for e, n in zip(eps, n_priv) for _ in range(n)], dtype=torch.float64)
    new = sample_replacements(flat, kit, per_tok if mechanism == "adaptive" else epsilon, seed).tolist()
    out, j = [], 0
    for r, m, n, e in zip(ids, private, n_priv, eps):
        row = []
        changed = 0
        for t, pv in zip(r, m):
            if pv:
                changed += int(new[j] != t)
                row.append(new[j])
                j += 1
            else:
                row.append(t)
        text = tok.decode(row, clean_up_tokenization_spaces=False)
        out.append(FramedResult(text, n, len(r) - n, changed, e, n * e))
    return out
