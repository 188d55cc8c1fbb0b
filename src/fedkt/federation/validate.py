"""Every reply a server receives is checked against its handler's schema before any algorithm sees it.

The network is hostile (docs/hostile-inputs.md): a client may reply anything. :func:`check_reply` runs in
:meth:`Federation.call <fedkt.federation.base.Federation.call>` (the shared path of every runtime, so the
in-process simulation and a Flower deployment refuse the same replies) and raises :class:`ReplyError`
naming the client, the handler and the field at fault; the federation turns it into that client's
failure (``on_client_failure``: ``skip`` goes on with the others, ``stop`` stops with the error).

What is checked:

* **Structure**: ``tensors`` a dict of str -> ``torch.Tensor``, ``texts`` a list of UTF-8-encodable str
  (at most :data:`MAX_TEXTS` of at most :data:`MAX_TEXT_CHARS` characters), ``meta`` a dict with str keys
  whose JSON is at most :data:`MAX_META_BYTES` and :data:`MAX_JSON_DEPTH` deep.
* **Per handler** (:data:`SCHEMAS`, keyed by handler name and derived from the declarations in
  :mod:`fedkt.reply_schemas`; a handler without a schema gets the structural checks only): the meta
  keys it must and may hold and their types, whether it may carry tensors or texts, and for adapter
  replies (``fit``, ``decode_train``): tensors of an allowed float dtype (:data:`FLOAT_DTYPES`), finite,
  and -- when the server says what it expects (``expect``: the adapter it sent) -- exactly the expected
  names, shapes and dtypes.
* **Weights** (:func:`check_weight`): a real number (not a bool), finite, > 0, at most
  :data:`MAX_WEIGHT`, and at most the client's declared example count when the federation knows it (the
  first count a client reported is pinned for the rest of the run).

JSON a peer sends is parsed by :func:`fedkt.message.loads` (size and depth checked before parsing).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from rich.markup import escape as rich_escape

from fedkt.message import Message, ReplyError, check_json_text
from fedkt.reply_schemas import (CHECK_NAMES, MAX_WEIGHT, REPLIES, Check, Reply, count, finite, obj,
                                  real)

MAX_META_BYTES = 8 * 2**20
"""Largest JSON of one reply's meta."""
MAX_TEXTS = 1_000_000
MAX_TEXT_CHARS = 1_000_000
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""dtypes an adapter reply's tensors may have."""


# ---------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """The tensors a reply must carry: name -> (shape, dtype)."""

    spec: dict[str, tuple[tuple[int, ...], torch.dtype]]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "Layout":
        return cls({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})


def as_layout(expect: "Layout | dict[str, torch.Tensor] | None") -> Layout | None:
    if expect is None or isinstance(expect, Layout):
        return expect
    return Layout.of(expect)


@dataclass(frozen=True)
class Schema:
    """What a handler's reply may hold. ``tensors``: ``"adapter"`` (float, finite, as expected) or
    ``"none"``; ``texts``: whether texts may come back; ``meta``: required keys -> check; ``optional``:
    keys it may hold; ``weight``: the meta key that is an aggregation weight (see :func:`check_weight`)."""

    meta: dict[str, Check]
    optional: dict[str, Check] = field(default_factory=dict)
    tensors: str = "none"
    texts: bool = False
    weight: str = ""
    consistent: Callable[[Any], str] | None = None
    """A cross-field check of the whole reply: returns what is wrong ("" if nothing)."""


def _schemas(replies: tuple[Reply, ...]) -> dict[str, Schema]:
    """Handler name -> the union of the reply declarations registered under it (see :mod:`fedkt.reply_schemas`)."""
    out: dict[str, Schema] = {}
    for name in dict.fromkeys(r.handler for r in replies):
        group = [r for r in replies if r.handler == name]
        checks: dict[str, Check] = {}
        required: dict[str, int] = {}
        for r in group:
            for k in r.keys:
                if not k.pattern.startswith("meta."):
                    continue
                key = k.pattern.removeprefix("meta.")
                if checks.setdefault(key, k.check) is not k.check:
                    raise ValueError(f"reply_schemas: handler {name!r} declares meta key {key!r} with two checks")
                required[key] = required.get(key, 0) + k.required
        patterns = {k.pattern for r in group for k in r.keys}
        weights = {r.weight for r in group}
        consistent = {r.consistent for r in group}
        if len(weights) > 1 or len(consistent) > 1:
            raise ValueError(f"reply_schemas: the declarations of handler {name!r} disagree on weight/consistent")
        out[name] = Schema(meta={k: c for k, c in checks.items() if required[k] == len(group)},
                           optional={k: c for k, c in checks.items() if required[k] < len(group)},
                           tensors="adapter" if "tensors.*" in patterns else "none", texts="texts" in patterns,
                           weight=weights.pop(), consistent=consistent.pop())
    return out


SCHEMAS: dict[str, Schema] = _schemas(REPLIES)
"""Handler name -> the schema of its replies, derived from :data:`fedkt.reply_schemas.REPLIES` (the same
declaration the client's outbound allow-list is derived from)."""


# ----------------------------------------------------------------------------------------------- checks
def check_weight(cid: str, value: Any, key: str, declared: int | float | None = None) -> float:
    """``value`` as an aggregation weight of client ``cid``: a finite real > 0, at most :data:`MAX_WEIGHT` and
    at most ``declared`` (the client's declared example count) when given."""
    if not real(value) or not math.isfinite(value) or not value > 0 or value > MAX_WEIGHT:
        raise ReplyError(f"client {cid} replied meta[{key!r}] = {value!r}; an aggregated reply needs a finite "
                         f"number in (0, {MAX_WEIGHT:.0f}] as its weight (not a bool)")
    if declared is not None and value > declared:
        raise ReplyError(f"client {cid} replied meta[{key!r}] = {value!r}, more than the {declared} examples it "
                         "declared: a client cannot raise its own weight")
    return float(value)


def _check_tensors(cid: str, method: str, tensors: dict[str, torch.Tensor], expect: Layout | None) -> None:
    where = f"client {cid} reply to {method!r}"
    if expect is not None:
        missing = sorted(set(expect.spec) - set(tensors))
        extra = sorted(set(tensors) - set(expect.spec))
        if missing or extra:
            raise ReplyError(f"{where}: tensors {sorted(tensors)[:8]} are not the expected adapter's "
                             f"(missing {missing[:8]}, unexpected {extra[:8]})")
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise ReplyError(f"{where}: tensor {name!r} has dtype {t.dtype}; allowed: "
                             f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
        if expect is not None:
            shape, dtype = expect.spec[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ReplyError(f"{where}: tensor {name!r} is {t.dtype}{list(t.shape)}, expected "
                                 f"{dtype}{list(shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ReplyError(f"{where}: tensor {name!r} holds NaN or infinite values")


def check_reply(method: str, cid: str, reply: Any, expect: Layout | None = None,
                declared: int | float | None = None) -> None:
    """Raise :class:`ReplyError` unless ``reply`` is a well-formed reply of handler ``method`` (see the module
    docstring); ``expect``: the adapter layout the server expects back; ``declared``: the client's example
    count, which its weight may not exceed."""
    where = f"client {cid} reply to {method!r}"
    if not isinstance(reply, Message):
        raise ReplyError(f"{where}: a {type(reply).__name__}, expected a fedkt Message")
    if not isinstance(reply.tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in reply.tensors.items()):
        raise ReplyError(f"{where}: tensors must map names to torch tensors")
    if not isinstance(reply.texts, list) or not all(isinstance(t, str) for t in reply.texts):
        raise ReplyError(f"{where}: texts must be a list of strings")
    if len(reply.texts) > MAX_TEXTS:
        raise ReplyError(f"{where}: {len(reply.texts)} texts, the limit is {MAX_TEXTS}")
    for i, t in enumerate(reply.texts):
        if len(t) > MAX_TEXT_CHARS:
            raise ReplyError(f"{where}: text {i} has {len(t)} characters, the limit is {MAX_TEXT_CHARS}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ReplyError(f"{where}: text {i} is not valid Unicode (lone surrogates)") from None
    if not obj(reply.meta):
        raise ReplyError(f"{where}: meta must be a JSON object with string keys")
    try:
        raw = json.dumps(reply.meta, allow_nan=True)
    except (TypeError, ValueError, RecursionError) as e:
        raise ReplyError(f"{where}: meta is not JSON ({type(e).__name__})") from None
    check_json_text(raw, f"{where}: meta", MAX_META_BYTES)
    schema = SCHEMAS.get(method)
    if schema is None:
        return
    for key, ok in schema.meta.items():
        if key not in reply.meta:
            raise ReplyError(f"{where}: meta lacks {key!r} ({CHECK_NAMES.get(ok, ok.__name__)})")
    for key, value in reply.meta.items():
        ok = schema.meta.get(key) or schema.optional.get(key)
        if ok is None:
            allowed = sorted({*schema.meta, *schema.optional})
            raise ReplyError(f"{where}: unexpected meta key {key[:64]!r}; allowed: {', '.join(allowed)}")
        if not ok(value):
            raise ReplyError(f"{where}: meta[{key!r}] = {_short(value)} is not {CHECK_NAMES.get(ok, ok.__name__)}")
    if schema.texts is False and reply.texts:
        raise ReplyError(f"{where}: {len(reply.texts)} texts; this handler replies none")
    if schema.tensors == "none" and reply.tensors:
        raise ReplyError(f"{where}: tensors {sorted(reply.tensors)[:8]}; this handler replies none")
    if schema.tensors == "adapter":
        _check_tensors(cid, method, reply.tensors, expect)
    if schema.weight:
        check_weight(cid, reply.meta[schema.weight], schema.weight, declared)
    if schema.consistent is not None and (why := schema.consistent(reply)):
        raise ReplyError(f"{where}: {why}")


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def escape(text: str) -> str:
    """``text`` safe to print through Rich (a peer's ``[/red]`` is shown, not interpreted)."""
    return rich_escape(text)


# ---------------------------------------------------------------------------------------------- replays
def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a tensor dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ReplayGuard:
    """Refuses an adapter reply that is bit-identical to one the same client sent for the same handler in an
    earlier round although the server sent a different adapter since (a replayed, stale update: a client
    that trained on the new adapter cannot reproduce its old reply bit for bit)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[int, str, str]] = {}

    def check(self, method: str, cid: str, round: int, sent: dict[str, torch.Tensor], reply: Any) -> None:
        schema = SCHEMAS.get(method)
        if schema is None or schema.tensors != "adapter" or not reply.tensors:
            return
        got, down = digest(reply.tensors), digest(sent)
        prev = self._seen.get((cid, method))
        if prev is not None and prev[0] != round and prev[2] == got and prev[1] != down:
            raise ReplyError(f"client {cid} reply to {method!r} in round {round} is bit-identical to its reply in "
                             f"round {prev[0]}, although the server sent another adapter: a replayed update")
        self._seen[(cid, method)] = (round, down, got)


# ---------------------------------------------------------------------------------------------- requests
MAX_EPOCHS = 1000.0
"""The most local epochs a client accepts in one request (a client's own policy may allow fewer)."""


def check_request(method: str, msg: Any) -> None:
    """Client side: refuse an absurd request before running the handler (``epochs`` not a finite number in
    [0, :data:`MAX_EPOCHS`], ``round`` not an integer >= 0, adapter tensors not finite floats)."""
    if not isinstance(msg, Message) or not obj(msg.meta):
        raise ReplyError(f"request to {method!r} is not a fedkt Message with a JSON-object meta")
    ep = msg.meta.get("epochs")
    if ep is not None and not (finite(ep) and 0 <= ep <= MAX_EPOCHS):
        raise ReplyError(f"request to {method!r} asks for epochs = {_short(ep)}; this client trains a finite "
                         f"number of epochs in [0, {MAX_EPOCHS:g}]")
    rnd = msg.meta.get("round")
    if rnd is not None and not count(rnd):
        raise ReplyError(f"request to {method!r} has round = {_short(rnd)}; expected an integer >= 0")
    schema = SCHEMAS.get(method)
    if schema is not None and schema.tensors == "adapter":
        for name, t in msg.tensors.items():
            if t.dtype not in FLOAT_DTYPES or not bool(torch.isfinite(t).all()):
                raise ReplyError(f"request to {method!r}: adapter tensor {name!r} is not a finite float tensor")
