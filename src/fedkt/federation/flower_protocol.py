"""What both halves of the Flower runtime agree on: message types, node-config keys, node identity, and how
a client handler's exception travels back to the server.

The client app (:mod:`~fedkt.federation.flower_client_app`), the server's federation
(:mod:`~fedkt.federation.flower`) and secure aggregation (:mod:`~fedkt.federation.flower_secagg`) all
import this module; it imports nothing of theirs.

* A handler exception is caught in the ClientApp and returned as a Flower ``Error`` (:func:`error_reply`)
  whose reason carries the exception type, message and repr as JSON; the server rebuilds a
  :class:`RemoteClientError` of the same type name (:func:`error_of`), so ``ClientFailure`` messages and
  ``failures`` entries read exactly as in-process.
* :func:`flower_wire_bytes` measures what Flower's own framing carries (the federation meters
  ``len(codec.encode(msg))``, the in-process figure; this is the Flower figure on top).
"""

from __future__ import annotations

import json
from typing import Any

from fedkt.federation import flower_codec  # noqa: F401  (sets FLOWER_ENV before flwr is imported)
from fedkt.federation.flower_spec import CLIENT_ID_KEY, SPEC_KEY, spec_text
from fedkt.message import loads

from flwr.app import Context, Error, RecordDict  # noqa: E402  (after FLOWER_ENV)
from flwr.app import Message as FlMessage  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402

CATEGORY = "query"
"""Flower message category of every fedkt call: method ``m`` travels as message type ``"query.m"``."""
IDENTIFY = "_fedkt_identify"
"""The unmetered call by which each node names its client and the handlers it serves."""
SCOPE_SEP = "__"
"""Handler ``"<method>__<handler>"`` of a multi-method app runs in method ``<method>``'s own client scope."""


def client_id_of(context: Context) -> str:
    """The fedkt client a node serves: node config ``fedkt-client-id``, else its spec's ``cid``, else its
    ``partition-id``, else its node id."""
    cfg = context.node_config
    if CLIENT_ID_KEY in cfg:
        return str(cfg[CLIENT_ID_KEY])
    if SPEC_KEY in cfg:
        return str(json.loads(spec_text(cfg[SPEC_KEY]))["cid"])
    if "partition-id" in cfg:
        return str(cfg["partition-id"])
    return str(context.node_id)


def error_reply(message: FlMessage, e: BaseException) -> FlMessage:
    """Client side: the Flower error reply to ``message`` carrying exception ``e``."""
    reason = json.dumps({"type": type(e).__name__, "message": str(e), "repr": repr(e)})
    return FlMessage(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


class RemoteClientError(RuntimeError):
    """An exception raised by a client handler on a remote node; its class name is the remote type's."""

    _types: dict[str, type] = {}

    def __init__(self, message: str, remote_repr: str):
        super().__init__(message)
        self.remote_repr = remote_repr

    def __repr__(self) -> str:
        return self.remote_repr

    @classmethod
    def build(cls, type_name: str, message: str, remote_repr: str) -> "RemoteClientError":
        if not type_name.isidentifier():
            type_name = "RemoteError"
        sub = cls._types.get(type_name)
        if sub is None:
            sub = cls._types[type_name] = type(type_name, (cls,), {"__module__": "remote"})
        return sub(message, remote_repr)


def error_of(reply: FlMessage) -> BaseException:
    """Server side: the exception an error reply carries (a :class:`RemoteClientError` of the remote type's
    name; a reason that is not fedkt's becomes a ``FlowerError``)."""
    err = reply.error
    try:
        info = loads(err.reason or "", "error reason", max_bytes=2**20)
        if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("type", "message", "repr")):
            raise ValueError("not a fedkt error reason")
        return RemoteClientError.build(info["type"], info["message"], info["repr"])
    except (ValueError, KeyError, TypeError):
        text = f"Flower error code {err.code}: {str(err.reason)[:2000]}"
        return RemoteClientError.build("FlowerError", text, f"FlowerError({text!r})")


def flower_wire_bytes(content: RecordDict) -> int:
    """Bytes of the Flower objects a ``RecordDict`` deflates to (what Flower's transport carries)."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(content).values())
