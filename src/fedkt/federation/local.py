"""In-process federation: one process, deterministic, every payload serialised and metered.

Simulated clients share one frozen base model in memory: a :class:`ClientContext` holds a client's own
data, state store and workdir, plus references to the shared model and tokenizer. Each call encodes the
payload, decodes it on the "client side", runs the handler, and does the same for the reply, so no
object is shared across the boundary by accident.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedkt import progress
from fedkt.federation import codec
from fedkt.federation.base import ByteLedger, ClientFailure, Message


@dataclass
class ClientContext:
    cid: str
    data: list = field(default_factory=list)
    """The client's private training examples."""
    state: dict[str, Any] = field(default_factory=dict)
    """What survives between calls (the Flower runtime persists it in the node's state)."""
    shared: dict[str, Any] = field(default_factory=dict)
    """Resources shared by simulated clients: the frozen model, tokenizer, config, eval sets."""
    workdir: Path | None = None


Handler = Callable[[ClientContext, Message], Message]


class LocalFederation:
    def __init__(self, contexts: list[ClientContext], handlers: dict[str, Handler],
                 on_failure: str = "stop", ledger: ByteLedger | None = None):
        self.contexts = {c.cid: c for c in contexts}
        self.clients = list(self.contexts)
        self.handlers = handlers
        self.on_failure = on_failure
        self.ledger = ledger or ByteLedger()
        self.failures: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}

    def call(self, method: str, payloads: dict[str, Message], round: int = 0,
             metered: bool = True) -> dict[str, Message]:
        if method not in self.handlers:
            raise KeyError(f"no client handler {method!r}; registered: {', '.join(self.handlers)}")
        handler = self.handlers[method]
        replies: dict[str, Message] = {}
        t0 = time.perf_counter()
        for cid, msg in payloads.items():
            if cid not in self.contexts:
                raise KeyError(f"unknown client {cid!r}; clients: {', '.join(self.clients)}")
            down = codec.encode(msg)
            try:
                reply = handler(self.contexts[cid], codec.decode(down))
            except Exception as e:  # noqa: BLE001 - reported per client, policy decides
                if self.on_failure == "stop":
                    raise ClientFailure(cid, method, e) from e
                self.failures.append({"round": round, "method": method, "client": cid, "error": repr(e)})
                progress.log(f"[yellow]client {cid} failed in {method!r} (round {round}): {e!r}; skipped[/]")
                continue
            up = codec.encode(reply)
            if metered:
                self.ledger.record(round, method, cid, "down", len(down))
                self.ledger.record(round, method, cid, "up", len(up))
            replies[cid] = codec.decode(up)
        self.timings[method] = self.timings.get(method, 0.0) + time.perf_counter() - t0
        if not replies and payloads:
            raise RuntimeError(f"every client failed in {method!r} (round {round}): {self.failures[-1]['error']}")
        return replies

    def broadcast(self, method: str, msg: Message, round: int = 0, metered: bool = True) -> dict[str, Message]:
        return self.call(method, {cid: msg for cid in self.clients}, round, metered)
