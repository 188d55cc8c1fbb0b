"""The call interface every algorithm is written against, and the byte ledger.

An algorithm is a server-driven sequence of calls: ``federation.call(name, {client: Message})`` runs the
client handler ``name`` on each addressed client and returns ``{client: reply}``. A :class:`Message`
carries named tensors (adapter weights, logits), texts and small JSON metadata. The ledger records the
size of every serialised payload, per client, direction and round, so communication cost is measured on
what a wire would carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Message:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


class ClientFailure(RuntimeError):
    def __init__(self, client: str, method: str, error: BaseException):
        super().__init__(f"client {client} failed in {method!r}: {type(error).__name__}: {error}")
        self.client, self.method, self.error = client, method, error


class Federation(Protocol):
    clients: list[str]
    ledger: "ByteLedger"

    def call(self, method: str, payloads: dict[str, Message], round: int = 0,
             metered: bool = True) -> dict[str, Message]:
        """Send each addressed client its payload, run handler ``method`` there, return the replies.

        Clients that fail are reported in ``failures`` (policy "skip") or raise :class:`ClientFailure`
        (policy "stop"). ``metered=False`` keeps the exchange out of the protocol's communication totals
        (used for evaluation reports, which no algorithm needs)."""
        ...


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
