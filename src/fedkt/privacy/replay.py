"""The replay attack on text DP: what a server that knows a client's sampler seed recovers.

FedCoT's exponential mechanism is DP only while its random draws are secret. A server that knows the
seed (in simulation it is derived from the experiment seed, which the server holds) regenerates every
uniform the client drew and can (1) reproduce the perturbation of any candidate original exactly, and
(2) for each observed token, list the input tokens that would have produced it with those very draws
(:func:`replay_candidates`). Against a client that draws from its OS CSPRNG
(``fedkt.privacy.randomness.SecureRandom``) the same replay matches only by chance.
``tests/test_replay.py`` measures both modes; docs/privacy.md reports the numbers.
"""

from __future__ import annotations

import math

import torch

from fedkt.privacy.text_dp import EmbeddingKit, neighbour_log_weights


def token_match(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of token positions where two perturbations of the same prompts agree."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def chance_match(kit: EmbeddingKit, ids: list[int], epsilon: float) -> float:
    """E[match] of two independent draws: the mean over positions of Σ_t' P(t'|t)²."""
    cache: dict[int, float] = {}
    for t in ids:
        if t not in cache:
            cache[t] = float((kit.transition_probs(t, epsilon) ** 2).sum())
    return sum(cache[t] for t in ids) / max(1, len(ids))


def _draws(seed: int, T: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniforms ``sample_replacements`` draws for a batch of T tokens with this seed."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((T, N + 1), generator=g, dtype=torch.float64)
    return u, torch.rand((T,), generator=g, dtype=torch.float64)


def replay_candidates(kit: EmbeddingKit, epsilon: float, seed: int, observed: list[int]) -> list[torch.Tensor]:
    """For each position of the flat batch ``observed`` (the perturbed ids of every prompt, in order): the
    covered input tokens that, with the seed's draws at that position, produce the observed token."""
    members, offsets, sizes = kit.class_members()
    cand = members  # every covered token is a possible input
    k = kit.token_class[cand].long()
    logw = torch.cat([neighbour_log_weights(kit, cand, epsilon),
                      (torch.log(sizes[k].double()) - epsilon * kit.exponent_scale)[:, None]], dim=1)
    nb = kit.neighbors[cand].long()
    u, uni = _draws(seed, len(observed), kit.n_neighbors)
    out = []
    for i, obs in enumerate(observed):
        choice = torch.argmax(logw - torch.log(-torch.log(u[i])), dim=1)
        tail = members[offsets[k] + (uni[i] * sizes[k]).long().clamp_max(sizes[k] - 1)]
        picked = torch.gather(nb, 1, choice.clamp_max(kit.n_neighbors - 1)[:, None]).squeeze(1)
        produced = torch.where(choice == kit.n_neighbors, tail, picked)
        out.append(cand[produced == obs])
    return out


def replay_recovery(kit: EmbeddingKit, epsilon: float, seed: int, original: list[int], observed: list[int]) -> dict:
    """Token recovery of the replay attacker who guesses uniformly among the consistent inputs:
    ``recovered`` = mean of [true ∈ S] / |S|; ``unique`` = fraction of positions where S = {true}."""
    if math.isinf(epsilon):
        return {"recovered": 1.0, "unique": 1.0, "consistent": 1.0}
    sets = replay_candidates(kit, epsilon, seed, observed)
    rec = [(1.0 / len(s)) if bool((s == t).any()) else 0.0 for s, t in zip(sets, original)]
    uniq = [len(s) == 1 and int(s[0]) == t for s, t in zip(sets, original)]
    cons = [bool((s == t).any()) for s, t in zip(sets, original)]
    n = max(1, len(original))
    return {"recovered": sum(rec) / n, "unique": sum(uniq) / n, "consistent": sum(cons) / n}
