"""Convert a fedkt :class:`~fedkt.federation.base.Message` to Flower records and back.

This is the ONLY module that builds or reads Flower records; nothing else outside
``fedkt.federation.flower`` imports ``flwr``.

Layout of the Flower ``RecordDict`` carrying one fedkt message:

* ``"fedkt.tensors"`` - an ``ArrayRecord`` with one ``Array`` per named tensor (numpy ``.npy`` bytes,
  Flower's own serialisation, so Flower mods and strategies can read the arrays).
* ``"fedkt.header"`` - a ``ConfigRecord`` of flat values only: ``version`` (int), ``texts`` (JSON list),
  ``meta`` (JSON object, may be nested) and ``dtypes`` (JSON object: tensor name -> torch dtype name).

Decisions:

* **dtypes without a numpy twin** (``bfloat16``, the float8 family, unsigned 16/32/64-bit) are rejected
  by ``Array``. They travel as a same-width integer *view* of their bits (``bfloat16`` -> ``int16``) and
  are viewed back to the original dtype on decode, so the round trip is bit-exact (NaN payloads and
  signed zeros included). ``dtypes`` always names the original torch dtype, and decode checks that the
  carried array has the width and shape that dtype implies.
* **texts and meta are JSON strings**, because ``ConfigRecord`` holds only flat values and homogeneous
  lists (an empty or mixed list, a nested dict, ``None`` would be rejected or lose their type).
* **size limit**: arrays are chunked by Flower (5 MiB chunks) but the header record travels as one
  protobuf message, and a whole payload must fit the transport; :func:`encode` refuses payloads above
  ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`, just under protobuf's 2 GiB) with an error naming the
  largest tensors and what to do.
* **malformed records** (missing record, wrong value types, bad JSON, dtype/shape mismatch, stray
  records) raise :class:`ValueError` saying which part is wrong.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch

from fedkt.federation.flower_env import set_flower_env

set_flower_env()  # before the first flwr import: flwr reads telemetry settings at import time

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from fedkt.message import Message  # noqa: E402
from fedkt.message import loads  # noqa: E402

VERSION = 1
TENSORS_KEY = "fedkt.tensors"
HEADER_KEY = "fedkt.header"
DEFAULT_MAX_BYTES = 2**31 - 2**20
"""Just under protobuf's 2 GiB message limit: the largest payload :func:`encode` accepts by default."""

# torch dtypes numpy represents natively (Array stores them as themselves)
_NATIVE = {
    torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8",
    torch.uint8: "uint8", torch.bool: "bool", torch.complex64: "complex64", torch.complex128: "complex128",
}
# carrier integer dtype for every other dtype, by element width in bytes
_CARRIER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _carrier(dtype: torch.dtype) -> torch.dtype:
    if dtype in _NATIVE:
        return dtype
    width = torch.empty((), dtype=dtype).element_size()
    if width not in _CARRIER:
        raise ValueError(f"cannot carry tensors of dtype {dtype} over Flower (element width {width} bytes)")
    return _CARRIER[width]


def _tensor_to_array(name: str, t: torch.Tensor) -> Array:
    t = t.detach().cpu().contiguous()
    carrier = _carrier(t.dtype)
    if carrier is not t.dtype:
        t = t.view(carrier)
    return Array(t.numpy())


def _payload_bytes(msg: Message) -> tuple[int, list[tuple[int, str]]]:
    sizes = [(v.numel() * v.element_size(), k) for k, v in msg.tensors.items()]
    return sum(s for s, _ in sizes), sizes


def encode(msg: Message, max_bytes: int = DEFAULT_MAX_BYTES) -> RecordDict:
    """Build the Flower ``RecordDict`` that carries ``msg`` (see the module docstring for the layout)."""
    try:
        texts = json.dumps(list(msg.texts), ensure_ascii=False)
        meta = json.dumps(msg.meta, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"Message.texts/meta must be JSON-serialisable: {e}") from e
    if any(not isinstance(t, str) for t in msg.texts):
        raise TypeError("Message.texts must hold only str")
    for k, v in msg.tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"Message.tensors[{k!r}] is a {type(v).__name__}, expected a torch.Tensor")
    tensor_bytes, sizes = _payload_bytes(msg)
    total = tensor_bytes + len(texts.encode()) + len(meta.encode())
    if total > max_bytes:
        largest = ", ".join(f"{k!r} ({s / 2**20:.1f} MiB)" for s, k in sorted(sizes, reverse=True)[:3])
        raise ValueError(
            f"payload of {total / 2**20:.1f} MiB exceeds the Flower transport limit of "
            f"{max_bytes / 2**20:.1f} MiB (largest tensors: {largest or 'none'}; texts+meta "
            f"{(len(texts) + len(meta)) / 2**20:.1f} MiB); split the call into smaller payloads "
            "or raise max_bytes")
    arrays = ArrayRecord({k: _tensor_to_array(k, v) for k, v in msg.tensors.items()})
    header = ConfigRecord({
        "version": VERSION, "texts": texts, "meta": meta,
        "dtypes": json.dumps({k: _dtype_name(v.dtype) for k, v in msg.tensors.items()}),
    })
    return RecordDict({TENSORS_KEY: arrays, HEADER_KEY: header})


def _json_field(header: ConfigRecord, key: str, kind: type) -> Any:
    raw = header.get(key)
    if not isinstance(raw, str):
        raise ValueError(f"malformed fedkt record: {HEADER_KEY}[{key!r}] must be a JSON string, "
                         f"got {type(raw).__name__}")
    value = loads(raw, f"malformed fedkt record: {HEADER_KEY}[{key!r}]")  # size/depth checked before parsing
    if not isinstance(value, kind):
        raise ValueError(f"malformed fedkt record: {HEADER_KEY}[{key!r}] must decode to a "
                         f"{kind.__name__}, got {type(value).__name__}")
    return value


_NPY_LOAD = threading.Lock()
"""``Array.numpy()`` is ``np.load``, which parses the .npy header with ``ast.literal_eval``; on CPython 3.11
concurrent calls from threads (the in-process engine's workers) can fail with "AST constructor recursion
depth mismatch" (CPython gh-106905), so decoding takes this lock."""


def _array_to_tensor(name: str, arr: Array, dtype_name: str) -> torch.Tensor:
    dtype = DTYPES_BY_NAME.get(dtype_name)
    if dtype is None:
        raise ValueError(f"malformed fedkt record: tensor {name!r} has unknown dtype {dtype_name!r}")
    if dtype_name.startswith(("qint", "quint")):
        raise ValueError(f"malformed fedkt record: tensor {name!r} has quantized dtype {dtype_name!r}, which fedkt "
                         "never sends")
    try:
        with _NPY_LOAD:
            nd = arr.numpy()
    except Exception as e:  # noqa: BLE001 - any decoding failure is a malformed record
        raise ValueError(f"malformed fedkt record: tensor {name!r} cannot be decoded: {e}") from e
    carrier = _carrier(dtype)
    if str(nd.dtype) != _NATIVE[carrier] or tuple(nd.shape) != tuple(arr.shape):
        raise ValueError(f"malformed fedkt record: tensor {name!r} carries {nd.dtype}{list(nd.shape)}, "
                         f"expected {_NATIVE[carrier]}{list(arr.shape)} for dtype {dtype_name}")
    if not nd.flags.writeable:
        nd = np.array(nd)
    t = torch.from_numpy(nd)
    try:
        return t.view(dtype) if carrier is not dtype else t
    except Exception as e:  # noqa: BLE001 - e.g. a quantized dtype name
        raise ValueError(f"malformed fedkt record: tensor {name!r} cannot be viewed as {dtype_name}: {e}") from None


def decode(content: RecordDict, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Rebuild the fedkt :class:`Message` from a ``RecordDict`` made by :func:`encode`; a message whose
    arrays and header exceed ``max_bytes`` is refused before any array is decoded."""
    if not isinstance(content, RecordDict):
        raise ValueError(f"expected a Flower RecordDict, got {type(content).__name__}")
    stray = sorted(set(content) - {TENSORS_KEY, HEADER_KEY})
    if stray:
        raise ValueError(f"malformed fedkt record: unexpected records {stray}; a fedkt message holds "
                         f"only {TENSORS_KEY!r} and {HEADER_KEY!r}")
    arrays, header = content.get(TENSORS_KEY), content.get(HEADER_KEY)
    if not isinstance(arrays, ArrayRecord) or not isinstance(header, ConfigRecord):
        raise ValueError(f"malformed fedkt record: needs an ArrayRecord {TENSORS_KEY!r} and a ConfigRecord "
                         f"{HEADER_KEY!r}; got {type(arrays).__name__} and {type(header).__name__} "
                         "(was this message built by fedkt.federation.flower_codec.encode?)")
    size = sum(len(a.data) for a in arrays.values()) + sum(
        len(v) for v in header.values() if isinstance(v, (str, bytes)))
    if size > max_bytes:
        raise ValueError(f"payload of {size / 2**20:.1f} MiB exceeds the limit of {max_bytes / 2**20:.1f} MiB "
                         "(federation max payload size); refused without decoding it. Raise the limit on "
                         "both sides if such payloads are expected")
    if header.get("version") != VERSION:
        raise ValueError(f"malformed fedkt record: header version {header.get('version')!r}, this fedkt "
                         f"reads version {VERSION}; run the same fedkt version on server and clients")
    texts = _json_field(header, "texts", list)
    if any(not isinstance(t, str) for t in texts):
        raise ValueError(f"malformed fedkt record: {HEADER_KEY}['texts'] must be a list of strings")
    meta = _json_field(header, "meta", dict)
    dtypes = _json_field(header, "dtypes", dict)
    if set(dtypes) != set(arrays):
        raise ValueError(f"malformed fedkt record: dtypes name tensors {sorted(dtypes)} but the "
                         f"ArrayRecord holds {sorted(arrays)}")
    tensors = {k: _array_to_tensor(k, arrays[k], dtypes[k]) for k in arrays}
    return Message(tensors=tensors, texts=texts, meta=meta)
