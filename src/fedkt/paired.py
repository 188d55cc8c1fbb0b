"""Paired statistics for comparing two methods on the same questions.

Two methods scored on the same evaluation questions are *paired*: per question, each is right or wrong.
The difference of their accuracies is the mean of per-question differences (1, 0 or -1), and its
uncertainty comes from resampling *questions* (the paired bootstrap), not from two independent
binomials — which would be far too wide when both methods get the same questions right.

- :func:`paired_bootstrap`: the accuracy difference with a percentile bootstrap confidence interval;
- :func:`mcnemar_p`: McNemar's exact test (two-sided binomial test on the discordant questions);
- :func:`clustered_mcnemar_p`: its version for per-question fractions (see below);
- :func:`compare`: both, for two ``{question id: correct}`` maps (they must hold the same ids);
- :func:`pool`: the same over several seeds (runs): the bootstrap resamples questions within each run
  (stratified), McNemar counts the discordant pairs of all runs.

A side may also score a question with a fraction in [0, 1] instead of 0/1 (e.g. the share of Standalone's
clients that get it right): the difference is then the mean of the per-question differences d, the bootstrap
resamples them the same way, ``a_only``/``b_only`` count the questions with d > 0 / d < 0, and the p-value is
McNemar's test for clustered matched pairs (:func:`clustered_mcnemar_p`; Durkalski et al. 2003, the questions
as clusters, the clients as their members): X² = (Σ d)² / Σ d², χ² with 1 degree of freedom — for 0/1
answers exactly McNemar's (a − b)² / (a + b). (A sign test would test the median, not the mean: with one
side a fraction it rejects when both sides have the same accuracy.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    diff: float
    """Accuracy of A minus accuracy of B (a fraction, e.g. 0.02 = 2 points)."""
    ci_low: float
    ci_high: float
    p_mcnemar: float
    n: int
    """Questions (summed over runs when pooled)."""
    a_only: int
    """Questions A gets right and B wrong."""
    b_only: int
    runs: int = 1
    test: str = "mcnemar_exact"
    """How ``p_mcnemar`` was computed: "mcnemar_exact" (0/1 answers), "mcnemar_clustered" (fractions)."""

    def as_dict(self) -> dict:
        return asdict(self)

    def significant(self) -> bool:
        """The confidence interval excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value for ``a_only`` vs ``b_only`` discordant questions."""
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only} and {b_only}")
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    total, c = 0, 1  # sum of C(n, i) for i <= k, each term from the last (exact integers)
    for i in range(k + 1):
        total += c
        c = c * (n - i) // (i + 1)
    return min(1.0, 2 * (total / 2 ** n))


def clustered_mcnemar_p(diffs: Sequence[np.ndarray]) -> float:
    """McNemar's test for clustered matched pairs (Durkalski, Palesch, Lipsitz & Rust 2003) from the
    per-question differences ``d`` of all strata: X² = (Σ d)² / Σ d², p = P(χ²₁ > X²)."""
    total = float(sum(d.sum() for d in diffs))
    squares = float(sum((d * d).sum() for d in diffs))
    if squares == 0:
        return 1.0
    return math.erfc(math.sqrt(total * total / squares / 2))


def _as_arrays(runs: Sequence[tuple[Sequence[float], Sequence[float]]]) -> list[np.ndarray]:
    out = []
    for i, (a, b) in enumerate(runs):
        if len(a) != len(b):
            raise ValueError(f"run {i}: {len(a)} answers of A but {len(b)} of B: a paired comparison needs the "
                             "same questions")
        if len(a) == 0:
            raise ValueError(f"run {i}: no questions to compare")
        out.append(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return out


def _bootstrap(diffs: list[np.ndarray], n_boot: int, seed: int, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    total = sum(len(d) for d in diffs)
    sums = np.zeros(n_boot)
    for d in diffs:  # stratified: each run's questions are resampled within that run
        # drawing len(d) questions with replacement and summing their differences is drawing how often each
        # distinct difference comes up (a multinomial over its frequencies): the same distribution, at a cost
        # of n_boot x (distinct values: 3 for 0/1 answers) instead of n_boot x questions
        values, counts = np.unique(d, return_counts=True)
        sums += rng.multinomial(len(d), counts / len(d), size=n_boot) @ values
    means = sums / total
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def pool(runs: Sequence[tuple[Sequence[bool], Sequence[bool]]], n_boot: int = 10_000, seed: int = 0,
         level: float = 0.95) -> PairedDifference:
    """Paired difference of A and B over one or more runs (strata), each a pair of per-question correctness
    lists (0/1, or fractions in [0, 1]) in the same question order."""
    if not runs:
        raise ValueError("no runs to compare")
    diffs = _as_arrays(runs)
    n = sum(len(d) for d in diffs)
    a_only = int(sum((d > 0).sum() for d in diffs))
    b_only = int(sum((d < 0).sum() for d in diffs))
    lo, hi = _bootstrap(diffs, n_boot, seed, level)
    diff = float(sum(d.sum() for d in diffs)) / n  # = (a_only - b_only) / n for 0/1 answers
    binary = all(np.isin(np.asarray(x, dtype=np.float64), (0.0, 1.0)).all() for run in runs for x in run)
    p = mcnemar_p(a_only, b_only) if binary else clustered_mcnemar_p(diffs)
    return PairedDifference(diff=diff, ci_low=lo, ci_high=hi, p_mcnemar=p, n=n, a_only=a_only, b_only=b_only,
                            runs=len(diffs), test="mcnemar_exact" if binary else "mcnemar_clustered")


def paired_bootstrap(a: Sequence[bool], b: Sequence[bool], n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> PairedDifference:
    """Paired difference of A and B on one set of questions (same order)."""
    return pool([(a, b)], n_boot=n_boot, seed=seed, level=level)


def align(a: Mapping[str, bool], b: Mapping[str, bool]) -> tuple[list[bool], list[bool]]:
    """The two correctness maps as lists over their common question ids, refusing different question sets."""
    if a.keys() != b.keys():
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"the two methods were scored on different questions ({len(only_a)} only in A, e.g. "
                         f"{only_a[:3]}; {len(only_b)} only in B, e.g. {only_b[:3]}): compare runs with the same "
                         "data and eval settings")
    ids = sorted(a)
    return [bool(a[i]) for i in ids], [bool(b[i]) for i in ids]


def compare(a: Mapping[str, bool], b: Mapping[str, bool], **kw) -> PairedDifference:
    """Paired difference of two ``{question id: correct}`` maps of the same questions."""
    return paired_bootstrap(*align(a, b), **kw)
