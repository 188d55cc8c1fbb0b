"""The message client and server exchange, and its wire format: what both sides import, and nothing else.

A :class:`Message` carries named tensors (adapter weights, logits), texts and small JSON metadata.
:func:`encode`/:func:`decode` serialise it: ``b"FKT1"`` + 8-byte little-endian length of a UTF-8 JSON header
(texts, meta) + a safetensors blob of the tensors. Tensors keep dtype and shape exactly (bit-exact round
trip). The runtimes meter these bytes (``fedkt.federation.codec``); a client's state store persists itself
with them (``fedkt.clients.StateStore``).

JSON a peer sends is parsed by :func:`loads`, which refuses oversized or too deeply nested text *before*
``json`` recurses into it (an iterative scan), so a nested bomb is a :class:`ReplyError`, never a
``RecursionError``; :func:`check_safetensors_header` does the same for a tensor blob's header.

This module imports nothing of fedkt's: the client side (``fedkt.clients``) and the federation layer
(``fedkt.federation``) both build on it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects accepted in any JSON a peer sends (fedkt's own need at most 4)."""
MAX_JSON_BYTES = 256 * 2**20
"""Largest JSON text parsed from a peer (texts of a whole client's data set fit far below it)."""


@dataclass
class Message:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


class ReplyError(ValueError):
    """A reply (or a payload) that fails its schema; the message names the field and what was expected."""


# ------------------------------------------------------------------------------------------------- JSON
def check_json_text(text: str | bytes, what: str, max_bytes: int = MAX_JSON_BYTES,
                    max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON text above ``max_bytes`` or nested deeper than ``max_depth`` (an iterative scan of the
    brackets outside strings: it never recurses, whatever the input)."""
    if len(text) > max_bytes:
        raise ReplyError(f"{what} is {len(text)} bytes of JSON, the limit is {max_bytes}")
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ReplyError(f"{what} is not UTF-8 ({e})") from None
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise ReplyError(f"{what} is JSON nested deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1


def loads(text: str | bytes, what: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` after :func:`check_json_text`; any failure is a :class:`ReplyError` naming ``what``."""
    check_json_text(text, what, max_bytes, max_depth)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise ReplyError(f"{what} names the key {str(e)[:64]!r} twice") from None
    except (ValueError, RecursionError) as e:
        raise ReplyError(f"{what} is not valid JSON: {type(e).__name__}: {e}") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects whose keys repeat are refused (parsers disagree on which value wins)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def check_safetensors_header(blob: bytes, what: str) -> None:
    """The safetensors header of ``blob``: its length within the blob, JSON within the limits, no repeated
    tensor name (the blob itself is then parsed by safetensors, which checks offsets and shapes)."""
    if len(blob) < 8:
        raise ReplyError(f"{what}: {len(blob)} bytes, too short for a safetensors blob")
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    if n > len(blob) - 8:
        raise ReplyError(f"{what}: safetensors header length {n} exceeds the {len(blob) - 8} bytes that follow")
    header = loads(bytes(blob[8:8 + n]), f"{what}: safetensors header", max_depth=4)
    if not isinstance(header, dict):
        raise ReplyError(f"{what}: the safetensors header is not a JSON object")


# ------------------------------------------------------------------------------------------------ codec
MAGIC = b"FKT1"


def encode(msg: Message) -> bytes:
    header = json.dumps({"texts": msg.texts, "meta": msg.meta}, separators=(",", ":")).encode()
    tensors = {k: v.detach().contiguous().cpu() for k, v in msg.tensors.items()}
    blob = st_save(tensors) if tensors else b""
    return MAGIC + struct.pack("<Q", len(header)) + header + blob


def decode(data: bytes) -> Message:
    """Rebuild a :class:`Message`; anything malformed (bad magic, a header length past the end, JSON too
    large or too deeply nested, a bad safetensors blob) raises ``ValueError`` saying what, never a
    ``RecursionError`` or a huge allocation."""
    if len(data) < 12 or data[:4] != MAGIC:
        raise ValueError("not a fedkt message (bad magic)")
    (n,) = struct.unpack("<Q", data[4:12])
    if n > len(data) - 12:
        raise ValueError(f"malformed fedkt message: header length {n} exceeds the {len(data) - 12} bytes that follow")
    header = loads(bytes(data[12:12 + n]), "fedkt message header")
    if not isinstance(header, dict) or not isinstance(header.get("texts"), list) \
            or not isinstance(header.get("meta"), dict):
        raise ValueError("malformed fedkt message: the header must be a JSON object with a list 'texts' and an "
                         "object 'meta'")
    blob = data[12 + n:]
    if blob:
        check_safetensors_header(blob, "malformed fedkt message: tensor blob")
    try:
        tensors = dict(st_load(bytes(blob))) if blob else {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"malformed fedkt message: the tensor blob is not valid safetensors ({e})") from None
    return Message(tensors=tensors, texts=header["texts"], meta=header["meta"])
