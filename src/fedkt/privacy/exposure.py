"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"): how far up an attacker's ranking a planted
secret comes.

A canary is a sentence with a secret drawn uniformly from N candidates (``"... record 4471 ..."`` with the
number drawn from N random 4-digit numbers) planted in a client's private data. The attacker scores every
candidate (higher = more likely to be the planted one) from what the server received; with ``rank`` the
1-based position of the true canary,

    exposure = log2(N) - log2(rank).

Ties are split: rank = 1 + #(candidates scored higher) + #(other candidates scored equal) / 2, so an
attacker with no information (all scores equal) gets rank (N + 1) / 2.

**Baselines, precisely.** The maximum is log2 N (rank 1). An attacker with no information ranks the true
canary uniformly on 1..N, and then

    E[exposure] = log2 N - log2(N!) / N  ->  log2 e ~ 1.44   (Stirling; 1.436 at N = 1000, 1.417 at N = 200),

and P(exposure >= x) = floor(N 2^-x) / N ~ 2^-x: exposure x is as surprising as a coin coming up heads x
times in a row. An attacker whose scores are all *equal* (exactly no information) gets the tied rank
(N + 1) / 2, i.e. exposure log2(2N / (N + 1)) ~ 1.0: both 1.0 (ties) and 1.44 (random order) are
no-information levels. So "near the random baseline" means an average near 1.44, not near log2 N; a single
canary's exposure has a wide spread (sd ~1.44 bits), so one reports the mean over several canaries.

Scorers here: ``NGramModel`` (a token n-gram fit on the texts the server received: FDKT's synthetic
data) and ``channel_scores`` (the exact text-DP channel likelihood of FedCoT's perturbed prompt under
each candidate). The adapter membership attack is in ``fedkt.privacy.membership``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Sequence

import torch

from fedkt.privacy.attacks_text import ChannelModel
from fedkt.privacy.text_dp import sample_replacements


def exposure(rank: float, n: int) -> float:
    """log2(n) - log2(rank), rank 1-based (1 <= rank <= n)."""
    if n < 1 or not 1 <= rank <= n:
        raise ValueError(f"rank must be in [1, n] with n >= 1, got rank={rank}, n={n}")
    return math.log2(n) - math.log2(rank)


def rank_of(true_score: float, other_scores: Sequence[float] | torch.Tensor) -> float:
    """1-based rank of the true candidate among itself + ``other_scores`` (higher score ranks first;
    ties with other candidates count half)."""
    o = torch.as_tensor(other_scores, dtype=torch.float64)
    t = torch.tensor(float(true_score), dtype=torch.float64)
    return 1.0 + float((o > t).sum()) + 0.5 * float((o == t).sum())


def exposure_of_scores(scores: Sequence[float] | torch.Tensor, true_index: int = 0) -> float:
    """Exposure of candidate ``true_index`` given every candidate's score (the true one included)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    others = torch.cat([s[:true_index], s[true_index + 1:]])
    return exposure(rank_of(float(s[true_index]), others), len(s))


def random_baseline(n: int) -> float:
    """Expected exposure of a uniformly random rank: log2 n - log2(n!)/n (-> log2 e as n grows)."""
    return math.log2(n) - math.lgamma(n + 1) / math.log(2) / n


def secret_candidates(n: int, seed: int, digits: int = 4) -> list[str]:
    """n distinct random secrets of ``digits`` digits (the first is the planted one)."""
    space = 9 * 10 ** (digits - 1)
    if n > space:
        raise ValueError(f"{n} candidates asked from a space of {space} {digits}-digit numbers")
    rng = random.Random(seed)
    return [str(10 ** (digits - 1) + x) for x in rng.sample(range(space), n)]


# ------------------------------------------------------------------------------------- n-gram attacker


class NGramModel:
    """Token n-gram model with Jelinek-Mercer interpolation of orders 1..n (add-one unigram), fit on the
    texts an attacker received; ``score`` is a sequence's log-likelihood."""

    def __init__(self, sequences: Sequence[Sequence[int]], n: int = 4, vocab_size: int | None = None,
                 lam: float = 0.7):
        self.n, self.lam = n, lam
        self.counts = [Counter() for _ in range(n + 1)]  # order k: counts of k-grams
        for seq in sequences:
            s = list(seq)
            for k in range(1, n + 1):
                for i in range(len(s) - k + 1):
                    self.counts[k][tuple(s[i: i + k])] += 1
        self.total = sum(self.counts[1].values())
        self.vocab = vocab_size or max(1, len(self.counts[1]))

    def prob(self, context: tuple[int, ...], token: int) -> float:
        p = (self.counts[1][(token,)] + 1) / (self.total + self.vocab)
        for k in range(1, min(self.n, len(context) + 1)):
            ctx = context[len(context) - k:]
            denom = self.counts[k][ctx]
            if denom:
                p = self.lam * self.counts[k + 1][ctx + (token,)] / denom + (1 - self.lam) * p
        return p

    def score(self, seq: Sequence[int], start: int = 0) -> float:
        """log P(seq[start:] | seq[:start]) under the model."""
        s = list(seq)
        return sum(math.log(self.prob(tuple(s[max(0, i - self.n + 1): i]), s[i])) for i in range(start, len(s)))


def ngram_exposure(received_texts: Sequence[str], tok, template: str, candidates: Sequence[str],
                   n: int = 4) -> float:
    """Exposure of ``candidates[0]`` (the planted secret) when the attacker fits an n-gram model on the
    received texts and scores ``template.format(secret=c)`` for every candidate."""
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in received_texts]
    lm = NGramModel(seqs, n=n, vocab_size=len(tok))
    prefix = len(tok(template.split("{secret}")[0], add_special_tokens=False)["input_ids"])
    scores = [lm.score(tok(template.format(secret=c), add_special_tokens=False)["input_ids"], start=prefix)
              for c in candidates]
    return exposure_of_scores(scores, 0)


# --------------------------------------------------------------------------------- text-DP attacker


def channel_scores(kit, tok, observed: Sequence[int], texts: Sequence[str], epsilon: float, ch=None) -> torch.Tensor:
    """log P(observed | text) under the text-DP mechanism for each candidate original text: exact, the sum
    of the per-token channel log-probabilities; -inf for a candidate whose token count differs."""
    ch = ch if ch is not None else ChannelModel(kit, epsilon)
    obs = torch.tensor(list(observed), dtype=torch.long)
    out = torch.full((len(texts),), -math.inf, dtype=torch.float64)
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    same = [i for i, x in enumerate(ids) if len(x) == len(obs)]
    if same:
        c = torch.tensor([ids[i] for i in same], dtype=torch.long)  # [S, T]
        lp = ch.logprob(obs[:, None].expand(len(obs), len(same)), c.T[..., None]).squeeze(-1)  # [T, S]
        out[same] = lp.sum(0)
    return out


def text_dp_exposure(kit, tok, template: str, candidates: Sequence[str], epsilon: float,
                     seed: int) -> float:
    """Perturb ``template`` with the planted secret ``candidates[0]`` at ε and rank every candidate by the
    exact channel likelihood of what the server received (the Bayes-optimal attacker for a uniform secret)."""
    ids = torch.tensor(tok(template.format(secret=candidates[0]), add_special_tokens=False)["input_ids"])
    obs = sample_replacements(ids, kit, epsilon, torch.Generator().manual_seed(seed))
    return exposure_of_scores(channel_scores(kit, tok, obs.tolist(), [template.format(secret=c) for c in candidates],
                                             epsilon), 0)
