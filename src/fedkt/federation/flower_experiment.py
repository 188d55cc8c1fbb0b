"""A fedkt experiment as a Flower app: the ServerApp runs ``fedkt run``'s methods over real SuperNodes.

``fedkt flower run experiment.toml --out DIR`` submits the app written by
:func:`~fedkt.federation.flower_app_files.write_app` (two small files: ``pyproject.toml`` and
``fedkt_flower_app.py``, which only imports :data:`server_app` and :data:`client_app` from here)
with run config ``experiment`` (the resolved experiment TOML text: every node gets the same
LoRA/training/evaluation settings and seed from the server), ``out`` (the run
directory on the server machine), ``resume`` and ``nodes`` (the allow-list ``{client id: node id}`` as JSON,
from the server operator's ``nodes.toml``: each client is served only by the node registered for its key;
empty in insecure trials). The SuperNodes run this app only if it is file for file the one their own
fedkt writes (:mod:`fedkt.federation.flower_node_app`).

* **Server** (:func:`server_main`): :func:`fedkt.experiment.run_experiment` with a :class:`ServerContext`
  whose federation is a :class:`FlowerFederation` over the Grid: the same round driver, checkpoints,
  results and report as in process. With ``resume`` it continues each method from its last completed
  round checkpoint in ``out`` (the nodes' client state comes back from their workdirs). The server's
  auxiliary set and evaluation sets are drawn from the public task data exactly as in process.
* **Clients** (:data:`client_app`): one ClientApp serves every registered method; handler ``h`` of
  method ``m`` answers message type ``query.m__h`` (two methods may both have a ``fit``), and the
  server's federation for ``m`` uses ``action_prefix = "m__"``. A node's private side comes from its
  client file (node config ``fedkt-client-spec``, see
  :func:`~fedkt.federation.flower_client_file.load_client_file`): its id, its data files, optionally its
  own model path, its workdir and secret seed.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from fedkt import registry
from fedkt.clients import ClientContext, ClientFactory, ClientSpec, Handler
from fedkt.config import ConfigError, ExperimentConfig
from fedkt.data.partition import split_aux, subsample
from fedkt.data.prompts import with_format
from fedkt.data.tasks import load_task
from fedkt.federation import flower_secagg
from fedkt.federation.flower import FlowerFederation  # sets FLOWER_ENV before flwr is imported
from fedkt.federation.flower_client_app import make_client_app
from fedkt.federation.flower_client_file import load_client_file
from fedkt.federation.flower_protocol import SCOPE_SEP
from fedkt.federation.flower_spec import SPEC_KEY
from fedkt.experiment import run_experiment, set_threads
from fedkt.seeds import derive_seed
from fedkt.server import ServerContext
from fedkt.simulation import load_eval_sets

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402



def experiment_from_text(text: str) -> ExperimentConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"run config 'experiment' is not valid TOML: {e}") from e
    return registry.config_from_dict(data)


def experiment_handlers() -> dict[str, Handler]:
    return {f"{name}{SCOPE_SEP}{h}": fn for name, spec in registry.methods().items()
            for h, fn in (spec.handlers or {}).items()}


class ExperimentContextFactory:
    """Builds the client from its client file (private side) and the run's experiment (shared settings),
    once per process, method and experiment."""

    def __init__(self) -> None:
        self._factory = ClientFactory(share_base=False)
        self._built: dict[tuple, ClientContext] = {}

    def __call__(self, cid: str, context: Context, scope: str = "") -> ClientContext:
        raw = context.node_config.get(SPEC_KEY)
        text = str(context.run_config.get("experiment", ""))
        key = (raw, text, scope)
        if key in self._built:
            return self._built[key]
        if raw is None or not text:
            return ClientContext(cid)
        client = load_client_file(str(raw))
        if client["cid"] != cid:
            raise ValueError(f"node serves client {cid!r} but its client file is for {client['cid']!r}")
        cfg = experiment_from_text(text)
        set_threads(cfg)  # the node's torch, as the server's
        spec = ClientSpec(cid=cid, model=client.get("model", cfg.model.slm), **cfg.model.client_fields(), lora=cfg.lora,
                          train=cfg.train, eval=cfg.eval, seed=cfg.seed, data_files=client["data_files"],
                          data_task=client.get("data_task", cfg.data.tasks[0] if cfg.data.tasks else "custom"),
                          workdir=Path(client["workdir"]) / scope if scope else Path(client["workdir"]),
                          secret_seed=client.get("secret_seed"), policy=client["policy"])
        if scope in ("standalone", "fedcot"):  # methods whose clients evaluate their own models
            spec.eval_sets = load_eval_sets(cfg)
        ctx = self._built[key] = self._factory.build(spec)
        return ctx


client_app = make_client_app(experiment_handlers(), ExperimentContextFactory())


# ---------------------------------------------------------------------------------------------- server
def deployment_server(cfg: ExperimentConfig, out: Path, grid: Grid, nodes: dict[str, int] | None = None):
    """The server side of a deployed run: its own public data, a FlowerFederation per method."""
    d, f = cfg.data, cfg.federation
    aux = []
    if cfg.partition.aux_size:  # drawn as in process (split_aux of the same pooled public rows)
        pooled = [e for t in d.tasks for e in subsample(load_task(t, d.train_split, d.dir, d.on_bad_line),
                                                         d.max_train_examples, derive_seed(cfg.seed, "train", t))]
        aux = with_format(split_aux(pooled, cfg.partition.aux_size, derive_seed(cfg.seed, "aux"))[1], cfg.eval)
    eval_sets = load_eval_sets(cfg)

    def open_federation(spec):
        return FlowerFederation(grid, None, on_failure=f.on_client_failure, timeout=f.timeout_s,
                                round_deadline=f.round_deadline_s, allowed_nodes=nodes,
                                max_bytes=int(f.max_payload_mb * 2**20), min_clients=f.min_clients,
                                action_prefix=f"{spec.name}{SCOPE_SEP}", num_clients=cfg.partition.num_clients,
                                secagg=flower_secagg.SecAggSettings.from_config(f),
                                secagg_journal=out / "secagg_journal" / spec.name)

    server = ServerContext(cfg=cfg, out=out, open_federation=open_federation, aux=aux, eval_sets=eval_sets)
    summary = {"clients": "deployment", "aux": len(aux), "eval": {t: len(e) for t, e in eval_sets.items()}}
    return server, summary


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = experiment_from_text(str(rc["experiment"]))
    out = Path(str(rc["out"]))
    nodes = allowed_nodes(str(rc.get("nodes", "")))
    run_experiment(cfg, out, resume=bool(rc.get("resume", False)),
                   make_server=lambda c, o: deployment_server(c, o, grid, nodes))


def allowed_nodes(text: str) -> dict[str, int] | None:
    """Run config ``nodes``: the allow-list ``{client id: node id}`` as JSON (empty: none, insecure trials)."""
    if not text:
        return None
    try:
        nodes = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"run config 'nodes' is not JSON: {e}") from e
    if not isinstance(nodes, dict) or not all(isinstance(k, str) and type(v) is int for k, v in nodes.items()):
        raise ConfigError("run config 'nodes' must map client ids to integer node ids")
    return nodes

