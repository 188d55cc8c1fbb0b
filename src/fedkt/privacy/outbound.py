"""The outbound allow-list: every key a client may send, per handler, with the reason it may leave.

A client's reply is a :class:`~fedkt.federation.base.Message`: named tensors, texts and JSON meta. Each
key of it (``tensors.<name>``, ``texts``, ``meta.<dotted path>``) must match an entry of
:data:`ALLOWED` for the handler that produced it, and each entry names its justification:

* ``DP output``: the output of the client's DP mechanism (text-DP prompts);
* ``post-processing of DP output``: computed from a DP output alone (samples of a DP-SGD adapter,
  their parse counts), so it carries the same guarantee;
* ``public``: known to the server already or public by construction (ε it asked for, task tags of a
  public schedule, the DP accountant's figures, which depend only on public settings and n);
* ``declared disclosure``: not covered by a DP guarantee and disclosed on purpose, written down here
  (counts, lengths, local evaluation metrics, FedAvg's training loss);
* ``protected by secure aggregation``: an adapter trained on private data; it leaves only masked and
  summed (SecAgg+), or in the clear where the client's policy allows it (``allow_clear_adapters``).

:func:`check_reply` enforces the list on the client at run time (a reply with an unlisted key is refused
before it is sent); ``tests/test_outbound.py`` runs every method and checks every key of every reply,
and that docs/privacy.md's table is :func:`markdown_table`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterator

DP = "DP output"
POST = "post-processing of DP output"
PUBLIC = "public"
DECLARED = "declared disclosure"
SECAGG = "protected by secure aggregation"
CATEGORIES = (DP, POST, PUBLIC, DECLARED, SECAGG)


class OutboundViolation(PermissionError):
    """A reply key that is not on the allow-list: the client refuses to send the reply."""


@dataclass(frozen=True)
class Allowed:
    pattern: str
    """``texts``, ``tensors.<fnmatch pattern>`` or ``meta.<dotted path fnmatch pattern>``."""
    category: str
    why: str

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"{self.pattern}: category {self.category!r} is not one of {CATEGORIES}")
        if not self.why.strip():
            raise ValueError(f"{self.pattern}: an allowed key needs a justification")


_ADAPTER = Allowed("tensors.*", SECAGG, "the LoRA adapter trained on private data (no DP): leaves only under "
                   "SecAgg+ (masked, summed), or in the clear where policy.allow_clear_adapters = true")
_NUM_EXAMPLES = Allowed("meta.num_examples", DECLARED, "the client's number of training examples (the FedAvg "
                        "weight; SecAgg+ sends it in the clear too)")
_STEPS = Allowed("meta.steps", DECLARED, "optimizer steps taken: a function of num_examples and the "
                 "server's settings")
_METRICS = Allowed("meta.metrics.*", DECLARED, "accuracy of the locally trained model on the public "
                   "evaluation sets (as in the papers' standalone baseline); not DP")
_RANDOMNESS = Allowed("meta.randomness", DECLARED, "which randomness the client drew its noise from "
                      "(simulation / secret_seed / csprng), never a seed")

ALLOWED: dict[str, tuple[Allowed, ...]] = {
    "fedkt.algorithms.fedcot:client_encode": (
        Allowed("texts", DP, "the perturbed prompts: every token drawn by the ε-DP exponential mechanism"),
        Allowed("meta.epsilon_per_token", PUBLIC, "the ε per token the server asked for and the client accepted"),
        Allowed("meta.tokens", DECLARED, "the number of prompt tokens (visible in the perturbed texts anyway)"),
        Allowed("meta.prompt_epsilon_mean", DECLARED, "tokens × ε per prompt, averaged: a function of the lengths"),
        Allowed("meta.prompt_epsilon_max", DECLARED, "tokens × ε of the longest prompt: a function of the lengths"),
        _RANDOMNESS,
    ),
    "fedkt.algorithms.fedcot:client_decode_train": (_ADAPTER, _NUM_EXAMPLES, _STEPS, _METRICS),
    "fedkt.algorithms.fdkt.client:client_synthesize": (
        Allowed("texts", POST, "synthetic examples sampled from the DP-SGD adapter and parsed"),
        Allowed("meta.tasks", PUBLIC, "each sample's task tag, from the public sampling plan"),
        Allowed("meta.generated", PUBLIC, "samples drawn: the server's samples_per_client"),
        Allowed("meta.parsed", POST, "how many DP samples parsed as valid examples"),
        Allowed("meta.rejected.*", POST, "parse-failure counts of the DP samples, by reason"),
        Allowed("meta.label_agree", POST, "DP samples whose answer is the letter the plan asked for"),
        Allowed("meta.raw_samples", POST, "the first raw DP generations (for the report)"),
        Allowed("meta.dp.epsilon_spent", PUBLIC, "the accountant's ε: a function of σ, q, steps and δ"),
        Allowed("meta.dp.target_epsilon", PUBLIC, "the ε the server asked for and the client accepted"),
        Allowed("meta.dp.delta", DECLARED, "min(δ, 1/n²): discloses n when 1/n² < δ"),
        Allowed("meta.dp.noise_multiplier", PUBLIC, "σ, calibrated from (ε, δ, q, steps)"),
        Allowed("meta.dp.sample_rate", DECLARED, "q = batch_size / n: discloses n"),
        Allowed("meta.dp.steps", DECLARED, "DP-SGD steps taken (the planned number, a function of n: Poisson "
                "steps are counted even when empty)"),
        Allowed("meta.dp.planned_steps", DECLARED, "ceil(epochs · n / batch): a function of n"),
        Allowed("meta.dp.examples", DECLARED, "n, the client's number of training examples"),
        Allowed("meta.dp.max_grad_norm", PUBLIC, "the clipping bound the server set"),
        Allowed("meta.dp.accountant", PUBLIC, "the accountant's name"),
        _RANDOMNESS,
    ),
    "fedkt.algorithms.fdkt.client:client_train_and_evaluate": (
        _METRICS,
        Allowed("meta.trained_on", DECLARED, "number of training examples (private + synthetic)"),
        Allowed("meta.synthetic", PUBLIC, "number of synthetic examples used (the server sent them)"),
    ),
    "fedkt.algorithms.baselines:client_train_and_evaluate": (_METRICS, _NUM_EXAMPLES),
    "fedkt.algorithms.fedavg:client_fit": (
        _ADAPTER, _NUM_EXAMPLES, _STEPS,
        Allowed("meta.loss", DECLARED, "mean training loss on private data (no DP; kept because the golden "
                "runs pin FedAvg/FedCoLLM's bytes; under SecAgg+ it travels in the clear)"),
    ),
    "fedkt.algorithms.fedprox:client_fit": (
        _ADAPTER, _NUM_EXAMPLES, _STEPS,
        Allowed("meta.loss", DECLARED, "mean training loss on private data (no DP; as FedAvg's)"),
    ),
}
"""Handler (``module:function``) -> the keys its replies may hold."""


def reply_keys(msg) -> Iterator[str]:
    """Every key of a reply: ``texts`` (when there are any), ``tensors.<name>``, ``meta.<dotted path>``
    (dicts are walked, an empty one holds no key; any other value is a leaf)."""
    if msg.texts:
        yield "texts"
    for name in msg.tensors:
        yield f"tensors.{name}"

    def walk(prefix: str, v: Any) -> Iterator[str]:
        if isinstance(v, dict):  # an empty dict holds no key (e.g. no parse failures)
            for k, x in v.items():
                yield from walk(f"{prefix}.{k}", x)
        else:
            yield prefix

    for k, v in msg.meta.items():
        yield from walk(f"meta.{k}", v)


def unlisted(handler: str, msg) -> list[str]:
    """The keys of ``msg`` that no allow-list entry of ``handler`` covers (all of them for an unknown handler)."""
    allowed = ALLOWED.get(handler, ())
    return [k for k in reply_keys(msg) if not any(fnmatchcase(k, a.pattern) for a in allowed)]


def check_reply(handler: str, request: str, msg) -> None:
    """Refuse to send a reply holding a key that is not on ``handler``'s allow-list."""
    bad = unlisted(handler, msg)
    if bad:
        raise OutboundViolation(f"the reply to {request} holds {', '.join(bad)}, not on the outbound allow-list "
                                f"of {handler} (fedkt.privacy.outbound.ALLOWED); the client does not send it")


def methods_of(handler: str) -> list[str]:
    """``method.handler`` names under which a handler function is registered."""
    from fedkt import registry
    from fedkt.privacy.policy import handler_key

    return [f"{m}.{h}" for m, spec in registry.methods().items() for h, fn in spec.handlers.items()
            if handler_key(fn) == handler]


def markdown_table() -> str:
    """The allow-list as docs/privacy.md shows it: one row per (method.handler, key)."""
    rows = ["| Method.handler | Key | Justification | Why it may leave |", "|---|---|---|---|"]
    for handler, entries in ALLOWED.items():
        names = ", ".join(methods_of(handler)) or handler
        for a in entries:
            rows.append(f"| {names} | `{a.pattern}` | {a.category} | {a.why} |")
    return "\n".join(rows)
