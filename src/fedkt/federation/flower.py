"""Flower runtime: the federation call interface on Flower's Message API (flwr 1.41).

Server side, :class:`FlowerFederation` is a :class:`~fedkt.federation.base.Federation` over a Flower
``Grid`` (the object a ServerApp's ``main(grid, context)`` receives). Like every runtime it implements
only :meth:`~FlowerFederation._deliver`: each fedkt call ``method`` becomes one Flower message of type
``"query.<method>"`` per addressed client, pushed with ``grid.push_messages`` and collected with
``grid.pull_messages``. Argument checks, the failure policy, metering, timings and the bookkeeping state
are the base class's, so it behaves exactly as :class:`~fedkt.federation.local.LocalFederation` (the
runtime-conformance suite, ``tests/test_runtime_conformance.py``, runs over both).

Client side, :func:`make_client_app` builds a ``ClientApp`` that registers each client handler
``name`` as ``@app.query(name)``, so Flower's own routing dispatches each message type to the same
handler functions ``LocalFederation`` runs. A handler sees a fedkt :class:`~fedkt.clients.ClientContext`
built by a *context factory* from the client id and the Flower ``Context``; the default,
:class:`SpecContextFactory`, builds it from the :class:`~fedkt.clients.ClientSpec` in the node config
(``fedkt-client-spec``, JSON or a path to a JSON file, see :func:`spec_to_json`) with
``ClientFactory(share_base=False)`` and caches it for the life of the process; a node without a spec
gets a bare ``ClientContext(cid)`` (handlers that need no model).

Decisions:

* **Client identity.** A SuperNode names its fedkt client in its node config
  (``--node-config 'fedkt-client-id="c0"'``; else the ``cid`` of its ClientSpec, else its
  ``partition-id``, else its node id). On construction the federation sends one unmetered
  ``"query._fedkt_identify"`` message to every node; the replies give the client id and the handler
  names each node serves, which become the base class's ``clients`` and ``methods`` (the handlers every
  client serves, in the order the first client registered them), so unknown clients and handlers are
  refused on the server with the same ``KeyError`` as in-process, before anything is sent.
* **Client state** (``ClientContext.state``, a :class:`~fedkt.clients.StateStore`) survives between
  calls as ``StateStore.to_bytes`` in a state store: by default :class:`ContextStateStore` keeps it in
  the node's Flower ``Context.state`` (Flower rebuilds the ClientApp for every message and hands back
  the node's context); :class:`DirStateStore` keeps it in a node-local directory (large states). Before
  each call the context's state is restored from the store (a node with nothing stored yet starts from
  ``workdir/state.fkt`` when the context has a workdir holding one, else empty); after the call it is
  stored again, even when the handler raised (as in-process, where the context object keeps what the
  handler changed), and ``ctx.save_state()`` writes it to the workdir after a successful call, exactly
  as ``LocalFederation`` does.
* **Failures.** A handler exception is caught in the ClientApp and returned as a Flower ``Error``
  whose reason carries the exception type, message and repr as JSON; the server rebuilds a
  :class:`RemoteClientError` of the same type name, so ``ClientFailure`` messages and ``failures``
  entries read exactly as in-process. Transport errors (no reply within ``timeout``, a malformed
  reply) are failures of that client too.
* **Bytes** are metered as ``len(codec.encode(msg))`` down and up, the figure ``LocalFederation``
  records, so communication totals do not depend on the runtime; Flower's own framing adds a few
  hundred bytes per message on top (:func:`flower_wire_bytes` measures it).
* **Polling.** The federation polls the grid every ``poll_interval`` seconds (default 0.02) instead of
  ``grid.send_and_receive``, whose deployment Grid sleeps 3 s between polls.
* **In-process engine.** :class:`InProcessFlower` runs Flower's simulation engine (``vce.run_api``: the
  in-memory LinkState, ``InMemoryGrid``, message queues, worker threads) with a thread backend in
  place of Ray, so ``flwr[simulation]`` is not needed. This uses Flower internals
  (``flwr.server.superlink.fleet.vce``), pinned by the ``flower`` extra's exact version.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedkt import progress
from fedkt.clients import ClientContext, ClientFactory, ClientSpec, Handler, StateStore
from fedkt.federation import codec, flower_codec  # flower_codec sets FLOWER_ENV before importing flwr
from fedkt.federation import flower_node_auth, flower_secagg
from fedkt.federation.base import Aggregate, AllClientsFailed, Delivery, Federation, Message

from flwr.app import ConfigRecord, Context, Error, RecordDict  # noqa: E402  (after FLOWER_ENV)
from flwr.app import Message as FlMessage  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.server.superlink.fleet.vce.backend import Backend  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

CLIENT_ID_KEY = "fedkt-client-id"
"""Node-config key naming the fedkt client a SuperNode serves."""
SPEC_KEY = "fedkt-client-spec"
"""Node-config key holding the node's ClientSpec: a JSON object (:func:`spec_to_json`) or a path to one."""
CATEGORY = "query"
"""Flower message category of every fedkt call: method ``m`` travels as message type ``"query.m"``."""
IDENTIFY = "_fedkt_identify"
SCOPE_SEP = "__"
"""Handler ``"<method>__<handler>"`` of a multi-method app runs in method ``<method>``'s own client scope."""

ContextFactory = Callable[[str, Context], ClientContext]
"""Builds the fedkt client context for client id ``cid`` on this node (may cache across messages)."""


# ------------------------------------------------------------------------------------ client specs
def _example_to_dict(e: Any) -> dict[str, Any]:
    d = dataclasses.asdict(e)
    d["choices"] = list(d["choices"])
    return d


def _example_from_dict(d: dict[str, Any]) -> Any:
    from fedkt.data.tasks import Example

    return Example(**{**d, "choices": tuple(d.get("choices", ()))})


def spec_to_json(spec: ClientSpec) -> str:
    """The JSON text of a :class:`ClientSpec` (what a node config's ``fedkt-client-spec`` holds)."""
    d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    for key in ("lora", "train", "eval", "policy"):
        d[key] = dataclasses.asdict(d[key])
    d["examples"] = None if spec.examples is None else [_example_to_dict(e) for e in spec.examples]
    d["eval_sets"] = {k: [_example_to_dict(e) for e in v] for k, v in spec.eval_sets.items()}
    d["workdir"] = None if spec.workdir is None else str(spec.workdir)
    d["data_files"] = [str(f) for f in spec.data_files]
    return json.dumps(d, ensure_ascii=False)


def spec_from_json(text: str) -> ClientSpec:
    """Rebuild a :class:`ClientSpec` from :func:`spec_to_json`'s text; sections are validated like config."""
    from fedkt.config import EvalConfig, LoraSettings, TrainConfig, from_dict
    from fedkt.privacy.policy import ClientPolicy

    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{SPEC_KEY} is not valid JSON ({e}); write it with fedkt.federation.flower."
                         "spec_to_json") from e
    if not isinstance(d, dict):
        raise ValueError(f"{SPEC_KEY} must be a JSON object, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(ClientSpec)]
    unknown = sorted(set(d) - set(names))
    if unknown or "cid" not in d or "model" not in d:
        raise ValueError(f"{SPEC_KEY}: unknown keys {unknown} or missing cid/model; allowed keys: "
                         f"{', '.join(names)}")
    for key, cls in (("lora", LoraSettings), ("train", TrainConfig), ("eval", EvalConfig), ("policy", ClientPolicy)):
        if key in d:
            d[key] = from_dict(cls, d[key], prefix=key + ".")
    if d.get("examples") is not None:
        d["examples"] = [_example_from_dict(e) for e in d["examples"]]
    if "eval_sets" in d:
        d["eval_sets"] = {k: [_example_from_dict(e) for e in v] for k, v in d["eval_sets"].items()}
    if d.get("workdir") is not None:
        d["workdir"] = Path(d["workdir"])
    return ClientSpec(**d)


def _spec_text(value: Any) -> str:
    text = str(value)
    if text.lstrip().startswith("{"):
        return text
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"node config {SPEC_KEY} = {text!r} is neither a JSON object nor an existing file")
    return path.read_text(encoding="utf-8")


class SpecContextFactory:
    """The default context factory: the node's ClientSpec (node config ``fedkt-client-spec``) built with
    ``ClientFactory(share_base=False)``, once per process and spec (Flower may rebuild the ClientApp per
    message; the in-process engine keeps the process, so the model is loaded once). Without a spec in
    the node config, a bare ``ClientContext(cid)``."""

    def __init__(self) -> None:
        self._factory = ClientFactory(share_base=False)
        self._built: dict[str, ClientContext] = {}

    def __call__(self, cid: str, context: Context) -> ClientContext:
        raw = context.node_config.get(SPEC_KEY)
        if raw is None:
            return ClientContext(cid)
        text = _spec_text(raw)
        ctx = self._built.get(text)
        if ctx is None:
            spec = spec_from_json(text)
            if spec.cid != cid:
                raise ValueError(f"node serves client {cid!r} but its {SPEC_KEY} is for client {spec.cid!r}")
            ctx = self._built[text] = self._factory.build(spec)
        return ctx


# ----------------------------------------------------------------------------------------- client state
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


def _restore_state(blob: bytes | None, ctx: ClientContext, where: str) -> StateStore:
    if blob is None and ctx.workdir is not None and (ctx.workdir / "state.fkt").is_file():
        blob, where = (ctx.workdir / "state.fkt").read_bytes(), str(ctx.workdir / "state.fkt")
    if blob is None:
        return StateStore()
    try:
        return StateStore.from_bytes(blob)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"client state of {ctx.cid!r} in {where} cannot be read ({e}); delete it to start "
                         "the client afresh") from e


# ------------------------------------------------------------------------------------------ client side
def client_id_of(context: Context) -> str:
    cfg = context.node_config
    if CLIENT_ID_KEY in cfg:
        return str(cfg[CLIENT_ID_KEY])
    if SPEC_KEY in cfg:
        return str(json.loads(_spec_text(cfg[SPEC_KEY]))["cid"])
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

    ``context_factory(cid, flower_context)`` returns the client's ``ClientContext`` (default: a
    :class:`SpecContextFactory` of this app); its ``state`` is restored from ``state_store`` before each
    call and stored after it. Handler ``name`` answers message type ``"query.<name>"``; an app serving
    several methods whose handler names collide names them ``"<method>__<handler>"`` (the server's
    :class:`FlowerFederation` then takes ``action_prefix="<method>__"``), and each method's client state
    and context are kept apart (``scope``: the factory is called as ``factory(cid, context, method)``).
    Payloads and replies above
    ``max_bytes`` are refused with an error naming the limit. The app also serves secure aggregation
    (``FlowerFederation.aggregate``: a ``train`` function behind Flower's ``secaggplus_mod``).
    """
    for name in handlers:
        if not name.isidentifier() or name.startswith("_fedkt"):
            raise ValueError(f"client handler name {name!r} cannot be a Flower message action: use a "
                             "Python identifier that does not start with '_fedkt'")
    factory = context_factory or SpecContextFactory()
    store = state_store or ContextStateStore()
    app = ClientApp()

    def run_handler(name: str, payload: Message, context: Context) -> Message:
        """Run fedkt handler ``name`` for this node's client: context, state restore/store, checks."""
        handler = handlers.get(name)
        if handler is None:
            raise KeyError(f"this node serves no handler {name!r}; it serves {', '.join(handlers)}")
        from fedkt.federation.validate import check_request

        check_request(name.split(SCOPE_SEP)[-1], payload)  # an absurd request fails here, clearly
        cid = client_id_of(context)
        scope = name.split(SCOPE_SEP)[0] if SCOPE_SEP in name else ""
        ctx = factory(cid, context, scope) if scope else factory(cid, context)  # type: ignore[call-arg]
        key = f"{cid}/{scope}" if scope else cid
        ctx.state = _restore_state(store.load(context, key), ctx, f"the node's {type(store).__name__}")
        try:
            reply = handler(ctx, payload)
        finally:
            store.save(context, key, ctx.state.to_bytes())
        if not isinstance(reply, Message):
            raise TypeError(f"client handler {name!r} returned {type(reply).__name__}, expected a fedkt Message")
        ctx.save_state()
        return reply

    def serve(name: str) -> Callable[[FlMessage, Context], FlMessage]:
        def run(message: FlMessage, context: Context) -> FlMessage:
            try:
                payload = flower_codec.decode(message.content, max_bytes)
                reply = run_handler(name, payload, context)
                return FlMessage(flower_codec.encode(reply, max_bytes), reply_to=message)
            except Exception as e:  # noqa: BLE001 - reported to the server, which applies its policy
                return _error_reply(message, e)
        run.__name__ = name
        return run

    for name in handlers:
        app.query(name)(serve(name))

    def errors_as_replies(message: FlMessage, context: Context, call_next: Callable) -> FlMessage:
        try:
            return call_next(message, context)
        except Exception as e:  # noqa: BLE001 - the node drops out of this SecAgg+ round, the server is told
            return _error_reply(message, e)

    # secure aggregation (FlowerFederation.aggregate): Flower's SecAgg+ client mod around the handler call
    app.train(mods=[errors_as_replies, *flower_secagg.MODS])(flower_secagg.make_secure_train(run_handler))

    @app.query(IDENTIFY)
    def identify(message: FlMessage, context: Context) -> FlMessage:
        meta = {"client_id": client_id_of(context), "handlers": list(handlers)}
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
    from fedkt.federation.validate import loads

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
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    return sum(len(o.deflate()) for o in get_all_nested_objects(content).values())


class FlowerFederation(Federation):
    """A :class:`Federation` over a Flower ``Grid`` (see the module docstring).

    ``clients``: the client ids to address (default: every node that identified itself, sorted);
    ``timeout``: seconds to wait for a call's replies (a client that misses it failed; None waits);
    ``wait_for_nodes``: seconds to wait for the nodes to connect and identify themselves;
    ``min_clients``: fewer replies than this in a call (or contributors in an aggregate) stop the run;
    ``max_bytes``: the largest payload sent or accepted; ``action_prefix``: call handler ``m`` as
    ``<action_prefix>m`` (a multi-method app, see :func:`make_client_app`); ``secagg``: the SecAgg+
    parameters of :meth:`aggregate`; ``num_clients``: with ``clients=None``, wait for this many nodes;
    ``secagg_journal``: a directory keeping each round's unmasked secure aggregate, so that a resumed run never
    aggregates a round again over another client set (``secagg_guard``);
    ``round_deadline``: seconds from a round's first call after which the round's calls wait for nobody
    (each waits at most ``min(timeout, what is left)``); ``allowed_nodes``: client id -> the node id
    registered for its key: other nodes, or a node claiming another client's id, are refused and logged
    (:mod:`fedkt.federation.flower_node_auth`)."""

    def __init__(self, grid: Grid, clients: list[str] | None = None, on_failure: str = "stop",
                 timeout: float | None = None, poll_interval: float = 0.02, wait_for_nodes: float = 120.0,
                 max_bytes: int = flower_codec.DEFAULT_MAX_BYTES, ttl: float | None = None,
                 on_close: Callable[[], None] | None = None, health_check: Callable[[], None] | None = None,
                 min_clients: int = 1, action_prefix: str = "",
                 secagg: flower_secagg.SecAggSettings | None = None, num_clients: int | None = None,
                 secagg_journal: str | Path | None = None, round_deadline: float | None = None,
                 allowed_nodes: dict[str, int] | None = None):
        self.grid, self.timeout = grid, timeout
        self.round_deadline, self._round_start = round_deadline, {}
        self.allowed_nodes = allowed_nodes
        self.poll_interval, self.max_bytes, self.ttl = poll_interval, max_bytes, ttl
        self.action_prefix = action_prefix
        self.secagg = secagg or flower_secagg.SecAggSettings()
        from fedkt.federation.secagg_guard import AggregationJournal

        self._journal = AggregationJournal(secagg_journal)
        """Every unmasked secure aggregate (in memory; on disk under ``secagg_journal``): never re-aggregated."""
        self._on_close, self._health_check = on_close, health_check
        self._nodes, served = self._discover(clients, wait_for_nodes, num_clients)
        ids = list(clients) if clients is not None else sorted(self._nodes)
        methods = [m for m in served[ids[0]] if all(m in served[c] for c in ids)] if ids else []
        super().__init__(ids, methods, on_failure, min_clients)

    # --- discovery
    def _discover(self, clients: list[str] | None, wait_for_nodes: float, num_clients: int | None = None
                  ) -> tuple[dict[str, int], dict[str, list[str]]]:
        need = len(clients) if clients is not None else (num_clients or 1)
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
        node_ids = flower_node_auth.known_nodes(node_ids, self.allowed_nodes)
        msgs = [FlMessage(flower_codec.encode(Message()), dst_node_id=n, message_type=f"{CATEGORY}.{IDENTIFY}")
                for n in node_ids]
        replies = self._exchange(msgs, timeout=wait_for_nodes)
        from fedkt.federation.validate import escape

        nodes: dict[str, int] = {}
        handlers: dict[str, list[str]] = {}
        dupes: set[str] = set()
        for node, reply in zip(node_ids, replies):
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else repr(_error_of(reply))
                progress.log(f"[yellow]Flower node {node} did not identify itself ({escape(why)}); ignored[/]")
                continue
            try:
                meta = flower_codec.decode(reply.content).meta
                cid, served = meta.get("client_id"), meta.get("handlers")
                if not isinstance(cid, str) or not cid or not isinstance(served, list) \
                        or not all(isinstance(h, str) for h in served):
                    raise ValueError(f"identify reply {str(meta)[:200]} lacks a client_id string and a handlers list")
            except Exception as e:  # noqa: BLE001 - a malformed identify reply drops that node, not the server
                progress.log(f"[yellow]Flower node {node} sent a malformed identify reply ({escape(str(e))}); ignored[/]")
                continue
            if not flower_node_auth.may_serve(node, cid, self.allowed_nodes):
                continue  # not the node registered for this client's key: refused and logged there
            if cid in nodes or cid in dupes:
                # two nodes claim one client: neither is trusted (node identity is the authenticated key)
                other = nodes.pop(cid, None)
                handlers.pop(cid, None)
                dupes.add(cid)
                progress.log(f"[red]Flower nodes {other if other is not None else '(earlier)'} and {node} both "
                             f"claim client {escape(cid)!r}; both refused: give each SuperNode its own "
                             f"--node-config '{CLIENT_ID_KEY}=\"...\"'[/]")
                continue
            p = self.action_prefix
            nodes[cid], handlers[cid] = node, [h[len(p):] for h in served if h.startswith(p)]
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
        timeout = flower_node_auth.capped_timeout(timeout, messages, self.round_deadline, self._round_start)
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

    def _deliver(self, method: str, payloads: dict[str, Message], round: int) -> dict[str, Delivery]:
        cids = list(payloads)
        msgs = [FlMessage(flower_codec.encode(payloads[c], self.max_bytes), dst_node_id=self._nodes[c],
                          message_type=f"{CATEGORY}.{self.action_prefix}{method}", group_id=str(round),
                          ttl=self.ttl)
                for c in cids]
        raw = self._exchange(msgs, self.timeout)
        down_sizes: dict[int, int] = {}  # a broadcast sends one Message object to every client: size it once
        out: dict[str, Delivery] = {}
        for cid, reply in zip(cids, raw):
            msg = payloads[cid]
            down = down_sizes.setdefault(id(msg), len(codec.encode(msg)))
            if reply is None:
                out[cid] = Delivery(error=TimeoutError(f"no reply within {self.timeout} s" if self.timeout
                                                       is not None else "message could not be delivered"),
                                    down_bytes=down)
                continue
            if reply.has_error():
                out[cid] = Delivery(error=_error_of(reply), down_bytes=down)
                continue
            try:
                if reply.metadata.src_node_id != self._nodes[cid]:
                    raise ValueError(f"reply came from node {reply.metadata.src_node_id}, not from client "
                                     f"{cid}'s node {self._nodes[cid]}")
                got = flower_codec.decode(reply.content, self.max_bytes)
                up = len(codec.encode(got))
            except Exception as e:  # noqa: BLE001 - a malformed reply is that client's failure
                out[cid] = Delivery(error=e, down_bytes=down)
                continue
            out[cid] = Delivery(reply=got, down_bytes=down, up_bytes=up)
        return out

    def aggregate(self, method: str, payloads: dict[str, Message], round: int = 0,
                  weight_key: str = "num_examples", expect: Any = None) -> Aggregate:
        """The weighted mean of the clients' reply tensors by SecAgg+ (``flower_secagg``): the server never
        holds an individual reply's tensors. Clients that fail or drop out are failures under the policy;
        the aggregate holds the others' updates when at least ``min_clients`` (and SecAgg+'s threshold)
        remained. Bytes are the Flower wire bytes of all four protocol stages per client."""
        from fedkt.federation import secagg_guard
        from fedkt.federation.validate import as_layout, escape

        self._check_call(method, payloads)
        t0 = time.perf_counter()
        node_payloads = {self._nodes[c]: m for c, m in payloads.items()}
        cid_of = {self._nodes[c]: c for c in payloads}
        digest = secagg_guard.payload_digest(node_payloads, cid_of)
        done = self._journal.check(method, round, digest, list(payloads))  # refuses another set/payload
        if done is not None:  # this round's mean is known already: no second secure sum, no retraining
            progress.log(f"round {round}: secure aggregate of {method!r} replayed from the journal "
                         f"({escape(str(done['contributors']))}); not aggregated again")
            return Aggregate(tensors=done["tensors"], clients=list(done["contributors"]),
                             weights=dict(done["weights"]), meta=dict(done["meta"]))
        layout = as_layout(expect)

        def check(node: int, content: Any) -> dict[str, Any]:
            cid = cid_of[node]
            return secagg_guard.check_masked_reply(content, cid, method, weight_key, layout,
                                                   self.declared_examples.get(cid), self.secagg.max_weight)
        try:
            res = flower_secagg.secure_aggregate(lambda msgs, t: self._exchange(msgs, t), node_payloads,
                                                 self.action_prefix + method,
                                                 round, self.secagg, self.timeout, weight_key, check)
        finally:
            self._timings[method] = self._timings.get(method, 0.0) + time.perf_counter() - t0
        if res.halted and self.on_failure == "skip":
            for node, err in res.errors.items():
                self._record_failure(cid_of[node], method, round, err)
            raise AllClientsFailed(res.halted)
        for node, err in res.errors.items():
            self._record_failure(cid_of[node], method, round, err)
        for node in node_payloads:
            self.ledger.record(round, method, cid_of[node], "down", res.down_bytes.get(node, 0))
            if node in res.contributors:
                self.ledger.record(round, method, cid_of[node], "up", res.up_bytes.get(node, 0))
        self._check_quorum(method, round, len(res.contributors), len(payloads))
        order = [c for c in payloads if self._nodes[c] in res.contributors]
        weights = {c: res.contributors[self._nodes[c]][0] for c in order}
        meta = {c: res.contributors[self._nodes[c]][1] for c in order}
        for c, m in meta.items():
            n = m.get("num_examples") if isinstance(m, dict) else None
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                self.declared_examples.setdefault(c, n)
        self._journal.record(method, round, digest, order, weights, meta, res.tensors)  # before anyone uses it
        bound = flower_secagg.error_bound([w * (self.secagg.max_weight if not weight_key else 1.0)
                                           for w in weights.values()], self.secagg)
        self.notes.setdefault("secagg", {})[method] = {
            "clients": len(order), "error_bound": bound,
            "clipped": {cid_of[n]: k for n, k in res.clipped.items() if k}}
        return Aggregate(tensors=res.tensors, clients=order, weights=weights, meta=meta)

    def close(self) -> None:
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    @classmethod
    def in_process(cls, clients: Iterable[str | ClientSpec], handlers: dict[str, Handler],
                   context_factory: ContextFactory | None = None, num_workers: int = 1,
                   **kwargs: Any) -> "FlowerFederation":
        """A federation whose clients run in this process on Flower's simulation engine (no Ray).

        ``clients``: client ids (bare contexts, or what ``context_factory`` builds) or ClientSpecs (their
        JSON goes into each node's config, and the default context factory builds them there)."""
        clients = list(clients)
        ids = [c.cid if isinstance(c, ClientSpec) else str(c) for c in clients]
        node_configs = {c.cid: {SPEC_KEY: spec_to_json(c)} for c in clients if isinstance(c, ClientSpec)}
        engine = InProcessFlower(make_client_app(handlers, context_factory), ids, num_workers,
                                 node_configs=node_configs)
        try:
            return cls(engine.grid, ids, on_close=engine.close, health_check=engine.check, **kwargs)
        except BaseException:
            engine.close()
            raise


# --------------------------------------------------------------------------------- in-process engine
class InProcessFlower:
    """Flower's simulation engine without Ray: nodes in this process, ClientApps on worker threads.

    Builds the in-memory LinkState, registers one node per client id (node config
    ``fedkt-client-id``, ``partition-id``, ``num-partitions``, plus ``node_configs[cid]``), and runs
    ``vce.run_api`` (Flower's message pump: LinkState -> queue -> backend -> LinkState) on a background
    thread with :class:`_ThreadBackend`. :attr:`grid` is an ``InMemoryGrid`` for a ServerApp main loop.
    """

    def __init__(self, client_app: ClientApp, client_ids: list[str], num_workers: int = 1,
                 pull_interval: float = 0.005, node_configs: dict[str, dict[str, Any]] | None = None):
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
            config = {CLIENT_ID_KEY: client_ids[i], "partition-id": i, "num-partitions": len(client_ids),
                      **(node_configs or {}).get(client_ids[i], {})}
            stores[node_id] = DeprecatedRunInfoStore(node_id, config)
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
        # a deployed node gets its own deserialised copy of each message; in process the pushed object
        # itself arrives, and a RecordDict shared by several messages (SecAgg+'s setup stage sends one
        # to every node) would be mutated by the first node's mod under the others
        message = copy.deepcopy(message)
        return self._app(message, context), context
