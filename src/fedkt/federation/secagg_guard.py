"""What keeps SecAgg+ from revealing more than one mean per round, and keeps a hostile masked reply out of it.

* :class:`AggregationJournal`: SecAgg+ hides an update inside a sum, but two sums of the *same* updates over
  different client sets reveal their difference: after a ``--resume`` that re-runs a round whose secure
  aggregate the server already unmasked (it crashed before the checkpoint), the clients would retrain the
  same round from the same adapter with the same (public) training seed, and a second sum over another set of
  online clients would expose one client's update. The journal records every unmasked aggregate (method,
  round, digest of the payloads, contributors, the mean itself) *before* the server uses it, in memory and,
  with a directory, on disk (atomically). Asking again for the same round returns the recorded mean
  without running the protocol (no client trains again); asking with another payload is refused.
* :func:`check_masked_reply`: the collect stage's reply carries the masked vector and, in the clear, the
  client's weight, reply meta and tensor layout. A reply whose clear parts fail the handler's schema, whose
  layout is not the expected adapter's, or whose masked arrays are not the expected integer arrays, is
  dropped *before* the workflow sums it (the protocol then treats the node as dropped out and removes its
  masks), so the round completes with the honest clients, as in the plain path.

What SecAgg+ cannot check: the values inside a masked vector (that is the point of masking). A malicious
client can shift the mean by at most its own clipped contribution; fedkt does not add robust aggregation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedkt.federation import codec
from fedkt.federation.flower_codec import DTYPES_BY_NAME  # sets FLOWER_ENV before flwr is imported
from fedkt.federation.flower_secagg import LAYOUT_KEY, META_KEY
from fedkt.federation.validate import Layout, check_reply, check_weight
from fedkt.message import Message, ReplyError, loads

import flwr.compat.common.recorddict_compat as compat  # noqa: E402
from flwr.common import bytes_to_ndarray  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402


class ReaggregationRefused(RuntimeError):
    """A second secure aggregation of a round whose mean the server already holds, with another payload."""


def payload_digest(node_payloads: dict[Any, Message], cid_of: dict[Any, str]) -> str:
    h = hashlib.sha256()
    for node in sorted(node_payloads, key=lambda n: cid_of[n]):
        h.update(cid_of[node].encode() + b"\0" + hashlib.sha256(codec.encode(node_payloads[node])).digest())
    return h.hexdigest()


class AggregationJournal:
    """Unmasked secure aggregates by (method, round); ``root``: a directory to keep them across restarts."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else None
        self._mem: dict[tuple[str, int], dict[str, Any]] = {}

    def _path(self, method: str, round: int) -> Path:
        assert self.root is not None
        return self.root / f"{method}-round{round:04d}"

    def get(self, method: str, round: int) -> dict[str, Any] | None:
        entry = self._mem.get((method, round))
        if entry is None and self.root is not None and (self._path(method, round) / "entry.json").is_file():
            d = self._path(method, round)
            entry = json.loads((d / "entry.json").read_text())
            entry["tensors"] = load_file(str(d / "mean.safetensors"))
            self._mem[(method, round)] = entry
        return entry

    def check(self, method: str, round: int, digest: str, clients: list[str]) -> dict[str, Any] | None:
        """The recorded entry when this round was aggregated with the same payloads (replay it); None when
        it never was; :class:`ReaggregationRefused` when it was, with other payloads."""
        entry = self.get(method, round)
        if entry is None:
            return None
        if entry["digest"] != digest:
            raise ReaggregationRefused(
                f"round {round} of {method!r} was already securely aggregated over {entry['contributors']}; "
                f"another secure sum of this round (now addressed: {sorted(clients)}, other payloads) could "
                "reveal a client's update by difference. Refused: resume from the checkpoint of that round, or "
                "start a new run directory")
        return entry

    def record(self, method: str, round: int, digest: str, contributors: list[str], weights: dict[str, float],
               meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        entry = {"method": method, "round": round, "digest": digest, "contributors": contributors,
                 "weights": weights, "meta": meta}
        if self.root is not None:
            d = self._path(method, round)
            d.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "mean.safetensors"))
            tmp = d / "entry.json.tmp"
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, d / "entry.json")  # written last: an entry with entry.json is complete
        self._mem[(method, round)] = {**entry, "tensors": tensors}


def check_masked_reply(content: Any, cid: str, method: str, weight_key: str, expect: Layout | None,
                       declared: float | None, max_weight: float) -> dict[str, Any]:
    """Validate one collect-stage reply (a legacy FitRes record with the masked vector); returns its clear
    parts {"weight", "meta", "layout"} or raises :class:`ReplyError` naming the client and what is wrong."""
    where = f"client {cid} secure reply to {method!r}"
    try:
        fitres = compat.recorddict_to_fitres(content, True)
        masked = content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    except Exception as e:  # noqa: BLE001
        raise ReplyError(f"{where}: not a SecAgg+ masked-vector reply ({type(e).__name__}: {e})") from None
    metrics = fitres.metrics
    if not isinstance(metrics.get(META_KEY), str) or not isinstance(metrics.get(LAYOUT_KEY), str):
        raise ReplyError(f"{where}: lacks its meta and tensor layout")
    meta = loads(metrics[META_KEY], f"{where}: meta")
    layout = loads(metrics[LAYOUT_KEY], f"{where}: layout")
    if not isinstance(layout, dict) or not isinstance(layout.get("names"), list) \
            or not isinstance(layout.get("dtypes"), list) or not isinstance(layout.get("shapes"), list) \
            or not len(layout["names"]) == len(layout["dtypes"]) == len(layout["shapes"]):
        raise ReplyError(f"{where}: malformed tensor layout")
    # the clear meta against the handler's schema, with placeholder tensors of the declared layout
    try:
        fake = {n: torch.zeros(tuple(s), dtype=DTYPES_BY_NAME[d]) if np.prod(s, dtype=np.float64) <= 2**24 else None
                for n, d, s in zip(layout["names"], layout["dtypes"], layout["shapes"])}
    except Exception as e:  # noqa: BLE001
        raise ReplyError(f"{where}: malformed tensor layout ({type(e).__name__})") from None
    if any(v is None for v in fake.values()):
        if expect is None:
            raise ReplyError(f"{where}: declares a tensor of over 2^24 elements")
        raise ReplyError(f"{where}: tensor layout {layout['shapes']} is not the expected adapter's")
    check_reply(method, cid, Message(tensors=fake, meta=meta), expect, None)
    weight = check_weight(cid, fitres.num_examples, weight_key or "weight",
                          declared if weight_key else None) if weight_key else 1.0
    if weight > max_weight:
        raise ReplyError(f"{where}: weight {weight} above secagg max_weight {max_weight}")
    # the masked arrays: the weight factor then one integer array per tensor, of the declared shapes
    if not isinstance(masked, list) or len(masked) != len(fake) + 1:
        raise ReplyError(f"{where}: {len(masked) if isinstance(masked, list) else '?'} masked arrays for "
                         f"{len(fake)} tensors")
    shapes = [(1,)] + [tuple(s) for s in layout["shapes"]]
    for i, (b, shape) in enumerate(zip(masked, shapes)):
        try:
            arr = bytes_to_ndarray(b)
        except Exception as e:  # noqa: BLE001
            raise ReplyError(f"{where}: masked array {i} cannot be read ({type(e).__name__})") from None
        if arr.shape != shape or arr.dtype.kind not in "iu":
            raise ReplyError(f"{where}: masked array {i} is {arr.dtype}{list(arr.shape)}, expected integers "
                             f"{list(shape)}")
    return {"weight": weight, "meta": meta, "layout": layout}
