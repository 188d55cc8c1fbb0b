"""Splitting training data over clients, and holding out the server's auxiliary set. All seeded."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

import numpy as np

from fedkt.data.tasks import Example


def subsample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """A seeded subsample of ``n`` examples in original order (all of them when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    idx = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in idx]


def split_aux(examples: Sequence[Example], aux_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold ``aux_size`` examples out as the server's public auxiliary set; returns (rest, aux)."""
    if aux_size < 0 or aux_size >= len(examples):
        raise ValueError(f"partition.aux_size = {aux_size} must be in [0, {len(examples) - 1}] for "
                         f"{len(examples)} training examples")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    aux_idx = set(order[:aux_size])
    rest = [e for i, e in enumerate(examples) if i not in aux_idx]
    aux = [e for i, e in enumerate(examples) if i in aux_idx]
    return rest, aux


def _key(ex: Example, key: str):
    if key == "answer":
        return ex.answer
    if key == "task":
        return ex.task
    raise ValueError(f"partition.key = {key!r} is not supported; allowed values: 'answer', 'task'")


def partition(examples: Sequence[Example], num_clients: int, scheme: str = "iid", seed: int = 0,
              alpha: float = 0.5, key: str = "answer") -> list[list[Example]]:
    """Split ``examples`` over ``num_clients``: disjoint, complete, deterministic given the seed.

    * ``iid``: a seeded shuffle cut into near-equal shares.
    * ``dirichlet``: for every value of ``key`` the examples carrying it are shared out by proportions
      drawn from Dirichlet(alpha); redrawn (seeded) until every client has at least one example.
    """
    n = len(examples)
    if num_clients <= 0:
        raise ValueError("num_clients must be > 0")
    if n < num_clients:
        raise ValueError(f"cannot split {n} examples over {num_clients} clients")
    if scheme == "iid":
        order = list(range(n))
        random.Random(seed).shuffle(order)
        shares = np.array_split(np.array(order), num_clients)
        return [[examples[i] for i in sorted(s.tolist())] for s in shares]
    if scheme == "dirichlet":
        groups: dict = defaultdict(list)
        for i, ex in enumerate(examples):
            groups[_key(ex, key)].append(i)
        rng = np.random.default_rng(seed)
        for _attempt in range(100):
            buckets: list[list[int]] = [[] for _ in range(num_clients)]
            for value in sorted(groups, key=str):
                idx = np.array(groups[value])
                rng.shuffle(idx)
                p = rng.dirichlet([alpha] * num_clients)
                cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
                for c, part in enumerate(np.split(idx, cuts)):
                    buckets[c].extend(part.tolist())
            if min(len(b) for b in buckets) > 0:
                return [[examples[i] for i in sorted(b)] for b in buckets]
        raise ValueError(f"Dirichlet(alpha={alpha}) left a client empty in 100 draws; raise partition.alpha")
    raise ValueError(f"partition.scheme = {scheme!r}; allowed values: 'iid', 'dirichlet', 'files'")
