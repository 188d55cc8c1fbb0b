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
    if data[:4] != MAGIC:
        raise ValueError("not a fedkt message (bad magic)")
    (n,) = struct.unpack("<Q", data[4:12])
    header = json.loads(data[12:12 + n])
    blob = data[12 + n:]
    tensors = dict(st_load(blob)) if blob else {}
    return Message(tensors=tensors, texts=header["texts"], meta=header["meta"])
