"""Secure aggregation of client tensors with Flower's SecAgg+ (flwr 1.41), driven from a Message-API loop.

:meth:`FlowerFederation.aggregate(method, payloads, round)` runs client handler ``method`` on each
addressed client inside Flower's SecAgg+ protocol and hands the server only Σ wᵢ tᵢ / Σ wᵢ (the weighted
mean of the replies' tensors, weight ``reply.meta[weight_key]``), never a client's own tensors.

How it is wired (flwr 1.41 exposes SecAgg+ only through the legacy strategy path):

* **Server**: :func:`secure_aggregate` runs the four stage methods of Flower's own
  ``flwr.server.workflow.SecAggPlusWorkflow`` (setup → share keys → collect masked vectors → unmask)
  one after another, with a duck-typed legacy context: a strategy whose ``configure_fit`` returns one
  ``FitIns`` per addressed node (``config["fedkt.payload"]`` = the fedkt codec bytes of that client's
  payload, ``config["fedkt.method"]`` = the handler) and whose ``aggregate_fit`` captures the unmasked
  aggregate. The workflow's ``grid.send_and_receive`` goes to :class:`_ExchangeGrid`, which pushes and
  polls through the federation (fast polling, health checks, timeout) and meters the Flower bytes each
  node sent and received in all four stages.
* **Client**: the ClientApp registers a ``train`` function behind ``secaggplus_mod`` (Flower's client
  half of the protocol, state in the node's ``Context.state``). In the collect stage the mod calls
  :func:`make_secure_train`'s function, which runs the fedkt handler exactly as a ``query`` call does
  (same context, same state store) and returns legacy ``FitRes`` records: the reply's tensors as float
  arrays (``parameters``), the weight (``num_examples``), and ``fedkt.meta``/``fedkt.layout`` (JSON: the
  reply meta, tensor names, dtypes) as metrics. The mod quantises ``wᵢ/max_weight · tᵢ``, masks it, and
  clears the arrays before the reply leaves the node. A handler exception becomes an error reply (the
  node drops out of the protocol; SecAgg+ removes its masks).

Threat model (as in Bonawitz et al. 2017 / Bell et al. 2020 and the FedCoLLM/FATE papers): an
honest-but-curious (semi-honest) server that follows the protocol learns the sum of the updates of the
surviving clients and nothing about an individual update, as long as fewer than ``threshold`` clients
collude with it; the server is trusted to run the protocol correctly (it relays the public keys: an
actively malicious server could substitute them; Flower's SecAgg+ has no key authentication beyond the
transport). **Not protected**: each client's weight (``num_examples``) and reply meta (losses) travel in
the clear, as do the payload the server sends down. Clients that drop out after sending their masked
vector are still in the sum; fewer than ``threshold`` live neighbours aborts the round.

Hardening (docs/secagg.md "SecAgg+ guarantees"): masks are expanded from the full 32-byte seeds with
AES-256-CTR (``secagg_crypto``, in place of flwr's 32-bit-seeded Mersenne Twister, flwr #7522), rounding
draws from the OS CSPRNG, at least ``min_clients`` (3) clients take part, a round's unmasked mean is
journaled so it is never re-aggregated over another client set (``secagg_guard``), and each masked reply's
clear parts are validated before it enters the sum.

Precision: each client sends ``round(clip(wᵢ/W · tᵢ) …)`` on a grid of step ``2c/q`` (stochastic
rounding with fresh CSPRNG uniforms; ``c = clipping_range``, ``q = quantization_range``, ``W =
max_weight``), so the mean is off by at most ``n · 2c/q / Σ (wᵢ/W)`` per coordinate
(:func:`error_bound`); values outside ``[-c, c]`` (after the ``wᵢ/W`` scaling) are clipped. The plain
mean (``weight_key = ""``, FedCoLLM's ``aggregation = "uniform"``) sends every weight as ``W`` (ratio 1,
the finest grid; values must lie in ``[-c, c]``) and reports each contributor's weight as 1.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedkt.federation import codec, flower_codec  # flower_codec sets FLOWER_ENV before importing flwr
from fedkt.federation.base import reply_weight
from fedkt.message import Message
from fedkt.federation.flower_codec import DTYPES_BY_NAME
from fedkt.federation.flower_protocol import error_of, flower_wire_bytes
from fedkt.privacy.policy import SECURE_AGGREGATION

import flwr.compat.common.recorddict_compat as compat  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402
from flwr.app import Message as FlMessage  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.common import FitIns, FitRes, Parameters, Status, Code  # noqa: E402
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key  # noqa: E402
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState  # noqa: E402

from fedkt.federation import secagg_crypto  # noqa: E402

secagg_crypto.install()  # masks from the full 32-byte seeds (AES-CTR), CSPRNG rounding: client and server alike

PAYLOAD_KEY, METHOD_KEY, PRG_KEY = "fedkt.payload", "fedkt.method", "fedkt.prg"
CLIP_KEY, MAXW_KEY = "fedkt.clipping_range", "fedkt.max_weight"
META_KEY, LAYOUT_KEY = "fedkt.meta", "fedkt.layout"
UNIFORM_KEY = "fedkt.uniform_weight"
MODS = [secaggplus_mod]
"""The client mods of the secure ``train`` function (the ClientApp puts its error mod outside them)."""


@dataclasses.dataclass
class SecAggSettings:
    """SecAgg+ parameters (Flower's names; see ``SecAggPlusWorkflow``).

    ``num_shares``: shares of each client's secrets (a float = that fraction of the sampled clients;
    1.0 = every client is every client's neighbour). ``reconstruction_threshold``: shares needed to
    rebuild a secret (a float = that fraction of ``num_shares``, at least 2): the protocol survives as
    long as every client keeps that many live neighbours, and that many colluding clients + the server
    could unmask one client. ``max_weight``: the largest expected client weight (examples); weights are
    scaled by it before quantisation, so a much larger value costs precision and a smaller one risks
    overflow (Flower warns). ``clipping_range``/``quantization_range``/``modulus_range``: the integer
    encoding (see the module docstring)."""

    min_clients: int = 3
    """Fewest clients a secure aggregation may run over (with 2, each learns the other's update from the
    mean); ``[federation] secagg_min_clients``."""
    num_shares: float | int = 1.0
    reconstruction_threshold: float | int = 0.5
    max_weight: float = 1000.0
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32

    @classmethod
    def from_config(cls, f: Any) -> "SecAggSettings":
        """The settings of a ``[federation]`` section (``secagg_*`` keys)."""
        return cls(min_clients=f.secagg_min_clients, reconstruction_threshold=f.secagg_reconstruction_threshold,
                   max_weight=f.secagg_max_weight, clipping_range=f.secagg_clipping_range,
                   quantization_range=f.secagg_quantization_range, modulus_range=f.secagg_modulus_range)

    def workflow(self, timeout: float | None) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(self.num_shares, self.reconstruction_threshold, max_weight=self.max_weight,
                                  clipping_range=self.clipping_range, quantization_range=self.quantization_range,
                                  modulus_range=self.modulus_range, timeout=timeout)


def error_bound(weights: list[float], s: SecAggSettings) -> float:
    """Worst-case absolute error per coordinate of the SecAgg+ weighted mean vs the exact one (stochastic
    rounding of each client's scaled values, plus the weights' own quantisation), for values inside the
    clipping range."""
    step = 2 * s.clipping_range / s.quantization_range
    ratios = [round(w / s.max_weight * s.quantization_range) / s.quantization_range for w in weights]
    total = sum(ratios)
    # rounding: n steps in the sum; weight quantisation: |dq_i - w_i/W| <= 1/(2q) per client, times |t| <= c
    return len(weights) * step / total + len(weights) * s.clipping_range / (s.quantization_range * total)


# ------------------------------------------------------------------------------------------ client side
def make_secure_train(run_handler: Callable[[str, Message, Context], Message],
                      weight_key_default: str = "num_examples") -> Callable[[FlMessage, Context], FlMessage]:
    """The ClientApp ``train`` function behind ``secaggplus_mod``: run fedkt handler ``config[fedkt.method]``
    on the payload ``config[fedkt.payload]`` and reply its tensors + weight as legacy FitRes records.

    ``run_handler(name, payload, flower_context)`` runs one fedkt handler the way the query path does
    (context, state restore/save) and returns its reply (raises on failure)."""

    def train(message: FlMessage, context: Context) -> FlMessage:
        fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
        cfg = fitins.config
        if not isinstance(cfg.get(PAYLOAD_KEY), bytes) or not isinstance(cfg.get(METHOD_KEY), str):
            raise ValueError("malformed secure-aggregation message: no fedkt payload/method in the FitIns "
                             "config (was it sent by fedkt's FlowerFederation.aggregate?)")
        if cfg.get(PRG_KEY) != secagg_crypto.PRG_ID or not secagg_crypto.installed():
            raise RuntimeError(f"secure aggregation asks for mask PRG {cfg.get(PRG_KEY)!r}; this node runs "
                               f"{secagg_crypto.PRG_ID!r} (installed: {secagg_crypto.installed()}): run the same "
                               "fedkt version on server and clients")
        payload = codec.decode(cfg[PAYLOAD_KEY])
        weight_key = str(cfg.get("fedkt.weight_key", weight_key_default))
        token = SECURE_AGGREGATION.set(True)  # the client's policy may let adapters leave: they leave masked
        try:
            reply = run_handler(str(cfg[METHOD_KEY]), payload, context)
        finally:
            SECURE_AGGREGATION.reset(token)
        if not isinstance(reply, Message):
            raise TypeError(f"handler {cfg[METHOD_KEY]!r} returned {type(reply).__name__}, expected a Message")
        # uniform (weight_key ""): every client weighs max_weight, the scale SecAgg+ quantises best
        weight = reply_weight("this node", reply, weight_key) if weight_key else float(cfg[UNIFORM_KEY])
        names = sorted(reply.tensors)
        if not names:
            raise ValueError(f"handler {cfg[METHOD_KEY]!r} replied no tensors to aggregate")
        bad = [k for k in names if not reply.tensors[k].is_floating_point()]
        if bad:
            raise TypeError(f"secure aggregation averages float tensors only; {bad} are not")
        arrays = [reply.tensors[k].detach().cpu().double().numpy() for k in names]
        clip = float(cfg.get(CLIP_KEY, 0.0)) or float("inf")
        ratio = weight / float(cfg.get(MAXW_KEY, 1.0) or 1.0)  # the scaling secaggplus_mod applies
        clipped = int(sum(int((np.abs(a * ratio) > clip).sum()) for a in arrays))
        layout = {"names": names, "dtypes": [str(reply.tensors[k].dtype).removeprefix("torch.") for k in names],
                  "shapes": [list(reply.tensors[k].shape) for k in names], "clipped": clipped}
        # stochastic rounding draws from the OS CSPRNG (secagg_crypto.stochastic_round): fresh every round,
        # not derivable from any seed the server knows
        res = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(arrays),
                     num_examples=weight,  # type: ignore[arg-type]  (float weights are fine for SecAgg+)
                     metrics={META_KEY: json.dumps(reply.meta), LAYOUT_KEY: json.dumps(layout)})
        return FlMessage(compat.fitres_to_recorddict(res, keep_input=False), reply_to=message)

    return train


# ------------------------------------------------------------------------------------------ server side
class _Proxy:
    """What the workflow needs of a ``ClientProxy``: a node id."""

    def __init__(self, node_id: int):
        self.node_id = node_id
        self.cid = str(node_id)


class _Strategy:
    """The two strategy methods the SecAgg+ workflow calls: hand out fedkt payloads, capture the result."""

    def __init__(self, fitins: dict[int, FitIns]):
        self.fitins = fitins
        self.results: list[tuple[_Proxy, FitRes]] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any):
        return [(_Proxy(n), ins) for n, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        self.results = results
        return None, {}  # nothing written back into the legacy context


@dataclasses.dataclass
class _LegacyContext:
    """Duck-typed ``LegacyContext``: the attributes the workflow's stage methods read."""

    state: RecordDict
    strategy: _Strategy
    client_manager: Any = None
    history: Any = None


class _ClientManager:
    def __init__(self, n: int):
        self.n = n

    def num_available(self) -> int:
        return self.n


class _ExchangeGrid:
    """The ``grid.send_and_receive`` the workflow uses, on the federation's own push/poll loop; meters
    the Flower bytes each node was sent (down) and replied (up). A collect-stage reply (the masked vector)
    is validated first (``secagg_guard.check_masked_reply``); a bad one is withheld from the workflow, which
    then treats its node as dropped out (its masks are removed), and the node is reported as failed."""

    def __init__(self, exchange: Callable[[list[FlMessage], float | None], list[FlMessage | None]],
                 timeout: float | None, check: Callable[[int, Any], dict[str, Any]] | None = None):
        self.exchange, self.timeout, self.check = exchange, timeout, check
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.silent: set[int] = set()
        self.errors: dict[int, BaseException] = {}
        self.clear: dict[int, dict[str, Any]] = {}
        """node -> the validated clear parts of its masked reply (weight, meta, layout)."""

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[FlMessage]:
        messages = list(messages)
        replies = self.exchange(messages, self.timeout if timeout is None else timeout)
        out = []
        for m, r in zip(messages, replies):
            node = m.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + flower_wire_bytes(m.content)
            if r is None:
                self.silent.add(node)
                continue
            if r.has_error():
                self.errors.setdefault(node, error_of(r))
                out.append(r)
                continue
            try:
                if r.metadata.src_node_id != node:
                    raise ValueError(f"reply for node {node} came from node {r.metadata.src_node_id}")
                self.up[node] = self.up.get(node, 0) + flower_wire_bytes(r.content)
                cfgs = r.content.config_records.get(RECORD_KEY_CONFIGS)
                if self.check is not None and cfgs is not None and SecAggKey.MASKED_PARAMETERS in cfgs:
                    self.clear[node] = self.check(node, r.content)
            except Exception as e:  # noqa: BLE001 - withheld: the protocol drops this node and removes its masks
                self.errors.setdefault(node, e)
                continue
            out.append(r)
        return out


@dataclasses.dataclass
class SecureResult:
    tensors: dict[str, torch.Tensor]
    contributors: dict[int, tuple[float, dict[str, Any]]]
    """node id -> (weight, reply meta) of every node whose masked update is in the sum."""
    errors: dict[int, BaseException]
    """node id -> why it is not in the sum (error reply, no reply, dropped between stages)."""
    down_bytes: dict[int, int]
    up_bytes: dict[int, int]
    halted: str | None = None
    """Why the protocol stopped before the unmasking (then ``tensors`` is empty)."""
    clipped: dict[int, int] = dataclasses.field(default_factory=dict)
    """node id -> how many of its (weight-scaled) values it clipped to [-c, c] (its own report)."""


def secure_aggregate(exchange: Callable[[list[FlMessage], float | None], list[FlMessage | None]],
                     node_payloads: dict[int, Message], method: str, round: int, settings: SecAggSettings,
                     timeout: float | None, weight_key: str = "num_examples",
                     check: Callable[[int, Any], dict[str, Any]] | None = None) -> SecureResult:
    """Run SecAgg+ once over ``node_payloads`` (node id -> that client's payload); see the module docstring.

    ``check(node, content)`` validates a collect-stage reply and returns its clear parts (weight, meta,
    layout); a reply it refuses is dropped from the protocol. When the protocol halts (some client kept
    fewer than ``threshold`` live neighbours) the result says why in ``halted`` and holds no tensors;
    ``errors`` names the nodes that failed either way."""
    if len(node_payloads) < max(2, settings.min_clients):
        raise ValueError(f"secure aggregation needs at least {max(2, settings.min_clients)} clients "
                         f"(federation.secagg_min_clients; with 2, each client learns the other's update from "
                         f"the mean), got {len(node_payloads)} for {method!r} in round {round}")
    fitins = {}
    for node, payload in node_payloads.items():
        fitins[node] = FitIns(Parameters(tensors=[], tensor_type=""),
                              {PAYLOAD_KEY: codec.encode(payload), METHOD_KEY: method,
                               PRG_KEY: secagg_crypto.PRG_ID, "fedkt.weight_key": weight_key,
                               CLIP_KEY: float(settings.clipping_range), MAXW_KEY: float(settings.max_weight),
                               **({} if weight_key else {UNIFORM_KEY: float(settings.max_weight)})})
    strategy = _Strategy(fitins)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: int(round)}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    ctx = _LegacyContext(state=state, strategy=strategy, client_manager=_ClientManager(len(node_payloads)))
    grid = _ExchangeGrid(exchange, timeout, check)
    workflow = settings.workflow(timeout)
    wstate = WorkflowState()
    stages = (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage,
              workflow.unmask_stage)
    completed = all(stage(grid, ctx, wstate) for stage in stages)  # type: ignore[arg-type]  (stops at the first halt)
    contributors_nodes = {p.node_id: fr for p, fr in strategy.results}
    errors: dict[int, BaseException] = {}
    for node in node_payloads:
        if node in contributors_nodes:
            continue
        errors[node] = grid.errors.get(node) or (
            TimeoutError(f"no reply within {timeout} s (node gone?)") if node in grid.silent
            else RuntimeError("dropped out of the SecAgg+ protocol"))
    if not completed or not strategy.results:
        why = "; ".join(f"node {n}: {e!r}" for n, e in errors.items()) or "see the Flower log"
        return SecureResult({}, {}, errors, grid.down, grid.up,
                            halted=f"SecAgg+ halted in round {round} for {method!r}: some client kept fewer live "
                                   f"neighbours than the reconstruction threshold ({why})")
    fitres0 = strategy.results[0][1]
    arrays = parameters_to_ndarrays(fitres0.parameters)
    contributors: dict[int, tuple[float, dict[str, Any]]] = {}
    layout = None
    clipped: dict[int, int] = {}
    for node, fr in contributors_nodes.items():
        clear = grid.clear.get(node) or {"meta": json.loads(str(fr.metrics[META_KEY])),
                                         "layout": json.loads(str(fr.metrics[LAYOUT_KEY])),
                                         "weight": float(fr.num_examples)}
        contributors[node] = (float(clear["weight"]) if weight_key else 1.0, clear["meta"])
        lay = {k: clear["layout"][k] for k in ("names", "dtypes")}
        clipped[node] = int(clear["layout"].get("clipped", 0))
        if layout is not None and lay != layout:
            raise ValueError(f"clients replied different tensor layouts to {method!r}; they cannot be averaged")
        layout = lay
    assert layout is not None
    if len(arrays) != len(layout["names"]):
        raise RuntimeError(f"SecAgg+ returned {len(arrays)} arrays for {len(layout['names'])} tensors")
    tensors = {k: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(DTYPES_BY_NAME[d])
               for k, d, a in zip(layout["names"], layout["dtypes"], arrays)}
    return SecureResult(tensors=tensors, contributors=contributors, errors=errors, down_bytes=grid.down,
                        up_bytes=grid.up, clipped=clipped)
