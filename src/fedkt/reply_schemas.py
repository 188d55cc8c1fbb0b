"""What each client handler may reply, declared once: the server's reply schemas and the client's outbound
allow-list are both derived from :data:`REPLIES`.

Each :class:`Reply` declares, for one handler function (``module:function``, registered under the handler
name ``handler``), every key its replies may hold: ``texts``, ``tensors.*`` (an adapter) and each
``meta`` key with the check its value must pass, whether it is required, and why it may leave the client
(a category of :data:`CATEGORIES` and a justification, per nested key where the value is an object).

* The server (:data:`fedkt.federation.validate.SCHEMAS`) checks every reply to handler name ``h`` against
  the union of the declarations registered under ``h`` (a key is required when every declaration requires
  it), before any algorithm sees it.
* The client (:data:`fedkt.privacy.outbound.ALLOWED`) refuses to send a reply holding a key its handler
  function does not declare, and withholds a key whose ``policy`` switch (a boolean of the client's own
  :class:`~fedkt.privacy.policy.ClientPolicy`) is off (:data:`fedkt.privacy.outbound.GATED`).

This module imports nothing of fedkt's: both sides build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

MAX_WEIGHT = float(2**31 - 1)
"""Largest aggregation weight (example count) a reply may declare."""

DP = "DP output"
POST = "post-processing of DP output"
PUBLIC = "public"
DECLARED = "declared disclosure"
SECAGG = "protected by secure aggregation"
CATEGORIES = (DP, POST, PUBLIC, DECLARED, SECAGG)
"""Why a key may leave the client (docs/privacy.md, fedkt.privacy.outbound)."""


# ---------------------------------------------------------------------------------------- value checks
Check = Callable[[Any], bool]


def real(v: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def finite(v: Any) -> bool:
    return real(v) and math.isfinite(v)


def number(v: Any) -> bool:
    """A real number, NaN allowed (e.g. the loss of a client that had nothing to train on)."""
    return real(v) and not math.isinf(v)


def count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_WEIGHT


def positive_count(v: Any) -> bool:
    return count(v) and v > 0


def probability(v: Any) -> bool:
    return finite(v) and 0 <= v <= 1


def epsilon(v: Any) -> bool:
    return real(v) and (v > 0 or v == 0) and not math.isnan(v)  # inf = no privacy, reported as such


def text(v: Any) -> bool:
    return isinstance(v, str)


def str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def obj(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


def num_dict(v: Any) -> bool:
    return obj(v) and all(number(x) for x in v.values())


def metrics(v: Any) -> bool:
    """{task: {name: number}} (evaluation results)."""
    return obj(v) and all(num_dict(x) for x in v.values())


def correctness(v: Any) -> bool:
    """{task: {"ids": str, metric: "0101..."}} (per-question correctness; every bit-string of a task as long)."""
    if not obj(v):
        return False
    for x in v.values():
        if not obj(x) or not isinstance(x.get("ids"), str) or len(x) < 2:
            return False
        strings = [b for k, b in x.items() if k != "ids"]
        if not all(isinstance(b, str) and not set(b) - {"0", "1"} for b in strings) or len(set(map(len, strings))) != 1:
            return False
    return True


CHECK_NAMES: dict[Check, str] = {finite: "a finite number", number: "a number", count: "an integer >= 0",
                positive_count: "an integer > 0", probability: "a number in [0, 1]", epsilon: "a number >= 0",
                text: "a string", str_list: "a list of strings", obj: "a JSON object",
                num_dict: "an object of numbers", metrics: "an object {task: {metric: number}}",
                correctness: 'an object {task: {"ids": fingerprint, metric: "0/1 string"}}'}


# ---------------------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Part:
    """One nested key of a meta object (``name`` an fnmatch pattern, ``*``: any key) and why it may leave."""

    name: str
    category: str
    why: str

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"{self.name}: category {self.category!r} is not one of {CATEGORIES}")
        if not self.why.strip():
            raise ValueError(f"{self.name}: an allowed key needs a justification")


@dataclass(frozen=True)
class Key:
    """One key of a reply: ``texts``, ``tensors.*`` or ``meta.<name>``. A meta key has a ``check`` (its
    value, on the server) and either a category and justification of its own or, for an object, ``parts``
    (its nested keys, each with its own). ``policy``: the name of a boolean of the client's
    :class:`~fedkt.privacy.policy.ClientPolicy` that must be true for the key to leave (an optional,
    top-level meta key: with the switch off the client withholds it and the reply leaves without it)."""

    pattern: str
    category: str = ""
    why: str = ""
    check: Check | None = None
    required: bool = False
    parts: tuple[Part, ...] = ()
    policy: str = ""

    def __post_init__(self):
        if self.pattern.startswith("meta.") and self.check is None:
            raise ValueError(f"{self.pattern}: a meta key needs the check its value must pass")
        if not self.parts:
            Part(self.pattern, self.category, self.why)  # validates category and justification
        if self.policy and (self.required or not self.pattern.startswith("meta.") or self.pattern.count(".") != 1
                            or any(c in self.pattern for c in "*?[")):
            raise ValueError(f"{self.pattern}: only an optional, top-level meta key without wildcards can be "
                             f"switched by policy.{self.policy}")

    def allowed(self) -> list[tuple[str, str, str, str]]:
        """(pattern, category, why, policy switch) of every allow-list entry this key stands for."""
        if self.parts:
            return [(f"{self.pattern}.{p.name}", p.category, p.why, self.policy) for p in self.parts]
        return [(self.pattern, self.category, self.why, self.policy)]


@dataclass(frozen=True)
class Reply:
    """Everything handler function ``function`` (``module:function``), called as handler ``handler``, may
    reply. ``weight``: the meta key that is its aggregation weight; ``consistent``: a cross-field check of
    the whole reply, returning what is wrong ("" if nothing)."""

    handler: str
    function: str
    keys: tuple[Key, ...]
    weight: str = ""
    consistent: Callable[[Any], str] | None = None


def _adapter() -> Key:
    return Key("tensors.*", SECAGG, "the LoRA adapter trained on private data (no DP): leaves only under "
               "SecAgg+ (masked, summed), or in the clear where policy.allow_clear_adapters = true")


def _num_examples(check: Check = positive_count, required: bool = True) -> Key:
    return Key("meta.num_examples", DECLARED, "the client's number of training examples (the FedAvg weight; "
               "SecAgg+ sends it in the clear too)", check, required)


_STEPS = Key("meta.steps", DECLARED, "optimizer steps taken: a function of num_examples and the server's settings",
             count)
_METRICS = Key("meta.metrics", check=metrics, parts=(Part("*", DECLARED, "accuracy of the locally trained model on "
               "the public evaluation sets (as in the papers' standalone baseline); not DP"),))
_CORRECT = Key("meta.correct", check=correctness, policy="allow_per_question", parts=(Part("*", DECLARED,
               "which public evaluation questions the locally trained model gets right (one 0/1 per question: what "
               "meta.metrics averages, for paired statistics), where the server asks (eval.per_question); not DP"),))
_RANDOMNESS = Key("meta.randomness", DECLARED, "which randomness the client drew its noise from (simulation / "
                  "secret_seed / csprng), never a seed", text)


def _synthesize_consistent(r: Any) -> str:
    return "" if len(r.texts) == len(r.meta["tasks"]) else f"{len(r.texts)} texts but {len(r.meta['tasks'])} task tags"


REPLIES: tuple[Reply, ...] = (
    # FedCoT step 1: text-DP-perturbed prompts
    Reply("encode", "fedkt.algorithms.fedcot:client_encode", (
        Key("texts", DP, "the perturbed prompts: every token drawn by the ε-DP exponential mechanism"),
        Key("meta.epsilon_per_token", PUBLIC, "the ε per token the server asked for and the client accepted",
            epsilon, True),
        Key("meta.tokens", DECLARED, "the number of prompt tokens (visible in the perturbed texts anyway)", count,
            True),
        Key("meta.prompt_epsilon_mean", DECLARED, "tokens × ε per prompt, averaged: a function of the lengths",
            epsilon, True),
        Key("meta.prompt_epsilon_max", DECLARED, "tokens × ε of the longest prompt: a function of the lengths",
            epsilon, True),
        _RANDOMNESS)),
    # FedCoT's decode + train: the adapter (shared variant) or, in the paper's mode, local metrics only
    Reply("decode_train", "fedkt.algorithms.fedcot:client_decode_train",
          (_adapter(), _num_examples(), _STEPS, _METRICS, _CORRECT), weight="num_examples"),
    # FDKT step 1: DP synthetic examples
    Reply("synthesize", "fedkt.algorithms.fdkt.client:client_synthesize", (
        Key("texts", POST, "synthetic examples sampled from the DP-SGD adapter and parsed"),
        Key("meta.tasks", PUBLIC, "each sample's task tag, from the public sampling plan", str_list, True),
        Key("meta.generated", PUBLIC, "samples drawn: the server's samples_per_client", count, True),
        Key("meta.parsed", POST, "how many DP samples parsed as valid examples", count, True),
        Key("meta.rejected", check=obj, required=True,
            parts=(Part("*", POST, "parse-failure counts of the DP samples, by reason"),)),
        Key("meta.label_agree", POST, "DP samples whose answer is the letter the plan asked for", count, True),
        Key("meta.raw_samples", POST, "the first raw DP generations (for the report)", str_list, True),
        Key("meta.dp", check=obj, required=True, parts=(
            Part("epsilon_spent", PUBLIC, "the accountant's ε: a function of σ, q, steps and δ"),
            Part("target_epsilon", PUBLIC, "the ε the server asked for and the client accepted"),
            Part("delta", DECLARED, "min(δ, 1/n²): discloses n when 1/n² < δ"),
            Part("noise_multiplier", PUBLIC, "σ, calibrated from (ε, δ, q, steps)"),
            Part("sample_rate", DECLARED, "q = batch_size / n: discloses n"),
            Part("steps", DECLARED, "DP-SGD steps taken (the planned number, a function of n: Poisson "
                 "steps are counted even when empty)"),
            Part("planned_steps", DECLARED, "ceil(epochs · n / batch): a function of n"),
            Part("examples", DECLARED, "n, the client's number of training examples"),
            Part("max_grad_norm", PUBLIC, "the clipping bound the server set"),
            Part("accountant", PUBLIC, "the accountant's name"))),
        _RANDOMNESS), consistent=_synthesize_consistent),
    # FDKT step 4 and the standalone baseline: local training and evaluation, metrics only
    Reply("train_and_evaluate", "fedkt.algorithms.fdkt.client:client_train_and_evaluate", (
        Key(_METRICS.pattern, check=metrics, required=True, parts=_METRICS.parts),
        Key("meta.trained_on", DECLARED, "number of training examples (private + synthetic)", count),
        Key("meta.synthetic", PUBLIC, "number of synthetic examples used (the server sent them)", count),
        _CORRECT)),
    Reply("train_and_evaluate", "fedkt.algorithms.baselines:client_train_and_evaluate", (
        Key(_METRICS.pattern, check=metrics, required=True, parts=_METRICS.parts),
        _num_examples(count, required=False), _CORRECT)),
    # FedAvg / FedProx / FedCoLLM client training
    Reply("fit", "fedkt.algorithms.fedavg:client_fit", (
        _adapter(), _num_examples(), _STEPS,
        Key("meta.loss", DECLARED, "mean training loss on private data (no DP; kept because the golden "
            "runs pin FedAvg/FedCoLLM's bytes; under SecAgg+ it travels in the clear)", number)),
        weight="num_examples"),
    Reply("fit", "fedkt.algorithms.fedprox:client_fit", (
        _adapter(), _num_examples(), _STEPS,
        Key("meta.loss", DECLARED, "mean training loss on private data (no DP; as FedAvg's)", number)),
        weight="num_examples"),
)
"""Every client handler's replies (``tests/test_outbound.py`` checks that every registered handler has one)."""
