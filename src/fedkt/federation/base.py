"""The call interface every algorithm is written against, and the byte ledger.

An algorithm is a server-driven sequence of calls: ``federation.call(name, {client: Message})`` runs the
client handler ``name`` on each addressed client and returns ``{client: reply}``. A :class:`Message`
carries named tensors (adapter weights, logits), texts and small JSON metadata.

:class:`Federation` is the *whole* surface an algorithm may use: ``clients``, ``call``, ``broadcast``,
``failures``, ``ledger``, ``take_timing`` and ``state_dict``/``load_state_dict`` (for resume). The shared
logic (argument checks, the failure policy, metering, timings) lives here; a runtime implements one
method, :meth:`Federation._deliver`, that gets each payload to its client and the reply (or the error)
back. ``LocalFederation`` (in-process) and the Flower runtime differ only there.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

FAILURE_POLICIES = ("stop", "skip")


@dataclass
class Message:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


class ClientFailure(RuntimeError):
    def __init__(self, client: str, method: str, error: BaseException | str):
        detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(f"client {client} failed in {method!r}: {detail}")
        self.client, self.method, self.error = client, method, error


class AllClientsFailed(RuntimeError):
    """Every addressed client failed in one call (whatever the policy): the round cannot proceed."""


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
    every client failed raises :class:`AllClientsFailed` under either policy.
    """

    def __init__(self, clients: Iterable[str], methods: Iterable[str], on_failure: str = "stop"):
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure = {on_failure!r}; allowed values: {', '.join(FAILURE_POLICIES)}")
        self.clients: list[str] = list(clients)
        self.methods: list[str] = list(methods)
        self.on_failure = on_failure
        self.ledger = ByteLedger()
        self.failures: list[dict[str, Any]] = []
        self._timings: dict[str, float] = {}

    # -- what a runtime implements ---------------------------------------------------------------------
    @abstractmethod
    def _deliver(self, method: str, payloads: dict[str, Message], round: int) -> dict[str, Delivery]:
        """Run handler ``method`` on every addressed client with its payload; one :class:`Delivery` per
        client (errors are returned, not raised)."""

    def close(self) -> None:
        """Release the runtime's resources (processes, connections). Idempotent."""

    # -- what algorithms use ---------------------------------------------------------------------------
    def call(self, method: str, payloads: dict[str, Message], round: int = 0,
             metered: bool = True) -> dict[str, Message]:
        """Send each addressed client its payload, run handler ``method`` there, return the replies.

        ``metered=False`` keeps the exchange out of the protocol's communication totals (evaluation
        reports, which no algorithm needs)."""
        if method not in self.methods:
            raise KeyError(f"no client handler {method!r}; registered: {', '.join(self.methods)}")
        for cid in payloads:
            if cid not in self.clients:
                raise KeyError(f"unknown client {cid!r}; clients: {', '.join(self.clients)}")
        t0 = time.perf_counter()
        deliveries = self._deliver(method, payloads, round)
        replies: dict[str, Message] = {}
        for cid in payloads:
            d = deliveries.get(cid)
            if d is None:  # the runtime stopped early after a failure under policy "stop"
                continue
            if d.error is not None:
                if self.on_failure == "stop":
                    raise ClientFailure(cid, method, d.error) from (d.error if isinstance(d.error, BaseException)
                                                                    else None)
                self.failures.append({"round": round, "method": method, "client": cid, "error": _describe(d.error)})
                from fedkt import progress

                progress.log(f"[yellow]client {cid} failed in {method!r} (round {round}): "
                             f"{_describe(d.error)}; skipped[/]")
                continue
            if metered:
                self.ledger.record(round, method, cid, "down", d.down_bytes)
                self.ledger.record(round, method, cid, "up", d.up_bytes)
            replies[cid] = d.reply
        self._timings[method] = self._timings.get(method, 0.0) + time.perf_counter() - t0
        if not replies and payloads:
            raise AllClientsFailed(f"every client failed in {method!r} (round {round}): {self.failures[-1]['error']}")
        return replies

    def broadcast(self, method: str, msg: Message, round: int = 0, metered: bool = True) -> dict[str, Message]:
        """The same payload to every client."""
        return self.call(method, {cid: msg for cid in self.clients}, round, metered)

    def take_timing(self, method: str) -> float:
        """Seconds spent in calls of ``method`` since it was last taken (then reset to 0)."""
        return self._timings.pop(method, 0.0)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume the federation's bookkeeping."""
        return {"ledger": self.ledger.to_list(), "failures": [dict(f) for f in self.failures]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger.entries[:] = ByteLedger.from_list(state.get("ledger", [])).entries
        self.failures[:] = [dict(f) for f in state.get("failures", [])]

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe(error: BaseException | str) -> str:
    return error if isinstance(error, str) else repr(error)
