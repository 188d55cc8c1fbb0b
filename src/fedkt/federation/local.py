"""In-process federation: one process, deterministic, every payload serialised and metered.

Each call encodes the payload, decodes it on the "client side", runs the handler on that client's
:class:`~fedkt.clients.ClientContext`, and does the same for the reply, so no object crosses the
client/server boundary by accident and the ledger counts what a wire would carry. Clients run one after
another in the order given.
"""

from __future__ import annotations

from typing import Iterable

from fedkt.clients import ClientContext, Handler
from fedkt.federation import codec
from fedkt.federation.base import Delivery, Federation
from fedkt.federation.validate import check_request
from fedkt.message import Message


class LocalFederation(Federation):
    def __init__(self, contexts: Iterable[ClientContext], handlers: dict[str, Handler], on_failure: str = "stop",
                 min_clients: int = 1):
        contexts = list(contexts)
        super().__init__([c.cid for c in contexts], handlers, on_failure, min_clients)
        self._contexts = {c.cid: c for c in contexts}
        self._handlers = dict(handlers)

    def _deliver(self, method: str, payloads: dict[str, Message], round: int) -> dict[str, Delivery]:
        handler = self._handlers[method]
        out: dict[str, Delivery] = {}
        for cid, msg in payloads.items():
            down = codec.encode(msg)
            try:
                ctx = self._contexts[cid]
                request = codec.decode(down)
                check_request(method, request)  # the client refuses an absurd request (as on Flower)
                reply = handler(ctx, request)
                ctx.save_state()
                up = codec.encode(reply)
                got = codec.decode(up)  # what the server receives: a malformed reply is this client's failure
            except Exception as e:  # noqa: BLE001 - reported per client, the policy decides
                out[cid] = Delivery(error=e, down_bytes=len(down))
                if self.on_failure == "stop":  # no point running the others
                    break
                continue
            out[cid] = Delivery(reply=got, down_bytes=len(down), up_bytes=len(up))
        return out
