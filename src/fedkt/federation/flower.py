"""Flower runtime: the federation call interface on Flower's Message API (flwr 1.41).

Server side, :class:`FlowerFederation` wraps a Flower ``Grid`` (the object a ServerApp's ``main(grid,
context)`` receives) and implements ``call``/``broadcast`` like :class:`~fedkt.federation.local.
LocalFederation`: every fedkt call ``method`` becomes one Flower message of type ``"query.<method>"`` per
addressed client, pushed with ``grid.push_messages`` and collected with ``grid.pull_messages``.

Client side, :func:`make_client_app` builds a ``ClientApp`` that registers each client handler
``name`` as ``@app.query(name)``, so Flower's own routing dispatches each message type to the same
handler functions ``LocalFederation`` runs. A handler sees a fedkt
:class:`~fedkt.federation.local.ClientContext` built by a *context factory* from the client id and the
Flower ``Context`` (its node config, run config), and returns a fedkt ``Message``.

Decisions:

* **Client identity.** A SuperNode names its fedkt client in its node config
  (``--node-config 'fedkt-client-id="c0"'``; the in-process engine sets it itself; without it the
  node's ``partition-id``, else its node id, is used). On construction the federation sends one
  unmetered ``"query._fedkt_identify"`` message to every node; replies give the client id and the
  handler names each node serves, so unknown clients and unknown handlers are refused on the server
  with the same ``KeyError`` as ``LocalFederation``, before anything is sent.
* **Client state** (``ClientContext.state``) survives between calls through a state store: by default
  :class:`ContextStateStore` keeps it in the Flower ``Context.state`` of the node (Flower rebuilds the
  ClientApp for every message and hands back the node's context), serialised with ``torch.save`` and
  read back with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts).
  :class:`DirStateStore` keeps it in a node-local directory instead (large optimizer states).
* **Failures.** A handler exception is caught in the ClientApp and returned as a Flower ``Error``
  whose reason carries the exception type, message and repr as JSON; the server rebuilds a
  :class:`RemoteClientError` of the same type name, so ``ClientFailure`` messages and ``failures``
  entries read exactly as in-process. Transport errors (node gone, no reply within ``timeout``, a
  malformed reply) are failures of that client too. Policy "stop" raises on the first failing client
  in payload order, "skip" records it and goes on.
* **Bytes** are metered as ``len(codec.encode(msg))``, the same figure ``LocalFederation`` records, so
  communication totals do not depend on the runtime; Flower's own framing adds a few hundred bytes per
  message on top (:func:`flower_wire_bytes` measures it).
* **Polling.** The federation polls the grid every ``poll_interval`` seconds (default 0.02) instead of
  ``grid.send_and_receive``, whose deployment Grid sleeps 3 s between polls.
* **In-process engine.** :class:`InProcessFlower` runs Flower's simulation engine (``vce.run_api``: the
  in-memory LinkState, ``InMemoryGrid``, message queues, worker threads) with a thread backend in
  place of Ray, so ``flwr[simulation]`` is not needed. This uses Flower internals
  (``flwr.server.superlink.fleet.vce``), pinned by the ``flower`` extra's exact version.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from fedkt import progress
from fedkt.federation import codec, flower_codec  # flower_codec sets FLOWER_ENV before importing flwr
from fedkt.federation.base import ByteLedger, ClientFailure, Message
from fedkt.federation.local import ClientContext, Handler

from flwr.app import ConfigRecord, Context, Error, RecordDict  # noqa: E402  (after FLOWER_ENV)
from flwr.app import Message as FlMessage  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.server.superlink.fleet.vce.backend import Backend  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

CLIENT_ID_KEY = "fedkt-client-id"
"""Node-config key naming the fedkt client a SuperNode serves."""
CATEGORY = "query"
"""Flower message category of every fedkt call: method ``m`` travels as message type ``"query.m"``."""
IDENTIFY = "_fedkt_identify"

ContextFactory = Callable[[str, Context], ClientContext]
"""Builds the fedkt client context for client id ``cid`` on this node (may cache across messages)."""


# ----------------------------------------------------------------------------------------- client state
def _dump_state(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _load_state(blob: bytes, where: str) -> dict[str, Any]:
    try:
        return torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"client state in {where} cannot be loaded ({e}); ClientContext.state may hold "
                         "only tensors, numbers, strings, lists, tuples and dicts") from e


class ContextStateStore:
    """Keeps ``ClientContext.state`` in the node's Flower ``Context.state`` (one ConfigRecord)."""

    KEY = "fedkt.client_state"

    def load(self, context: Context, cid: str) -> dict[str, Any]:
        rec = context.state.get(self.KEY)
        if rec is None or cid not in rec:
            return {}
        return _load_state(rec[cid], f"Context.state[{self.KEY!r}][{cid!r}]")

    def save(self, context: Context, cid: str, state: dict[str, Any]) -> None:
        rec = context.state.get(self.KEY)
        if rec is None:
            rec = context.state[self.KEY] = ConfigRecord()
        rec[cid] = _dump_state(state)


class DirStateStore:
    """Keeps ``ClientContext.state`` in ``root/<run_id>/<cid>.pt`` on the node."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, context: Context, cid: str) -> Path:
        return self.root / str(context.run_id) / f"{cid}.pt"

    def load(self, context: Context, cid: str) -> dict[str, Any]:
        p = self._path(context, cid)
        return _load_state(p.read_bytes(), str(p)) if p.exists() else {}

    def save(self, context: Context, cid: str, state: dict[str, Any]) -> None:
        p = self._path(context, cid)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_bytes(_dump_state(state))
        tmp.replace(p)  # atomic: a crash never leaves a half-written state


# ------------------------------------------------------------------------------------------ client side
def client_id_of(context: Context) -> str:
    cfg = context.node_config
    if CLIENT_ID_KEY in cfg:
        return str(cfg[CLIENT_ID_KEY])
    if "partition-id" in cfg:
        return str(cfg["partition-id"])
    return str(context.node_id)


def _error_reply(message: FlMessage, e: BaseException) -> FlMessage:
    reason = json.dumps({"type": type(e).__name__, "message": str(e), "repr": repr(e)})
    return FlMessage(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def make_client_app(handlers: dict[str, Handler], context_factory: ContextFactory | None = None,
                    state_store: ContextStateStore | DirStateStore | None = None,
                    max_bytes: int = flower_codec.DEFAULT_MAX_BYTES) -> ClientApp:
    """A ``ClientApp`` serving ``handlers`` (the same dict ``LocalFederation`` takes).

    ``context_factory(cid, flower_context)`` returns the client's ``ClientContext`` (default: an empty
    one); its ``state`` is replaced by the stored state before each call and stored after it.
    """
    for name in handlers:
        if not name.isidentifier() or name.startswith("_fedkt"):
            raise ValueError(f"client handler name {name!r} cannot be a Flower message action: use a "
                             "Python identifier that does not start with '_fedkt'")
    factory = context_factory or (lambda cid, _ctx: ClientContext(cid))
    store = state_store or ContextStateStore()
    app = ClientApp()

    def serve(name: str, handler: Handler) -> Callable[[FlMessage, Context], FlMessage]:
        def run(message: FlMessage, context: Context) -> FlMessage:
            try:
                cid = client_id_of(context)
                ctx = factory(cid, context)
                ctx.state = store.load(context, cid)
                try:
                    reply = handler(ctx, flower_codec.decode(message.content))
                finally:
                    store.save(context, cid, ctx.state)
                if not isinstance(reply, Message):
                    raise TypeError(f"client handler {name!r} returned {type(reply).__name__}, "
                                    "expected a fedkt Message")
                return FlMessage(flower_codec.encode(reply, max_bytes), reply_to=message)
            except Exception as e:  # noqa: BLE001 - reported to the server, which applies its policy
                return _error_reply(message, e)
        run.__name__ = name
        return run

    for name, handler in handlers.items():
        app.query(name)(serve(name, handler))

    @app.query(IDENTIFY)
    def identify(message: FlMessage, context: Context) -> FlMessage:
        meta = {"client_id": client_id_of(context), "handlers": sorted(handlers)}
        return FlMessage(flower_codec.encode(Message(meta=meta)), reply_to=message)

    return app


# ------------------------------------------------------------------------------------------ server side
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


def _error_of(reply: FlMessage) -> BaseException:
    err = reply.error
    try:
        info = json.loads(err.reason or "")
        return RemoteClientError.build(info["type"], info["message"], info["repr"])
    except (ValueError, KeyError, TypeError):
        text = f"Flower error code {err.code}: {err.reason}"
        return RemoteClientError.build("FlowerError", text, f"FlowerError({text!r})")


def flower_wire_bytes(content: RecordDict) -> int:
    """Bytes of the Flower objects a ``RecordDict`` deflates to (what Flower's transport carries)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    return sum(len(o.deflate()) for o in get_all_nested_objects(content).values())


class FlowerFederation:
    """The federation call interface over a Flower ``Grid`` (see the module docstring)."""

    def __init__(self, grid: Grid, clients: list[str] | None = None, on_failure: str = "stop",
                 ledger: ByteLedger | None = None, timeout: float | None = None,
                 poll_interval: float = 0.02, wait_for_nodes: float = 120.0,
                 max_bytes: int = flower_codec.DEFAULT_MAX_BYTES, ttl: float | None = None,
                 on_close: Callable[[], None] | None = None, health_check: Callable[[], None] | None = None):
        if on_failure not in ("stop", "skip"):
            raise ValueError(f"on_failure must be 'stop' or 'skip', got {on_failure!r}")
        self.grid, self.on_failure, self.timeout = grid, on_failure, timeout
        self.poll_interval, self.max_bytes, self.ttl = poll_interval, max_bytes, ttl
        self.ledger = ledger or ByteLedger()
        self.failures: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self._on_close, self._health_check = on_close, health_check
        self._nodes, self._handlers = self._discover(clients, wait_for_nodes)
        self.clients = list(clients) if clients is not None else sorted(self._nodes)

    # --- discovery
    def _discover(self, clients: list[str] | None, wait_for_nodes: float
                  ) -> tuple[dict[str, int], dict[str, set[str]]]:
        need = len(clients) if clients is not None else 1
        deadline = time.monotonic() + wait_for_nodes
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= need:
                break
            if time.monotonic() > deadline:
                if not node_ids:
                    raise TimeoutError(f"no Flower SuperNode connected within {wait_for_nodes:.1f} s: "
                                       "start the SuperNodes or raise wait_for_nodes")
                break  # identify the nodes that are there; missing clients are named below
            time.sleep(0.1)
        msgs = [FlMessage(flower_codec.encode(Message()), dst_node_id=n, message_type=f"{CATEGORY}.{IDENTIFY}")
                for n in node_ids]
        replies = self._exchange(msgs, timeout=wait_for_nodes)
        nodes: dict[str, int] = {}
        handlers: dict[str, set[str]] = {}
        for node, reply in zip(node_ids, replies):
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else repr(_error_of(reply))
                progress.log(f"[yellow]Flower node {node} did not identify itself ({why}); ignored[/]")
                continue
            meta = flower_codec.decode(reply.content).meta
            cid = meta["client_id"]
            if cid in nodes:
                raise ValueError(f"Flower nodes {nodes[cid]} and {node} both serve client {cid!r}: give "
                                 f"each SuperNode its own --node-config '{CLIENT_ID_KEY}=\"...\"'")
            nodes[cid], handlers[cid] = node, set(meta["handlers"])
        if clients is not None:
            missing = [c for c in clients if c not in nodes]
            if missing:
                raise KeyError(f"clients {missing} are not served by any connected Flower node "
                               f"(connected: {sorted(nodes)}); start their SuperNodes with --node-config "
                               f"'{CLIENT_ID_KEY}=\"<id>\"' or raise wait_for_nodes")
        return nodes, handlers

    # --- transport
    def _exchange(self, messages: list[FlMessage], timeout: float | None) -> list[FlMessage | None]:
        """Push ``messages``, poll for their replies; reply i answers message i (None: no reply)."""
        ids = list(self.grid.push_messages(messages))
        if len(ids) != len(messages):  # InMemoryGrid drops refused messages instead of returning None
            raise RuntimeError(f"Flower accepted {len(ids)} of {len(messages)} messages (wrong run id or "
                               "unknown node?); see the flwr log above")
        pending = {i for i in ids if i}
        got: dict[str, FlMessage] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            if self._health_check is not None:
                self._health_check()
            for r in self.grid.pull_messages(list(pending)):
                got[r.metadata.reply_to_message_id] = r
                pending.discard(r.metadata.reply_to_message_id)
            if not pending or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(self.poll_interval)
        return [got.get(i) if i else None for i in ids]

    # --- the call interface
    def call(self, method: str, payloads: dict[str, Message], round: int = 0,
             metered: bool = True) -> dict[str, Message]:
        for cid in payloads:
            if cid not in self._nodes:
                raise KeyError(f"unknown client {cid!r}; clients: {', '.join(self.clients)}")
        if any(method not in self._handlers[cid] for cid in payloads):
            known = sorted(set.intersection(*(self._handlers[c] for c in payloads)))
            raise KeyError(f"no client handler {method!r}; registered: {', '.join(known)}")
        t0 = time.perf_counter()
        cids = list(payloads)
        msgs = [FlMessage(flower_codec.encode(payloads[c], self.max_bytes), dst_node_id=self._nodes[c],
                          message_type=f"{CATEGORY}.{method}", group_id=str(round), ttl=self.ttl)
                for c in cids]
        raw = self._exchange(msgs, self.timeout)
        replies: dict[str, Message] = {}
        for cid, reply in zip(cids, raw):
            error: BaseException | None = None
            if reply is None:
                error = TimeoutError(f"no reply within {self.timeout} s" if self.timeout is not None
                                     else "message could not be delivered")
            elif reply.has_error():
                error = _error_of(reply)
            else:
                try:
                    msg = flower_codec.decode(reply.content)
                except ValueError as e:
                    error = e
            if error is not None:
                if self.on_failure == "stop":
                    raise ClientFailure(cid, method, error) from error
                self.failures.append({"round": round, "method": method, "client": cid, "error": repr(error)})
                progress.log(f"[yellow]client {cid} failed in {method!r} (round {round}): {error!r}; skipped[/]")
                continue
            if metered:
                self.ledger.record(round, method, cid, "down", len(codec.encode(payloads[cid])))
                self.ledger.record(round, method, cid, "up", len(codec.encode(msg)))
            replies[cid] = msg
        self.timings[method] = self.timings.get(method, 0.0) + time.perf_counter() - t0
        if not replies and payloads:
            raise RuntimeError(f"every client failed in {method!r} (round {round}): {self.failures[-1]['error']}")
        return replies

    def broadcast(self, method: str, msg: Message, round: int = 0, metered: bool = True) -> dict[str, Message]:
        return self.call(method, {cid: msg for cid in self.clients}, round, metered)

    def take_timing(self, method: str) -> float:
        return self.timings.pop(method, 0.0)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def __enter__(self) -> "FlowerFederation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def in_process(cls, client_ids: Iterable[str], handlers: dict[str, Handler],
                   context_factory: ContextFactory | None = None, num_workers: int = 1,
                   **kwargs: Any) -> "FlowerFederation":
        """A federation whose clients run in this process on Flower's simulation engine (no Ray)."""
        engine = InProcessFlower(make_client_app(handlers, context_factory), list(client_ids), num_workers)
        try:
            return cls(engine.grid, list(client_ids), on_close=engine.close, health_check=engine.check,
                       **kwargs)
        except BaseException:
            engine.close()
            raise


# --------------------------------------------------------------------------------- in-process engine
class InProcessFlower:
    """Flower's simulation engine without Ray: nodes in this process, ClientApps on worker threads.

    Builds the in-memory LinkState, registers one node per client id (node config
    ``fedkt-client-id``, ``partition-id``, ``num-partitions``), and runs ``vce.run_api`` (Flower's
    message pump: LinkState -> queue -> backend -> LinkState) on a background thread with
    :class:`_ThreadBackend`. :attr:`grid` is an ``InMemoryGrid`` for a ServerApp main loop.
    """

    def __init__(self, client_app: ClientApp, client_ids: list[str], num_workers: int = 1,
                 pull_interval: float = 0.005):
        from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
        from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
        from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.fleet.vce.metrics import VceMetrics
        from flwr.server.superlink.linkstate import LinkStateFactory
        from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
        from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
        from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.superlink.federation import NoOpFederationManager
        from flwr.superlink.grid import InMemoryGrid

        if len(set(client_ids)) != len(client_ids) or not client_ids:
            raise ValueError(f"client ids must be unique and non-empty, got {client_ids}")
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        state = factory.state()
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        run.federation_id = NOOP_FEDERATION_ID
        state.run_ids[run.run_id] = RunRecord(run=run)
        state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
        # Messages built in this process are the ServerApp's (what flwr's run_simulation does too)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID

        mapping = vce_api._register_nodes(len(client_ids), factory)  # node_id -> partition index
        stores: dict[int, Any] = {}
        for node_id, i in mapping.items():
            stores[node_id] = DeprecatedRunInfoStore(node_id, {CLIENT_ID_KEY: client_ids[i], "partition-id": i,
                                                               "num-partitions": len(client_ids)})
            stores[node_id].register_context(run_id=run.run_id, run=run)
        class EngineGrid(InMemoryGrid):
            """Stamps pushed messages with this engine's run: TaskIdentity, which ``Message()`` reads,
            is process-global, so a message built while another engine was created would be refused."""

            def push_messages(self, messages: Iterable[FlMessage]) -> Iterable[str]:
                messages = list(messages)
                for m in messages:
                    m.metadata.__dict__["_run_id"] = run.run_id
                return super().push_messages(messages)

        self.grid = EngineGrid(state_factory=factory, pull_interval=pull_interval)
        self.grid.set_run(run)
        self._stop = threading.Event()
        self._errors: list[BaseException] = []

        def pump() -> None:
            try:
                vce_api.run_api(lambda: client_app, lambda: _ThreadBackend(num_workers), mapping, factory,
                            stores, self._stop, VceMetrics())
            except BaseException as e:  # noqa: BLE001 - surfaced by close()
                self._errors.append(e)

        self._thread = threading.Thread(target=pump, name="fedkt-flower-engine", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise if the engine thread died (so the server does not wait for replies that never come)."""
        if self._errors:
            raise RuntimeError("the in-process Flower engine failed") from self._errors[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.check()


class _ThreadBackend(Backend):
    """Runs the ClientApp directly on Flower's worker threads (Ray's role in flwr's simulation)."""

    def __init__(self, num_workers: int = 1):
        super().__init__({})
        self._n = num_workers
        self._app: ClientApp | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app = app_fn()

    @property
    def num_workers(self) -> int:
        return self._n

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: FlMessage, context: Context) -> tuple[FlMessage, Context]:
        assert self._app is not None, "build() the backend first"
        return self._app(message, context), context
