"""The client's privacy policy: what a client accepts from the server, checked on the client.

The server drives a federation, but it does not decide a client's protection. Each client owns a
:class:`ClientPolicy` (``ClientSpec.policy``; a deployment client's ``[policy]`` table in its client
file) and every request handler of every method checks the server's request against it *before doing
anything* (:func:`guard`, applied where each method registers its handlers). A request outside the
policy raises :class:`PolicyViolation`, naming the policy key and the requested value, e.g.::

    policy.fedcot_max_token_epsilon = 6 refuses the server's request fedcot.epsilon = inf

The server sees that as the client's failure (``federation.on_client_failure``: ``stop`` ends the run,
``skip`` records it and goes on with the other clients). After the handler ran, the keys the policy does
not let leave are withheld (``meta.correct`` unless ``allow_per_question``) and the reply is checked
against the outbound allow-list (:mod:`fedkt.privacy.outbound`) before it is sent.

The defaults are safe: DP methods refuse ε = ∞, FedCoT's ε per token is at most 6, FDKT's DP-SGD at
most ε = 10 and δ = 1e-5, adapters trained on private data leave only under secure aggregation,
per-question correctness on the public evaluation sets does not leave (only the accuracy does). The
in-process simulation builds its clients' policy from the experiment (``simulation.policy_for_experiment``): the
simulator plays every party, so any experiment runs as configured. See docs/privacy.md.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

import torch

from fedkt import progress
from fedkt.config import check
from fedkt.privacy.outbound import GATED, check_reply, withhold

if TYPE_CHECKING:
    from fedkt.clients import ClientContext, Handler
    from fedkt.message import Message

CLIENT_METHODS = ("standalone", "fedavg", "fedprox", "fedcollm", "fedcot", "fdkt")
"""The built-in methods that call clients (zero_shot and centralized do not)."""

SECURE_AGGREGATION: contextvars.ContextVar[bool] = contextvars.ContextVar("fedkt_secure_aggregation", default=False)
"""True while a handler runs behind secure aggregation (Flower's SecAgg+ client mod): its tensors reach
the server only masked, summed with the other clients'. Set by ``flower_secagg.make_secure_train``."""


class PolicyViolation(PermissionError):
    """The server asked for something the client's policy refuses (or the client's reply would carry a key
    that is not on the outbound allow-list)."""

    def __init__(self, key: str, allowed: Any, request: str, requested: Any, hint: str = ""):
        self.key, self.allowed, self.request, self.requested = key, allowed, request, requested
        msg = f"policy.{key} = {_fmt(allowed)} refuses the server's request {request} = {_fmt(requested)}"
        super().__init__(msg + (f"; {hint}" if hint else ""))


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:g}"
    return repr(v) if isinstance(v, str) else str(v)


@dataclass
class ClientPolicy:
    """What this client accepts; the ``[policy]`` table of a client file (docs/privacy.md#policy)."""

    allowed_methods: list[str] = field(default_factory=lambda: list(CLIENT_METHODS))
    """Methods whose requests this client answers."""
    allow_infinite_epsilon: bool = False
    """Accept ε = ∞ (no noise at all) from a DP method. Off: FedCoT and FDKT refuse to run without noise."""
    fedcot_max_token_epsilon: float = 6.0
    """Largest text-DP ε per token FedCoT may ask for. 6 is the largest ε at which the strongest attack
    measured (contextual noisy-channel decoding, docs/privacy-attacks.md) recovers < 10% of the tokens
    (4.3%; 43.8% at ε = 10)."""
    fedcot_max_prompt_epsilon: float = math.inf
    """Largest ε of one prompt (tokens × ε per token, basic composition); inf: no cap beyond the token's."""
    fdkt_max_epsilon: float = 10.0
    """Largest DP-SGD target ε FDKT (and FedCoLLM's FDKT synthesis) may ask for."""
    fdkt_max_delta: float = 1e-5
    """Largest DP-SGD δ (the client uses min(δ, 1/n²) anyway)."""
    allow_clear_adapters: bool = False
    """Let adapters trained on private data (FedAvg, FedProx, FedCoLLM, FedCoT's shared variant) leave
    without secure aggregation. Off: they leave only masked (SecAgg+), or the request is refused."""
    allow_per_question: bool = False
    """Send which public evaluation questions this client's locally trained model got right (``meta.correct``,
    one 0/1 per question) where the server asks for it (``eval.per_question``), for its paired statistics.
    Off: the client withholds them (the server still gets the accuracy, ``meta.metrics``, and reports this
    client's methods without paired data); the request itself is not refused."""
    allowed_models: list[str] = field(default_factory=list)
    """sha256 (:func:`model_sha256`) of the base models this client runs; empty: the model its client
    file names, unchecked."""
    fedcot_kit_sha256: list[str] = field(default_factory=list)
    """sha256 (``text_dp.kit_sha256``) of text-DP kits FedCoT may use; empty: any kit that passes
    validation against this client's own tokenizer."""
    fedcot_kit_model: str = ""
    """Build the FedCoT kit here, from this local model (its tokenizer + input embeddings), and ignore the
    server's kit file. Empty: load the server-named kit and validate it."""
    max_epochs: float = 50.0
    """Largest number of epochs (local training, DP-SGD) one request may ask for."""
    max_steps: int = 100_000
    """Largest number of optimizer steps one request implies."""
    max_new_tokens: int = 1024
    """Largest generation budget (tokens per output) one request may ask for."""
    max_samples: int = 4096
    """Largest number of synthetic samples one request may ask for."""

    def __post_init__(self):
        bad = [m for m in self.allowed_methods if not isinstance(m, str) or not m]
        check(not bad, f"allowed_methods holds {bad}; list method names, e.g. {list(CLIENT_METHODS)}")
        for k in ("fedcot_max_token_epsilon", "fedcot_max_prompt_epsilon", "fdkt_max_epsilon"):
            v = getattr(self, k)
            check(isinstance(v, (int, float)) and v > 0 and not math.isnan(v), f"{k} must be > 0, got {v}")
        check(0 < self.fdkt_max_delta < 1, f"fdkt_max_delta must be in (0, 1), got {self.fdkt_max_delta}")
        for k in ("max_epochs", "max_steps", "max_new_tokens", "max_samples"):
            check(getattr(self, k) > 0, f"{k} must be > 0, got {getattr(self, k)}")
        for k in ("allowed_models", "fedcot_kit_sha256"):
            for h in getattr(self, k):
                check(isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h),
                      f"{k} holds {h!r}; give lowercase hex sha256 digests (64 characters)")

    # ---- checks (each raises PolicyViolation naming the key and the requested value)

    def at_most(self, key: str, request: str, value: Any, hint: str = "") -> None:
        limit = getattr(self, key)
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise PolicyViolation(key, limit, request, value, "not a number") from None
        if math.isnan(v) or v > limit:
            raise PolicyViolation(key, limit, request, value, hint or f"raise policy.{key} to accept it")

    def epsilon(self, key: str, request: str, value: Any) -> None:
        """A DP ε: finite and ≤ the key's ceiling, or ∞ only with ``allow_infinite_epsilon``."""
        v = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        if math.isinf(v) and v > 0:
            if not self.allow_infinite_epsilon:
                raise PolicyViolation(key, getattr(self, key), request, v,
                                      "ε = inf switches the noise off; set policy.allow_infinite_epsilon = "
                                      "true to accept that")
            return
        if not v > 0:
            raise PolicyViolation(key, getattr(self, key), request, value, "ε must be a number > 0")
        self.at_most(key, request, v)

    def method(self, method: str, request: str) -> None:
        if method not in self.allowed_methods:
            raise PolicyViolation("allowed_methods", self.allowed_methods, "method", method,
                                  f"add {method!r} to policy.allowed_methods to take part")

    def clear_upload(self, request: str) -> None:
        """An adapter trained on private data is about to leave: only under SecAgg+, or if allowed."""
        if not SECURE_AGGREGATION.get() and not self.allow_clear_adapters:
            raise PolicyViolation("allow_clear_adapters", False, request, "adapter upload without secure aggregation",
                                  "set federation.secure_aggregation = true on the server, or policy."
                                  "allow_clear_adapters = true on this client")

    def model(self, ctx: "ClientContext") -> None:
        if not self.allowed_models or ctx.slm is None:
            return
        digest = model_sha256(ctx.slm.model)
        if digest not in self.allowed_models:
            raise PolicyViolation("allowed_models", [h[:12] + "…" for h in self.allowed_models], "model.sha256",
                                  digest, f"this client's model ({ctx.slm.spec}) is not one it allows; add its "
                                          "sha256 to policy.allowed_models if it is the intended model")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ------------------------------------------------------------------------------------------ model hash
def model_sha256(model) -> str:
    """sha256 of a model's base weights: every parameter and buffer other than LoRA's, by name (peft's
    wrapper prefixes removed, so a plain ``load_model`` and fedkt's LoRA-wrapped copy agree), dtype,
    shape and bytes, in name order. Cached on the model object."""
    cached = getattr(model, "_fedkt_sha256", None)
    if cached is not None:
        return cached
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    h = hashlib.sha256(b"fedkt-model-sha256/1\n")
    items = [(n.replace(".base_layer", ""), t) for n, t in
             [*base.named_parameters(remove_duplicate=False), *base.named_buffers(remove_duplicate=False)]
             if "lora_" not in n]
    for name, t in sorted(items, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    try:
        model._fedkt_sha256 = digest
    except Exception:  # noqa: BLE001 - caching is optional
        pass
    return digest


# ------------------------------------------------------------------------------------ request rules
def _steps(epochs: float, n: int, batch: int) -> int:
    return max(1, math.ceil(epochs * n / max(1, min(n or 1, batch))))


def _train_request(p: ClientPolicy, ctx, msg, req: str, upload: bool) -> None:
    epochs = msg.meta.get("epochs", ctx.train.epochs)
    p.at_most("max_epochs", f"{req}.epochs", epochs)
    if ctx.train.max_steps <= 0:
        p.at_most("max_steps", f"{req}.steps", _steps(float(epochs), len(ctx.data), ctx.train.batch_size))
    if upload:
        p.clear_upload(f"{req}")


def _fedcot_encode(p, ctx, msg, req):
    p.epsilon("fedcot_max_token_epsilon", "fedcot.epsilon", msg.meta.get("epsilon"))


def _fedcot_decode_train(p, ctx, msg, req):
    m = msg.meta
    p.at_most("max_new_tokens", f"{req}.decode_tokens", m.get("decode_tokens", 0))
    _train_request(p, ctx, msg, req, upload=bool(m.get("share_adapters", True)))


def _fdkt_synthesize(p, ctx, msg, req):
    m, method = msg.meta, "fdkt"  # the [fdkt] section's keys, whichever method asks (FedCoLLM's aux too)
    p.epsilon("fdkt_max_epsilon", f"{method}.epsilon", m.get("epsilon"))
    p.at_most("fdkt_max_delta", f"{method}.delta", m.get("delta"))
    p.at_most("max_epochs", f"{method}.dp_epochs", m.get("dp_epochs"))
    n = len(ctx.data)
    if n:
        p.at_most("max_steps", f"{method}.dp_steps", _steps(float(m.get("dp_epochs")), n, int(m.get("dp_batch_size", 1))))
    p.at_most("max_samples", f"{method}.samples", m.get("samples"))
    for k in ("sample_tokens", "question_tokens", "choice_tokens"):
        if k in m:
            p.at_most("max_new_tokens", f"{method}.{k}", m[k])


def _evaluate_request(p, ctx, msg, req):
    _train_request(p, ctx, msg, req, upload=False)


REQUEST_RULES: dict[str, Callable[[ClientPolicy, Any, Any, str], None]] = {
    "fedkt.algorithms.fedcot:client_encode": _fedcot_encode,
    "fedkt.algorithms.fedcot:client_decode_train": _fedcot_decode_train,
    "fedkt.algorithms.fdkt.client:client_synthesize": _fdkt_synthesize,
    "fedkt.algorithms.fdkt.client:client_train_and_evaluate": _evaluate_request,
    "fedkt.algorithms.baselines:client_train_and_evaluate": _evaluate_request,
    "fedkt.algorithms.fedavg:client_fit": lambda p, c, m, r: _train_request(p, c, m, r, upload=True),
    "fedkt.algorithms.fedprox:client_fit": lambda p, c, m, r: _train_request(p, c, m, r, upload=True),
}
"""Per handler (``module:function``): the check of the server's request. A handler without a rule is
refused (a client answers only requests it knows how to check)."""


def handler_key(fn: Callable) -> str:
    fn = getattr(fn, "__wrapped__", fn)
    return f"{fn.__module__}:{fn.__name__}"


def check_request(ctx: "ClientContext", method: str, name: str, fn: Callable, msg: "Message") -> None:
    """Everything the client checks before it runs handler ``name`` of ``method`` on the server's ``msg``."""
    p: ClientPolicy = ctx.policy
    p.method(method, f"{method}.{name}")
    rule = REQUEST_RULES.get(handler_key(fn))
    if rule is None:
        raise PolicyViolation("allowed_methods", p.allowed_methods, "handler", f"{method}.{name}",
                              f"no request rule for {handler_key(fn)} in fedkt.privacy.policy.REQUEST_RULES")
    rule(p, ctx, msg, f"{method}.{name}")
    p.model(ctx)


def withhold_refused(ctx: "ClientContext", handler: str, request: str, reply: "Message") -> "Message":
    """``reply`` without the keys the client's policy does not let leave (:func:`fedkt.privacy.outbound.withhold`),
    with a local log line naming each withheld key and the switch that withholds it."""
    out = withhold(handler, reply, ctx.policy)
    for key in (k for k in reply.meta if k not in out.meta):
        progress.log(f"{ctx.cid}: meta.{key} withheld from the reply to {request}: policy.{GATED[handler][key]} = "
                     "false (local; the server gets the reply without it)")
    return out


def guard(method: str, handlers: dict[str, "Handler"]) -> dict[str, "Handler"]:
    """``handlers`` wrapped so that each checks the request against the client's policy before running
    and the reply against the outbound allow-list before it is sent (what a method registers)."""
    def wrap(name: str, fn: "Handler") -> "Handler":
        @functools.wraps(fn)
        def guarded(ctx, msg):
            check_request(ctx, method, name, fn, msg)
            reply = fn(ctx, msg)
            reply = withhold_refused(ctx, handler_key(fn), f"{method}.{name}", reply)
            check_reply(handler_key(fn), f"{method}.{name}", reply)
            return reply
        return guarded

    return {name: wrap(name, fn) for name, fn in handlers.items()}
