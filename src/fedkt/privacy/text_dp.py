"""Token-level text differential privacy: the exponential mechanism over the server LLM's token embeddings.

FedCoT clients perturb a private prompt before the server LLM sees it (InferDPT / RANTEXT style): every
token ``t`` of the prompt is replaced by a token ``t'`` drawn with probability

    P(t' | t) = exp(c * eps * u(t, t') / du) / Z(t),      t' ranging over the covered tokens of t's class,

where ``u`` is a similarity computed from the server LLM's *public* input embeddings. The pieces:

**Utility and sensitivity.** Two utilities, both in ``[-1, 0]`` for every pair, so ``du = 1``:

* ``rank`` (default): ``u(t, t_j) = -j / N`` for ``t_j`` the j-th nearest token of ``t`` by euclidean
  distance (``t_0 = t``, j < N), ``-1`` for every other token. Every token's utilities are then the
  same multiset, so ``Z(t)`` is the same for all covered tokens, the likelihood ratio between two inputs
  is the numerator's alone, at most ``exp(eps * du)``, and ``c = 1`` gives ``eps``-DP.
* ``distance``: ``u(t, t') = -min(||e_t - e_t'|| / r(t), 1)`` with ``r(t)`` the distance to the
  (N+1)-th nearest token (so every token outside the top-N table has u = -1 exactly: the table is exact,
  not a truncation). ``Z(t)`` varies, so the textbook ``c = 1/2`` is needed: ``exp(eps/2)`` from the
  numerator times at most ``exp(eps/2)`` from the normalisers.

Either way the mechanism is ``eps``-DP for one token, between *any* two tokens of the same class (pure
DP, no delta), and a prompt of ``n`` tokens costs ``n * eps`` under basic composition. Why rank is the
default: SmolLM2's embeddings live in 576 dimensions where distances concentrate (a token's nearest
neighbour is on average at 77% of the distance to its 65th), so the distance utility hardly tells
neighbours from the rest and the mechanism degenerates into "keep the token or draw uniformly" (the
benchmark measures this). The rank utility keeps the euclidean neighbour order and spreads it over
``[-1, 0]``, so replacements are mostly near synonyms (" signify" -> " signifies", " Paris" -> " London").

**Output range, and why the top-N table suffices.** The output range is the *whole* covered vocabulary
of the token's class, not just its N neighbours: an input-dependent candidate set (what InferDPT's
reference code does) gives outputs that are impossible under one input and possible under another, an
unbounded privacy loss. We sample the full-vocabulary distribution exactly in O(N) per token by writing
each weight as ``w(t, t') = e^{-a} + [t' in N(t)] * (e^{a u(t,t')} - e^{-a})`` with ``a = c * eps``:
with probability ``|C| e^{-a} / Z`` draw uniformly from the class, else draw a neighbour with weight
``e^{a u} - e^{-a} >= 0``. All tokens of a batch are drawn at once with the Gumbel-max trick.

**Randomness.** The seed must be secret to the client. Anyone who knows the seed can replay the sampler
and test which original produces the observed output, which voids the guarantee: never derive it from a
config the server sees. ``seed`` may be an int or torch.Generator (simulation, tests), a
``fedkt.privacy.randomness.PinnedRandom`` (a client's pinned ≥ 64-bit secret) or a ``SecureRandom``
(the OS CSPRNG: what a deployed client uses by default).

The kit (:class:`~fedkt.privacy.text_dp_kit.EmbeddingKit`: N, classes, coverage, the neighbour search, its
files) is built in :mod:`fedkt.privacy.text_dp_kit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fedkt.privacy.text_dp_kit import EmbeddingKit

# ------------------------------------------------------------------------------------------ sampling


def _generator(seed):
    """A torch.Generator, or the client's CSPRNG source (``fedkt.privacy.randomness.SecureRandom``)."""
    if isinstance(seed, torch.Generator) or hasattr(seed, "rand"):
        return seed
    if hasattr(seed, "generator"):  # PinnedRandom: a 64-bit seeded generator
        return seed.generator()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a torch.Generator or a fedkt.privacy.randomness source "
                        f"(client-secret), got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def _uniform(g, shape) -> torch.Tensor:
    if isinstance(g, torch.Generator):
        return torch.rand(shape, generator=g, dtype=torch.float64)
    return g.rand(shape)


def _check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be >= 0 (or inf for no perturbation), got {epsilon}")
    return epsilon


def neighbour_log_weights(kit: EmbeddingKit, ids: torch.Tensor, epsilon: float | torch.Tensor) -> torch.Tensor:
    """log(e^{a u} - e^{-a}) [T, N] float64 (a = eps * kit.exponent_scale): the neighbour component of the
    mixture; -inf for padded entries (u = -1) and for uncovered input tokens. ``epsilon`` is one float or
    a [T] tensor (one ε per token: the adaptive mechanism, ``text_dp_frame``)."""
    a = epsilon * kit.exponent_scale
    if isinstance(a, torch.Tensor):
        a = a.double()[:, None]
    u = kit.utility[ids].double()
    logw = a * u + torch.log1p(-torch.exp(-a * (1.0 + u)))
    logw[~kit.covered[ids]] = -math.inf
    return logw


def sample_replacements(ids: torch.Tensor, kit: EmbeddingKit, epsilon: float | torch.Tensor,
                        seed: int | torch.Generator) -> torch.Tensor:
    """Draw one replacement per token id (any shape), all at once. eps = inf returns ``ids`` unchanged.

    ``epsilon`` is one float for every token, or a float tensor of ``ids``' shape (one ε per token, all
    finite and > 0; the adaptive mechanism of ``text_dp_frame``); the draws are the same in number and
    order either way."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if isinstance(epsilon, torch.Tensor):
        if epsilon.shape != ids.shape:
            raise ValueError(f"per-token epsilon has shape {tuple(epsilon.shape)}, the ids {tuple(ids.shape)}")
        if epsilon.numel() and not (torch.isfinite(epsilon).all() and (epsilon > 0).all()):
            raise ValueError("per-token epsilons must be finite and > 0 (send eps = inf tokens unperturbed)")
        epsilon = epsilon.flatten().double()
    else:
        epsilon = _check_epsilon(epsilon)
        if math.isinf(epsilon):
            return ids.clone()
    if ids.numel() == 0:
        return ids.clone()
    if int(ids.max()) >= kit.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"token id {int(ids.max())} is outside the kit's vocabulary ({kit.vocab_size} tokens); "
                         "the kit belongs to another model")
    g = _generator(seed)
    flat = ids.flatten()
    members, offsets, sizes = kit.class_members()
    k = kit.token_class[flat].long()
    logw_nb = neighbour_log_weights(kit, flat, epsilon)  # [T, N]
    logw_tail = torch.log(sizes[k].double()) - epsilon * kit.exponent_scale  # [T]: uniform over the class
    logits = torch.cat([logw_nb, logw_tail[:, None]], dim=1)
    u = _uniform(g, logits.shape)
    choice = torch.argmax(logits - torch.log(-torch.log(u)), dim=1)  # Gumbel-max
    uniform = _uniform(g, flat.shape)
    tail = members[offsets[k] + (uniform * sizes[k]).long().clamp_max(sizes[k] - 1)]
    nb = kit.neighbors[flat].long()
    picked = torch.gather(nb, 1, choice.clamp_max(kit.n_neighbors - 1)[:, None]).squeeze(1)
    out = torch.where(choice == kit.n_neighbors, tail, picked)
    return out.reshape(ids.shape)


@dataclass
class PerturbResult:
    """The perturbed prompt (``text``, what leaves the client) and its accounting."""

    text: str
    token_ids: list[int]
    n_tokens: int
    n_changed: int
    n_uncovered: int
    epsilon_per_token: float
    epsilon_total: float


def _tokenize(tok, texts: Sequence[str]) -> list[list[int]]:
    if isinstance(texts, str):
        raise TypeError("perturb_batch takes a list of texts; use perturb() for one text")
    return [list(x) for x in tok(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


def perturb_batch(texts: Sequence[str], kit: EmbeddingKit, tok, epsilon: float,
                  seed: int | torch.Generator) -> list[PerturbResult]:
    """Perturb every token of every text with ``epsilon`` each (one vectorised draw for the batch).

    The texts are tokenised without special tokens; the output is decoded without clean-up, so what the
    server receives is exactly the perturbed token sequence. eps = inf returns every text verbatim."""
    epsilon = _check_epsilon(epsilon)
    ids = _tokenize(tok, texts)
    lengths = [len(x) for x in ids]
    if math.isinf(epsilon):
        return [PerturbResult(t, x, len(x), 0, 0, epsilon, epsilon if x else 0.0) for t, x in zip(texts, ids)]
    flat = torch.tensor([i for x in ids for i in x], dtype=torch.long)
    new = sample_replacements(flat, kit, epsilon, seed)
    changed = (new != flat).split(lengths)
    uncovered = (~kit.covered[flat]).split(lengths)
    new_ids = [x.tolist() for x in new.split(lengths)]
    decoded = tok.batch_decode(new_ids, clean_up_tokenization_spaces=False) if new_ids else []
    return [PerturbResult(text, x, n, int(c.sum()), int(unc.sum()), epsilon, n * epsilon)
            for text, x, n, c, unc in zip(decoded, new_ids, lengths, changed, uncovered)]


def perturb(text: str, kit: EmbeddingKit, tok, epsilon: float, seed: int | torch.Generator) -> PerturbResult:
    """Perturb one text (see ``perturb_batch``)."""
    return perturb_batch([text], kit, tok, epsilon, seed)[0]
