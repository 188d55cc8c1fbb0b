"""The call interface every algorithm is written against, and the byte ledger.

An algorithm is a server-driven sequence of calls: ``federation.call(name, {client: Message})`` runs the
client handler ``name`` on each addressed client and returns ``{client: reply}``. A :class:`Message`
carries named tensors (adapter weights, logits), texts and small JSON metadata (:mod:`fedkt.message`).

:class:`Federation` is the *whole* surface an algorithm may use: ``clients``, ``call``, ``broadcast``,
``aggregate``, ``failures``, ``ledger``, ``take_timing`` and ``state_dict``/``load_state_dict`` (for
resume). The shared
logic (argument checks, the failure policy, metering, timings) lives here; a runtime implements one
method, :meth:`Federation._deliver`, that gets each payload to its client and the reply (or the error)
back. ``LocalFederation`` (in-process) and the Flower runtime differ only there.

:meth:`Federation.aggregate` asks for the *weighted mean* of the tensors the clients reply, not the replies:
a runtime with secure aggregation (Flower: SecAgg+, ``fedkt.federation.flower_secagg``) overrides it so
the server never sees an individual client's tensors; the base implementation (``LocalFederation``, a
simulator that trusts everyone) is the plain weighted mean of the replies.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from fedkt import progress
from fedkt.federation.validate import (FLOAT_DTYPES, MAX_WEIGHT, Layout, ReplayGuard, as_layout, check_reply,
                                       check_weight, escape)
from fedkt.message import Message

FAILURE_POLICIES = ("stop", "skip")


class ClientFailure(RuntimeError):
    def __init__(self, client: str, method: str, error: BaseException | str):
        try:
            detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        except Exception:  # noqa: BLE001 - a hostile exception whose str raises
            detail = f"{type(error).__name__}: <unprintable>"
        super().__init__(f"client {client} failed in {method!r}: {detail}")
        self.client, self.method, self.error = client, method, error


class AllClientsFailed(RuntimeError):
    """Every addressed client failed in one call, or fewer than ``min_clients`` replied (whatever the
    policy): the round cannot proceed."""


@dataclass
class Aggregate:
    """What :meth:`Federation.aggregate` returns: Σ wᵢ tᵢ / Σ wᵢ over the clients that contributed."""

    tensors: dict[str, torch.Tensor]
    clients: list[str]
    """The clients whose update is in the mean (the others failed or dropped out)."""
    weights: dict[str, float]
    """Each contributor's weight (not protected: SecAgg+ sends it in the clear too)."""
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each contributor's reply meta (not protected)."""


def check_mean_inputs(states: list[dict[str, torch.Tensor]], weights: list[float]) -> None:
    """Refuse what would corrupt a weighted mean silently: a weight that is not a finite real > 0 (a bool,
    NaN, negative, 1e300), states with different keys, shapes or non-float dtypes, non-finite values."""
    if not states or len(states) != len(weights):
        raise ValueError(f"weighted mean needs one weight per state, got {len(states)} states and "
                         f"{len(weights)} weights" if states else "nothing to aggregate")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights):
        raise ValueError(f"weights must be real numbers (not bools), got {weights}")
    if not float(sum(weights)) > 0:
        raise ValueError(f"weights must sum to > 0, got {weights}")
    if any(not (0 < w <= MAX_WEIGHT) for w in weights):  # NaN fails both comparisons
        raise ValueError(f"weights must be finite numbers in (0, {MAX_WEIGHT:.0f}], got {weights}")
    keys = states[0].keys()
    if any(s.keys() != keys for s in states[1:]):
        raise ValueError("the clients' tensors have different keys; they cannot be averaged "
                         "(adapters have different keys)")
    for k in keys:
        ref = states[0][k]
        for i, s in enumerate(states):
            t = s[k]
            if t.dtype not in FLOAT_DTYPES or tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"tensor {k!r} of state {i} is {t.dtype}{list(t.shape)}; every state must hold "
                                 f"a float tensor of shape {list(ref.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"tensor {k!r} of state {i} holds NaN or infinite values")


def weighted_mean(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ wᵢ θᵢ / Σ wᵢ key by key, float64 accumulation, cast back to the first state's dtypes (FedAvg's
    ``aggregate`` is this function); bad inputs are refused (:func:`check_mean_inputs`)."""
    check_mean_inputs(states, weights)
    total = float(sum(weights))
    keys = states[0].keys()
    return {k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype)
            for k in keys}


def reply_weight(cid: str, reply: "Message", weight_key: str, declared: float | None = None) -> float:
    """The reply's weight ``reply.meta[weight_key]``; ``weight_key = ""``: 1 (every reply weighs the same).
    A weight must be a finite real > 0, not a bool, and at most ``declared`` (the client's example count)
    when known (``fedkt.federation.validate.check_weight``)."""
    if not weight_key:
        return 1.0
    return check_weight(cid, reply.meta.get(weight_key), weight_key, declared)


@dataclass
class Delivery:
    """What a runtime reports for one client of one call: the reply or the error, and the payload sizes
    a wire carried (down = server -> client, up = client -> server)."""

    reply: Message | None = None
    error: BaseException | str | None = None
    down_bytes: int = 0
    up_bytes: int = 0


@dataclass
class LedgerEntry:
    round: int
    method: str
    client: str
    direction: str  # "down" (server -> client) or "up"
    bytes: int


@dataclass
class ByteLedger:
    entries: list[LedgerEntry] = field(default_factory=list)

    def record(self, round: int, method: str, client: str, direction: str, nbytes: int) -> None:
        self.entries.append(LedgerEntry(round, method, client, direction, nbytes))

    def total(self, direction: str) -> int:
        return sum(e.bytes for e in self.entries if e.direction == direction)

    def per_round(self) -> list[dict[str, Any]]:
        rounds: dict[int, dict[str, Any]] = {}
        for e in self.entries:
            r = rounds.setdefault(e.round, {"round": e.round, "up_bytes": 0, "down_bytes": 0, "clients": {}})
            r[f"{e.direction}_bytes"] += e.bytes
            c = r["clients"].setdefault(e.client, {"up_bytes": 0, "down_bytes": 0})
            c[f"{e.direction}_bytes"] += e.bytes
        return [rounds[k] for k in sorted(rounds)]

    def summary(self) -> dict[str, Any]:
        return {"up_bytes": self.total("up"), "down_bytes": self.total("down"), "per_round": self.per_round()}

    def to_list(self) -> list[dict[str, Any]]:
        return [e.__dict__.copy() for e in self.entries]

    @classmethod
    def from_list(cls, rows: list[dict[str, Any]]) -> "ByteLedger":
        return cls([LedgerEntry(**r) for r in rows])


class Federation(ABC):
    """A set of clients the server can call. Subclasses implement :meth:`_deliver` only.

    ``methods`` names the client handlers the clients answer (the server checks a call against it before
    anything is sent). ``on_failure``: ``"stop"`` raises :class:`ClientFailure` naming the first failed
    client; ``"skip"`` records the failure in ``failures`` and returns the other replies. A call in which
    every client failed, or fewer than ``min_clients`` of the addressed ones replied (at most as many as
    were addressed), raises :class:`AllClientsFailed` under either policy.
    """

    def __init__(self, clients: Iterable[str], methods: Iterable[str], on_failure: str = "stop",
                 min_clients: int = 1):
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure = {on_failure!r}; allowed values: {', '.join(FAILURE_POLICIES)}")
        if min_clients < 1:
            raise ValueError(f"min_clients = {min_clients}; it must be >= 1")
        self.clients: list[str] = list(clients)
        self.methods: list[str] = list(methods)
        self.on_failure = on_failure
        self.min_clients = min_clients
        self.ledger = ByteLedger()
        self.failures: list[dict[str, Any]] = []
        self.declared_examples: dict[str, int] = {}
        """Each client's example count as first reported; its later weights may not exceed it."""
        self._replays = ReplayGuard()
        self._timings: dict[str, float] = {}
        self.notes: dict[str, Any] = {}
        """What a runtime reports about the current round (e.g. SecAgg+'s error bound); see take_notes."""

    # -- what a runtime implements ---------------------------------------------------------------------
    @abstractmethod
    def _deliver(self, method: str, payloads: dict[str, Message], round: int) -> dict[str, Delivery]:
        """Run handler ``method`` on every addressed client with its payload; one :class:`Delivery` per
        client (errors are returned, not raised)."""

    def close(self) -> None:
        """Release the runtime's resources (processes, connections). Idempotent."""

    # -- what algorithms use ---------------------------------------------------------------------------
    def _check_call(self, method: str, payloads: dict[str, Message]) -> None:
        if method not in self.methods:
            raise KeyError(f"no client handler {method!r}; registered: {', '.join(self.methods)}")
        for cid in payloads:
            if cid not in self.clients:
                raise KeyError(f"unknown client {cid!r}; clients: {', '.join(self.clients)}")

    def _check_quorum(self, method: str, round: int, got: int, addressed: int) -> None:
        if addressed and not got:
            raise AllClientsFailed(f"every client failed in {method!r} (round {round}): "
                                   f"{self.failures[-1]['error'] if self.failures else 'no reply'}")
        need = min(self.min_clients, addressed)
        if got < need:
            raise AllClientsFailed(f"only {got} of {addressed} clients replied in {method!r} (round {round}); "
                                   f"federation.min_clients = {self.min_clients}: see the failures above, "
                                   "restart the missing clients and resume the run (--resume)")

    def call(self, method: str, payloads: dict[str, Message], round: int = 0,
             metered: bool = True, expect: "Layout | dict[str, torch.Tensor] | None" = None) -> dict[str, Message]:
        """Send each addressed client its payload, run handler ``method`` there, return the replies.

        Every reply is validated before it is returned (``fedkt.federation.validate.check_reply``: the
        handler's schema; ``expect``: the adapter the server expects back, names/shapes/dtypes); a reply that
        fails, or any error while handling it, is that client's failure under the policy.
        ``metered=False`` keeps the exchange out of the protocol's communication totals (evaluation
        reports, which no algorithm needs)."""
        self._check_call(method, payloads)
        layout = as_layout(expect)
        t0 = time.perf_counter()
        deliveries = self._deliver(method, payloads, round)
        replies: dict[str, Message] = {}
        for cid in payloads:
            d = deliveries.get(cid)
            if d is None:  # the runtime stopped early after a failure under policy "stop"
                continue
            try:
                if d.error is not None:
                    raise _Failed(d.error)
                check_reply(method, cid, d.reply, layout, self.declared_examples.get(cid))
                self._replays.check(method, cid, round, payloads[cid].tensors, d.reply)
                self._pin_examples(cid, d.reply)
            except _Failed as f:
                self._record_failure(cid, method, round, f.error)
                continue
            except Exception as e:  # noqa: BLE001 - whatever a reply does, it is that client's failure
                self._record_failure(cid, method, round, e)
                continue
            if metered:
                self.ledger.record(round, method, cid, "down", d.down_bytes)
                self.ledger.record(round, method, cid, "up", d.up_bytes)
            replies[cid] = d.reply
        self._timings[method] = self._timings.get(method, 0.0) + time.perf_counter() - t0
        self._check_quorum(method, round, len(replies), len(payloads))
        return replies

    def _pin_examples(self, cid: str, reply: Message) -> None:
        """The first example count a client reports is its declared one: a later weight may not exceed it."""
        n = reply.meta.get("num_examples")
        if cid not in self.declared_examples and isinstance(n, int) and not isinstance(n, bool) and n > 0:
            self.declared_examples[cid] = n

    def aggregate(self, method: str, payloads: dict[str, Message], round: int = 0,
                  weight_key: str = "num_examples",
                  expect: "Layout | dict[str, torch.Tensor] | None" = None) -> Aggregate:
        """Run handler ``method`` on each addressed client and return only the weighted mean of the
        replies' tensors (weight: ``reply.meta[weight_key]``; ``""``: the plain mean), with each
        contributor's weight and meta. ``expect``: the adapter layout every reply must have.

        Runtimes with secure aggregation override this so that no individual reply's tensors reach the
        server; here (in-process simulation) it is the plain weighted mean of the replies."""
        replies = self.call(method, payloads, round, expect=expect)
        weights: dict[str, float] = {}
        for cid, r in list(replies.items()):
            try:
                weights[cid] = reply_weight(cid, r, weight_key, self.declared_examples.get(cid))
            except Exception as e:  # noqa: BLE001 - that client's failure
                del replies[cid]
                self._record_failure(cid, method, round, e)
        self._check_quorum(method, round, len(replies), len(payloads))
        tensors = weighted_mean([r.tensors for r in replies.values()], list(weights.values()))
        return Aggregate(tensors=tensors, clients=list(replies), weights=weights,
                         meta={cid: dict(r.meta) for cid, r in replies.items()})

    def _record_failure(self, cid: str, method: str, round: int, error: BaseException | str) -> None:
        """Apply the failure policy to one failed client (used by runtimes' own protocols)."""
        if self.on_failure == "stop":
            raise ClientFailure(cid, method, error) from (error if isinstance(error, BaseException) else None)
        self.failures.append({"round": round, "method": method, "client": cid, "error": _describe(error)})
        progress.log(f"[yellow]client {escape(str(cid))} failed in {method!r} (round {round}): "
                     f"{escape(_describe(error))}; skipped[/]")

    def broadcast(self, method: str, msg: Message, round: int = 0, metered: bool = True,
                  expect: "Layout | dict[str, torch.Tensor] | None" = None) -> dict[str, Message]:
        """The same payload to every client."""
        return self.call(method, {cid: msg for cid in self.clients}, round, metered, expect=expect)

    def take_notes(self) -> dict[str, Any]:
        """The runtime's notes since they were last taken (then cleared); the round driver adds them to the
        round's metrics entry (e.g. ``secagg``: per method, contributors, error bound, clipped values)."""
        notes, self.notes = self.notes, {}
        return notes

    def take_timing(self, method: str) -> float:
        """Seconds spent in calls of ``method`` since it was last taken (then reset to 0)."""
        return self._timings.pop(method, 0.0)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume the federation's bookkeeping."""
        return {"ledger": self.ledger.to_list(), "failures": [dict(f) for f in self.failures],
                "declared_examples": dict(self.declared_examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger.entries[:] = ByteLedger.from_list(state.get("ledger", [])).entries
        self.failures[:] = [dict(f) for f in state.get("failures", [])]
        self.declared_examples.update(state.get("declared_examples", {}))

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Failed(Exception):
    def __init__(self, error: BaseException | str):
        self.error = error


def _describe(error: BaseException | str) -> str:
    try:
        text = error if isinstance(error, str) else repr(error)
    except Exception:  # noqa: BLE001 - a hostile exception whose repr raises
        text = f"{type(error).__name__}(<unprintable>)"
    return text if len(text) <= 2000 else text[:2000] + f"... ({len(text)} characters)"
