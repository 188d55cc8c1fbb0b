"""Where a Flower node keeps its client's state between calls (Flower rebuilds the ClientApp per message).

``ClientContext.state`` (a :class:`~fedkt.clients.StateStore`) is stored as ``StateStore.to_bytes``: by
default :class:`ContextStateStore` keeps it in the node's Flower ``Context.state`` (Flower hands the node's
context back with every message); :class:`DirStateStore` keeps it in a node-local directory (large states).
A node with nothing stored yet starts from ``workdir/state.fkt`` when the context has a workdir holding
one, else empty (:func:`restore_state`).
"""

from __future__ import annotations

from pathlib import Path

from fedkt.clients import ClientContext, StateStore
from fedkt.federation import flower_codec  # noqa: F401  (sets FLOWER_ENV before flwr is imported)

from flwr.app import ConfigRecord, Context  # noqa: E402


class ContextStateStore:
    """Keeps ``ClientContext.state`` (``StateStore.to_bytes``) in the node's Flower ``Context.state``."""

    KEY = "fedkt.client_state"

    def load(self, context: Context, cid: str) -> bytes | None:
        rec = context.state.get(self.KEY)
        return None if rec is None or cid not in rec else rec[cid]

    def save(self, context: Context, cid: str, blob: bytes) -> None:
        rec = context.state.get(self.KEY)
        if rec is None:
            rec = context.state[self.KEY] = ConfigRecord()
        rec[cid] = blob


class DirStateStore:
    """Keeps ``ClientContext.state`` in ``root/<run_id>/<cid>.fkt`` on the node."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, context: Context, cid: str) -> Path:
        return self.root / str(context.run_id) / f"{cid}.fkt"

    def load(self, context: Context, cid: str) -> bytes | None:
        p = self._path(context, cid)
        return p.read_bytes() if p.exists() else None

    def save(self, context: Context, cid: str, blob: bytes) -> None:
        p = self._path(context, cid)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(p)  # atomic: a crash never leaves a half-written state


def restore_state(blob: bytes | None, ctx: ClientContext, where: str) -> StateStore:
    """The client's state from ``blob`` (read from the store ``where``), else its workdir's, else empty."""
    if blob is None and ctx.workdir is not None and (ctx.workdir / "state.fkt").is_file():
        blob, where = (ctx.workdir / "state.fkt").read_bytes(), str(ctx.workdir / "state.fkt")
    if blob is None:
        return StateStore()
    try:
        return StateStore.from_bytes(blob)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"client state of {ctx.cid!r} in {where} cannot be read ({e}); delete it to start "
                         "the client afresh") from e
