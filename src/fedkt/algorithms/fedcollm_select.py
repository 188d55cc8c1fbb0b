"""FedCoLLM's server-side validation: a held-out share of the auxiliary set Dᵃ scores the distilled adapters.

The server owns Dᵃ, so it may hold part of it out (``fedcollm.validation_fraction``, a seeded split fixed for
the whole run; never client data, never a test split) and score each model on it while it distils: at the
start of the round's distillation (for the SLM: the clients' FedAvg aggregate θᵗ'⁰; for the LLM: its ω from
the previous round) and every ``fedcollm.select_every`` steps. With ``fedcollm.select = "best"`` each model
leaves the round with its best-scoring adapter (early stopping per round; when distillation only makes the
SLM worse on validation, the clients get the aggregate back unchanged), with ``"last"`` with the last one
(the paper's: the scores are then a record only).

The score of a model is its multiple-choice accuracy on the validation questions (the harness's ``acc``, as
the evaluation computes it), ties broken by the mean log-probability of the right choice among the choices
(continuous, so ties of the accuracy on a few dozen questions still order the candidates); a candidate
replaces the best only when strictly better, so equal scores keep the earlier (fewer distillation steps).
Scoring is gradient-free, in eval mode, and leaves the random state as it found it: the distillation's
trajectory is the same whether or not it is scored.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fedkt.data.tasks import Example
from fedkt.evaluate import choice_loglikelihoods, predictions
from fedkt.models import get_adapter_state, set_adapter_state
from fedkt.seeds import derive_seed


def _seeded_order(n: int, seed: int, stream: str) -> list[int]:
    """A permutation of ``range(n)`` drawn from ``seed`` and the named stream alone."""
    order = list(range(n))
    random.Random(derive_seed(seed, stream)).shuffle(order)
    return order


def split_validation(aux: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(distillation examples, validation examples): ``round(fraction · |Dᵃ|)`` of ``aux`` held out by a
    shuffle seeded from ``seed`` alone, both parts in Dᵃ's order. ``fraction = 0``: all of Dᵃ distils."""
    if fraction == 0:
        return list(aux), []
    n_val = round(fraction * len(aux))
    if n_val < 1 or n_val > len(aux) - 1:
        raise ValueError(
            f"fedcollm.validation_fraction = {fraction} of the auxiliary set's {len(aux)} examples holds out "
            f"{n_val}; it must leave at least one example for validation and one for distillation: raise "
            f"partition.aux_size or change fedcollm.validation_fraction")
    held = set(_seeded_order(len(aux), seed, "fedcollm_validation")[:n_val])
    val = [e for i, e in enumerate(aux) if i in held]
    not_mc = sorted({e.task for e in val if not e.is_mc})
    if not_mc:
        raise ValueError(f"fedcollm.validation_fraction > 0 scores the held-out auxiliary questions by multiple "
                         f"choice, but task(s) {', '.join(not_mc)} are not multiple choice: set "
                         f"fedcollm.validation_fraction = 0 (and select = \"last\") for them")
    return [e for i, e in enumerate(aux) if i not in held], val


def round_slices(aux: Sequence[Example], rounds: int, seed: int) -> list[list[Example]]:
    """``aux_schedule = "fresh"``: the distillation part of Dᵃ cut into ``rounds`` disjoint slices by a shuffle
    seeded from ``seed`` alone (sizes differ by at most one; each slice in Dᵃ's order); round t distils on
    slice t − 1 only, so no round distils on examples an earlier round has already fitted."""
    if len(aux) < rounds:
        raise ValueError(
            f"fedcollm.aux_schedule = 'fresh' cuts the auxiliary set's {len(aux)} distillation examples into "
            f"{rounds} rounds' slices, fewer than one example per round: raise partition.aux_size, lower "
            f"federation.rounds or set fedcollm.aux_schedule = 'whole'")
    order = _seeded_order(len(aux), seed, "fedcollm_aux_slices")
    return [[aux[i] for i in sorted(order[r::rounds])] for r in range(rounds)]


@dataclass(frozen=True, order=True)
class Score:
    """A model's validation score; compares (acc, loglik) lexicographically."""

    acc: float
    """Multiple-choice accuracy (argmax of the choices' summed log-likelihoods), a fraction."""
    loglik: float
    """Mean over questions of log p(right choice), p = softmax of the choices' log-likelihoods."""


def score_from_lls(examples: Sequence[Example], lls: Sequence[Sequence[float]]) -> Score:
    """The :class:`Score` of per-question choice log-likelihoods ``lls`` (``choice_loglikelihoods``)."""
    if not examples:
        raise ValueError("no validation questions to score")
    right, logp = 0, 0.0
    for ex, ll in zip(examples, lls):
        right += predictions(ex, ll)[0] == ex.answer
        top = max(ll)
        logp += ll[ex.answer] - top - math.log(sum(math.exp(v - top) for v in ll))
    return Score(right / len(examples), logp / len(examples))


def validation_score(model, tok, examples: Sequence[Example], batch_size: int, desc: str = "validate") -> Score:
    """``model``'s :class:`Score` on ``examples``: no gradient, eval mode, the caller's mode and random
    state restored afterwards."""
    was = model.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        lls = choice_loglikelihoods(model, tok, examples, batch_size, desc)
    model.train(was)
    return score_from_lls(examples, lls)


@dataclass
class Selector:
    """One model's candidates of a round: :meth:`offer` scores the model's adapter as it is now (after
    ``step`` distillation steps) and keeps a copy when it beats every earlier one; :meth:`keep_best` sets
    the best into the model."""

    model: object
    tok: object
    val: Sequence[Example]
    batch_size: int
    desc: str
    steps: list[int] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)
    best: int = -1
    best_state: dict[str, torch.Tensor] | None = None

    def offer(self, step: int) -> Score:
        s = validation_score(self.model, self.tok, self.val, self.batch_size, f"{self.desc} step {step}")
        self.steps.append(step)
        self.scores.append(s)
        if self.best < 0 or s > self.scores[self.best]:
            self.best, self.best_state = len(self.scores) - 1, get_adapter_state(self.model)
        return s

    def keep_best(self) -> None:
        if self.best_state is not None:
            set_adapter_state(self.model, self.best_state)

    def record(self, side: str, kept: str) -> dict[str, object]:
        """Stats for the round's entry: steps scored, their accuracy and log-likelihood, the step kept."""
        last = len(self.scores) - 1
        chosen = self.best if kept == "best" else last
        return {f"val_steps_{side}": list(self.steps), f"val_acc_{side}": [s.acc for s in self.scores],
                f"val_loglik_{side}": [round(s.loglik, 6) for s in self.scores],
                f"selected_step_{side}": self.steps[chosen]}


def checkpoints(steps: int, every: int) -> list[int]:
    """The steps after which the models are scored (besides step 0): every ``every`` steps and the last one
    (``every = 0``: the last one only)."""
    if every <= 0 or every >= steps:
        return [steps]
    return [*range(every, steps, every), steps]
