"""Flower runtime: the federation call interface on Flower's Message API (flwr 1.41).

Server side, :class:`FlowerFederation` is a :class:`~fedkt.federation.base.Federation` over a Flower
``Grid`` (the object a ServerApp's ``main(grid, context)`` receives). Like every runtime it implements
only :meth:`~FlowerFederation._deliver`: each fedkt call ``method`` becomes one Flower message of type
``"query.<method>"`` per addressed client, pushed with ``grid.push_messages`` and collected with
``grid.pull_messages``. Argument checks, the failure policy, metering, timings and the bookkeeping state
are the base class's, so it behaves exactly as :class:`~fedkt.federation.local.LocalFederation` (the
runtime-conformance suite, ``tests/test_runtime_conformance.py``, runs over both).

The runtime's modules, one job each:

* this module: the server's :class:`FlowerFederation`;
* :mod:`~fedkt.federation.flower_client_app`: the client's ``ClientApp`` (:func:`make_client_app`), which
  registers each client handler ``name`` as ``@app.query(name)``, so Flower's own routing dispatches each
  message type to the same handler functions ``LocalFederation`` runs;
* :mod:`~fedkt.federation.flower_spec`: a node's :class:`~fedkt.clients.ClientSpec` as JSON in its node
  config (``fedkt-client-spec``);
* :mod:`~fedkt.federation.flower_state`: where a node keeps its client's state between calls;
* :mod:`~fedkt.federation.flower_protocol`: what both halves share (message types, node identity, error
  replies);
* :mod:`~fedkt.federation.flower_engine`: the in-process engine (:class:`InProcessFlower`);
* :mod:`~fedkt.federation.flower_codec` (Message <-> Flower records) and
  :mod:`~fedkt.federation.flower_secagg` (SecAgg+).

Decisions:

* **Client identity.** A SuperNode names its fedkt client in its node config
  (``--node-config 'fedkt-client-id="c0"'``; else the ``cid`` of its ClientSpec, else its
  ``partition-id``, else its node id). On construction the federation sends one unmetered
  ``"query._fedkt_identify"`` message to every node; the replies give the client id and the handler
  names each node serves, which become the base class's ``clients`` and ``methods`` (the handlers every
  client serves, in the order the first client registered them), so unknown clients and handlers are
  refused on the server with the same ``KeyError`` as in-process, before anything is sent.
* **Client state** (``ClientContext.state``, a :class:`~fedkt.clients.StateStore`) survives between
  calls as ``StateStore.to_bytes`` in a state store (:mod:`~fedkt.federation.flower_state`): by default
  in the node's Flower ``Context.state`` (Flower rebuilds the ClientApp for every message and hands back
  the node's context), or in a node-local directory (large states). Before each call the context's state
  is restored from the store (a node with nothing stored yet starts from ``workdir/state.fkt`` when the
  context has a workdir holding one, else empty); after the call it is stored again, even when the
  handler raised (as in-process, where the context object keeps what the handler changed), and
  ``ctx.save_state()`` writes it to the workdir after a successful call, exactly as ``LocalFederation``
  does.
* **Failures.** A handler exception is caught in the ClientApp and returned as a Flower ``Error``
  whose reason carries the exception type, message and repr as JSON; the server rebuilds a
  :class:`~fedkt.federation.flower_protocol.RemoteClientError` of the same type name, so
  ``ClientFailure`` messages and ``failures`` entries read exactly as in-process. Transport errors (no
  reply within ``timeout``, a malformed reply) are failures of that client too.
* **Bytes** are metered as ``len(codec.encode(msg))`` down and up, the figure ``LocalFederation``
  records, so communication totals do not depend on the runtime; Flower's own framing adds a few
  hundred bytes per message on top (:func:`~fedkt.federation.flower_protocol.flower_wire_bytes`
  measures it).
* **Polling.** The federation polls the grid every ``poll_interval`` seconds (default 0.02) instead of
  ``grid.send_and_receive``, whose deployment Grid sleeps 3 s between polls.
* **In-process engine.** :meth:`FlowerFederation.in_process` runs the clients in this process on
  :class:`~fedkt.federation.flower_engine.InProcessFlower` (Flower's simulation engine without Ray).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedkt import progress
from fedkt.clients import ClientSpec, Handler
from fedkt.federation import codec, flower_codec  # flower_codec sets FLOWER_ENV before importing flwr
from fedkt.federation import flower_node_auth, flower_secagg, secagg_guard
from fedkt.federation.base import Aggregate, AllClientsFailed, Delivery, Federation
from fedkt.federation.flower_client_app import ContextFactory, make_client_app
from fedkt.federation.flower_engine import InProcessFlower
from fedkt.federation.flower_protocol import CATEGORY, IDENTIFY, error_of
from fedkt.federation.flower_spec import CLIENT_ID_KEY, SPEC_KEY, spec_to_json
from fedkt.federation.secagg_guard import AggregationJournal
from fedkt.federation.validate import as_layout, escape
from fedkt.message import Message

from flwr.app import Message as FlMessage  # noqa: E402  (after FLOWER_ENV)
from flwr.serverapp import Grid  # noqa: E402


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
        nodes: dict[str, int] = {}
        handlers: dict[str, list[str]] = {}
        dupes: set[str] = set()
        for node, reply in zip(node_ids, replies):
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else repr(error_of(reply))
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
                out[cid] = Delivery(error=error_of(reply), down_bytes=down)
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
