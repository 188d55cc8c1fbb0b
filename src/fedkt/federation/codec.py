"""Serialise a :class:`Message` to bytes and back: the only wire format the in-process runtime meters.

Layout: ``b"FKT1"`` + 8-byte little-endian length of a UTF-8 JSON header (texts, meta) + a safetensors
blob of the tensors. Tensors keep dtype and shape exactly (bit-exact round trip).
"""

from __future__ import annotations

import json
import struct

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedkt.federation.base import Message

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
    from fedkt.federation.validate import check_safetensors_header, loads

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
