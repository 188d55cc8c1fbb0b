"""The architecture's promises: clients own their side, the registry feeds config/CLI/report, FedProx is
one file, the auxiliary set excludes client rows, bytes are per client and round, derive seeds come from the config."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fedkt import registry
from fedkt.clients import ClientContext, StateStore
from fedkt.config import ConfigError, ExperimentConfig
from fedkt.registry import load_config
from fedkt.registry import MethodSpec
from fedkt.run_results import MethodResult, RunResults
from fedkt.experiment import run_experiment
from fedkt.server import ServerContext
from fedkt.simulation import Simulation

from test_runs import tiny_config

SRC = Path(__file__).parent.parent / "src" / "fedkt"


def _reachable(obj, seen=None, depth=0):
    """Every object reachable through dataclass fields, dicts, lists (not into torch modules)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    yield obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, StateStore):
        children = [obj.values, obj.tensors]
    else:
        children = []
    for c in children:
        yield from _reachable(c, seen, depth + 1)


def test_clients_own_their_side(tmp_path, model_dirs, data_dir):
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedcollm"])
    sim = Simulation(cfg, tmp_path)
    server = sim.server()
    fed = sim.federation(registry.get("fedcollm"))
    contexts = list(fed._contexts.values())
    # the server's models are its own objects; simulated clients share one frozen base among themselves
    assert all(c.slm.model is not server.slm.model for c in contexts)
    assert all(c.slm is contexts[0].slm for c in contexts)
    assert not any(p.requires_grad for n, p in contexts[0].slm.model.named_parameters() if "lora_" not in n)
    # same LoRA seed on both sides: the common initial adapter is the same
    assert all(torch.equal(v, server.slm.init_adapter[k]) for k, v in contexts[0].slm.init_adapter.items())
    # nothing of the server is reachable from a client context
    forbidden = (ServerContext, ExperimentConfig, Simulation)
    server_objects = {id(server.slm.model), id(server.llm.model), id(server.aux)}
    for ctx in contexts:
        for obj in _reachable(ctx):
            assert not isinstance(obj, forbidden), type(obj)
            assert id(obj) not in server_objects
    # each client holds exactly its shard
    assert [len(c.data) for c in contexts] == [len(d) for d in sim.clients_data]
    assert [c.data for c in contexts] == sim.clients_data


def test_client_side_modules_never_import_the_server_side():
    server_side = {"fedkt.server", "fedkt.rounds", "fedkt.experiment", "fedkt.simulation", "fedkt.registry",
                   "fedkt.algorithms"}
    for f in ("message.py", "clients.py", "federation/base.py", "federation/local.py", "federation/codec.py"):
        tree = ast.parse((SRC / f).read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in names if any(m == s or m.startswith(s + ".") for s in server_side)}, f
    # the message both sides exchange sits below both: it imports nothing of fedkt's, and the client side
    # reaches it without going through the federation package
    tree = ast.parse((SRC / "message.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("fedkt")]
    tree = ast.parse((SRC / "clients.py").read_text())
    assert not [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith("fedkt.federation")]


def test_deployed_client_reads_its_own_files(tmp_path, model_dirs):
    from conftest import write_arc

    from fedkt.clients import ClientFactory, ClientSpec

    files = [str(write_arc(tmp_path / f"part{i}.jsonl", 3, start=10 * i)) for i in range(2)]
    ctx = ClientFactory(share_base=False).build(ClientSpec(cid="hospital-a", model=str(model_dirs["slm"]),
                                                           data_files=files, data_task="arc_easy"))
    assert [e.id for e in ctx.data] == ["q0", "q1", "q2", "q10", "q11", "q12"] and ctx.data[0].task == "arc_easy"
    assert ctx.slm.tokenizer is not None and ctx.seed_for("fit", 1) != ctx.seed_for("fit", 2)


def test_state_store_round_trip():
    s = StateStore()
    s["round"] = 3
    s["eps"] = [0.5, 1.0]
    s.tensors["adapter"] = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    back = StateStore.from_bytes(s.to_bytes())
    assert back.values == s.values and back["round"] == 3 and "adapter" in back
    assert all(torch.equal(back.tensors["adapter"][k], v) for k, v in s.tensors["adapter"].items())


@pytest.fixture()
def toy_method():
    from dataclasses import dataclass

    from fedkt.config import check

    @dataclass
    class ToyConfig:
        strength: float = 1.0

        def __post_init__(self):
            check(self.strength <= 10, f"strength must be <= 10, got {self.strength}")

    def run(server):
        return MethodResult(metrics={"slm": {"arc_easy": {"acc": 0.5, "acc_norm": 0.5, "n": 1}}},
                            extra={"strength": server.cfg.section(ToyConfig).strength})

    spec = registry.register(MethodSpec(name="toy", label="Toy-Method", summary="a toy for the tests", run=run,
                                        config=ToyConfig, needs_llm=True, rank=15))
    yield spec
    registry._REGISTRY.pop("toy")


def test_registry_feeds_config_cli_and_report(tmp_path, toy_method, model_dirs, data_dir):
    from typer.testing import CliRunner

    from fedkt.cli import app
    from fedkt.report import render

    # config: the method is allowed, its section parses and validates itself, needs_llm is enforced
    with pytest.raises(ConfigError, match="method 'toy' needs a server LLM: set model.llm"):
        load_config(None, ['methods=["toy"]'])
    cfg = load_config(None, ['methods=["toy"]', 'model.llm="x"', "toy.strength=3"])
    assert cfg.section(toy_method.config).strength == 3.0
    with pytest.raises(ConfigError, match=r"toy.strength must be <= 10, got 11.0"):
        load_config(None, ['methods=["toy"]', 'model.llm="x"', "toy.strength=11"])
    with pytest.raises(ConfigError, match=r"unknown key toy.strenght in \[toy\]"):
        load_config(None, ["toy.strenght=1"])
    with pytest.raises(ConfigError, match=r"allowed values: zero_shot, standalone, toy, fedavg"):
        load_config(None, ['methods=["nope"]'])
    assert "[toy]" in __import__("fedkt.config", fromlist=["dump_toml"]).dump_toml(cfg)
    # `fedkt methods` lists every registered method with its summary; `fedkt run --help` the built-ins
    out = CliRunner().invoke(app, ["methods"]).output
    for name, spec in registry.methods().items():
        assert f"{name} " in out and spec.summary in out
    assert "toy          Toy-Method   a toy for the tests (needs model.llm, settings: [toy])" in out
    helptext = CliRunner().invoke(app, ["run", "--help"], terminal_width=200).output
    assert all(m in helptext for m in ("zero_shot", "fedavg", "fedprox", "fedcollm", "centralized"))
    # the report labels it and places it by rank
    res = RunResults(name="r", fedkt_version="0", methods={
        "centralized": MethodResult(metrics={"slm": {"arc_easy": {"acc": 1.0, "acc_norm": 1.0, "n": 1}}}),
        "toy": MethodResult(metrics={"slm": {"arc_easy": {"acc": 0.5, "acc_norm": 0.5, "n": 1}}})})
    table = render(res)
    assert table.index("| Toy-Method |") < table.index("| Centralized |")
    # and it runs end to end through fedkt run
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["toy"], llm=True, **{"toy.strength": 2})
    r = run_experiment(cfg, tmp_path / "run")["methods"]["toy"]
    assert r["strength"] == 2.0 and r["slm"]["arc_easy"]["acc"] == 0.5 and r["wall_s"] >= 0


def test_results_round_trip():
    d = {"name": "x", "fedkt_version": "1", "methods": {"fedavg": {
        "slm": {"arc_easy": {"acc": 0.5}}, "comm": {"up_bytes": 1, "down_bytes": 2, "per_round": []},
        "per_round": [{"round": 1}], "timings": {"eval_s": 1.0}, "failures": [], "wall_s": 3.0, "eps": 2.0}},
        "data": {"clients": [1], "aux": 0, "eval": {}}, "models": {}}
    r = RunResults.from_dict(d)
    assert r.methods["fedavg"].extra == {"eps": 2.0} and r.methods["fedavg"].metrics["slm"]["arc_easy"]["acc"] == 0.5
    assert r.to_dict() == d


# ------------------------------------------------------------------------------------------------ FedProx
def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(tmp_path, model_dirs, data_dir):
    from fedkt.models import load_adapter_state

    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavg", "fedprox"], **{"fedprox.mu": 0.0})
    res = run_experiment(cfg, tmp_path / "r")["methods"]
    a = load_adapter_state(tmp_path / "r" / "adapters" / "fedavg" / "slm")
    b = load_adapter_state(tmp_path / "r" / "adapters" / "fedprox" / "slm")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res["fedprox"]["slm"] == res["fedavg"]["slm"]
    # the fit payload carries mu: a few bytes more than FedAvg's
    assert res["fedprox"]["comm"]["down_bytes"] > res["fedavg"]["comm"]["down_bytes"]


def test_fedprox_proximal_term_by_hand_and_pull_towards_global():
    from fedkt.algorithms.fedprox import proximal_term

    p = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    a = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    assert proximal_term(p, a).item() == pytest.approx(1 + 4 + 4)


def test_fedprox_large_mu_keeps_clients_near_the_global_adapter(tmp_path, model_dirs, data_dir):
    from fedkt.algorithms.fedprox import client_fit
    from fedkt.federation import Message

    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedprox"], **{"train.lr": 0.05})
    sim = Simulation(cfg, tmp_path)
    ctx = sim.factory.build(sim.client_spec(0, "fedprox"))
    g = torch.Generator().manual_seed(0)
    theta = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in ctx.slm.init_adapter.items()}

    def drift(mu):
        out = client_fit(ctx, Message(tensors=theta, meta={"round": 1, "epochs": 1.0, "mu": mu})).tensors
        return sum(((out[k] - theta[k]) ** 2).sum().item() for k in theta)

    assert drift(100.0) < 0.5 * drift(0.0)


# ------------------------------------------------------------------------------------------------ fixes
def test_files_scheme_aux_excludes_client_rows_by_content_and_has_exact_size(tmp_path, model_dirs, data_dir):
    from conftest import MC_ROWS

    # a client file whose rows are train rows 0..5 under other ids (as a client's own export would be)
    rows = [json.loads(x) for x in (data_dir / "arc_easy" / "train.jsonl").read_text().splitlines()]
    f = tmp_path / "c0.jsonl"
    f.write_text("".join(json.dumps({**r, "id": f"mine-{i}"}) + "\n" for i, r in enumerate(rows[:6])))
    g = tmp_path / "c1.jsonl"
    g.write_text("".join(json.dumps({**r, "id": f"other-{i}"}) + "\n" for i, r in enumerate(rows[6:10])))
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavg"], **{
        "partition.scheme": '"files"', "partition.num_clients": 2,
        "partition.files": json.dumps([str(f), str(g)]), "partition.aux_size": 50})
    sim = Simulation(cfg, tmp_path)
    held = {(r["question"]) for r in rows[:10]}
    assert len(sim.aux) == 50 and not any(e.question in held for e in sim.aux)
    with pytest.raises(ConfigError, match="only 54 examples of data.tasks are not held by a client"):
        Simulation(load_config(None, [*_sets(cfg), "partition.aux_size=60"]), tmp_path)


def _sets(cfg):
    p = cfg.partition
    return [f'data.dir="{cfg.data.dir}"', 'partition.scheme="files"', "partition.num_clients=2",
            f"partition.files={json.dumps(p.files)}", f'model.slm="{cfg.model.slm}"']


def test_comm_table_divides_by_client_rounds():
    from fedkt.report import comm_table

    per_round = [{"round": 1, "up_bytes": 300, "down_bytes": 300, "clients": {c: {} for c in ("a", "b", "c")}},
                 {"round": 2, "up_bytes": 100, "down_bytes": 100, "clients": {"a": {}}}]  # b, c skipped
    res = RunResults(name="x", fedkt_version="0", models={"slm": {"adapter_bytes": 100, "model_bytes": 1000,
                     "spec": "s", "params": 1, "adapter_params": 1, "adapter_fraction": 0.1}},
                     methods={"fedavg": MethodResult(comm={"up_bytes": 400, "down_bytes": 400, "per_round": per_round})})
    row = [line for line in comm_table(res).splitlines() if line.startswith("| FedAvg")][0]
    assert "| 100 B | 100 B |" in row and "| 100.0% |" in row  # 400 B over 4 client-rounds


def test_derive_seeds_come_from_the_config(tmp_path, model_dirs, monkeypatch):
    import fedkt.derive as d
    from fedkt.derive import DeriveConfig
    from fedkt.seeds import derive_seed

    seen = []
    orig = d.healing_prompts
    monkeypatch.setattr(d, "healing_prompts", lambda tok, n, seed: seen.append(seed) or orig(tok, n, seed))
    for s in (0, 7):
        d.derive(DeriveConfig(parent=str(model_dirs["llm"]), out=str(tmp_path / f"d{s}"), layers=[0, 3], steps=0,
                              num_prompts=2, eval_texts=1, gen_tokens=2, seed=s))
    assert seen == [derive_seed(0, "derive", "prompts"), derive_seed(7, "derive", "prompts")]
