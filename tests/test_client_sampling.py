"""Client sampling (``federation.clients_per_round``): seeded draws, FedAvg weights over the sampled set,
config validation, the same draw and mean in process and over Flower (same server code), and a resumed
run equal to an uninterrupted one."""

import random
from types import SimpleNamespace

import pytest
import torch

from fedkt.config import ConfigError
from fedkt.registry import load_config
from fedkt.fedavg_round import FedAvgRound, sample_clients
from fedkt.federation.base import Message
from fedkt.seeds import derive_seed

CLIENTS = [f"c{i}" for i in range(8)]


def test_sample_is_seeded_sized_ordered_and_varies():
    draws = {rnd: sample_clients(CLIENTS, 7, rnd, 3) for rnd in range(1, 6)}
    for rnd, got in draws.items():
        assert got == sample_clients(CLIENTS, 7, rnd, 3)  # deterministic in (seed, round)
        assert len(got) == 3 and len(set(got)) == 3 and got == sorted(got, key=CLIENTS.index)
        # exactly the documented derivation: Random(derive_seed(seed, "clients_per_round", round))
        idx = sorted(random.Random(derive_seed(7, "clients_per_round", rnd)).sample(range(8), 3))
        assert got == [CLIENTS[i] for i in idx]
    assert len({tuple(d) for d in draws.values()}) > 1  # rounds differ
    assert [sample_clients(CLIENTS, 8, r, 3) for r in range(1, 6)] != list(draws.values())  # seeds differ
    assert sample_clients(CLIENTS, 7, 1, 0) == CLIENTS and sample_clients(CLIENTS, 7, 1, 8) == CLIENTS


class ConstFederation:
    """Client cI replies the constant adapter I with I + 1 examples."""

    clients = CLIENTS

    def __init__(self):
        self.addressed = []

    def call(self, method, payloads, rnd, **kw):
        self.addressed.append(sorted(payloads, key=CLIENTS.index))
        return {c: Message(tensors={"w": torch.tensor([float(c[1:])])}, meta={"num_examples": int(c[1:]) + 1})
                for c in payloads}

    def take_timing(self, method):
        return 0.0


def test_fedavg_weights_over_the_sampled_clients_only():
    cfg = SimpleNamespace(seed=3, train=SimpleNamespace(epochs=1.0),
                          federation=SimpleNamespace(secure_aggregation=False, clients_per_round=3))
    fed = ConstFederation()
    out = FedAvgRound().round(SimpleNamespace(cfg=cfg), fed, {"slm": {"w": torch.zeros(1)}}, 2)
    chosen = sample_clients(CLIENTS, 3, 2, 3)
    assert fed.addressed == [chosen] and out.entry["sampled_clients"] == chosen
    assert out.logs == {"slm": {"sampled_clients": chosen}}
    ids = [int(c[1:]) for c in chosen]
    want = sum(i * (i + 1) for i in ids) / sum(i + 1 for i in ids)  # Σ nᵢθᵢ / Σ nᵢ over the 3 sampled
    assert out.state["slm"]["w"].item() == pytest.approx(want)


@pytest.mark.parametrize("sets,msg", [
    (["federation.clients_per_round=4", "partition.num_clients=3"],
     r"federation.clients_per_round = 4: it must be between 1 and partition.num_clients = 3"),
    (["federation.clients_per_round=-1"], r"federation.clients_per_round must be >= 0"),
    (["federation.clients_per_round=2", "partition.num_clients=5", "federation.secure_aggregation=true"],
     r"clients_per_round = 2 with secure_aggregation: .* at least federation.secagg_min_clients = 3"),
])
def test_clients_per_round_is_validated(sets, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, sets)
    assert load_config(None, ["federation.clients_per_round=3", "partition.num_clients=5",
                              "federation.secure_aggregation=true"]).federation.clients_per_round == 3


def test_secure_aggregation_refused_for_a_method_that_does_not_declare_it():
    from fedkt import registry
    from fedkt.algorithms.fedavg import FedAvg

    spec = registry.register(registry.MethodSpec(name="_nosecagg", label="X", summary="test", algorithm=FedAvg))
    try:
        with pytest.raises(ConfigError, match="method '_nosecagg' does not support secure aggregation"):
            load_config(None, ['methods=["_nosecagg"]', "federation.secure_aggregation=true"])
        assert load_config(None, ['methods=["_nosecagg"]']).methods == ["_nosecagg"]
        # the built-in averaging methods declare it; one-shot methods (no averaged upload) are not checked
        cfg = load_config(None, ['methods=["zero_shot","standalone","fedavg","fedprox","fedavgm"]',
                                 "federation.secure_aggregation=true"])
        assert all(registry.get(m).supports_secure_aggregation for m in ("fedavg", "fedprox", "fedavgm",
                                                                           "fedcollm", "fedcot"))
        assert cfg.federation.secure_aggregation
    finally:
        registry._REGISTRY.pop(spec.name)


def _run(tmp_path, model_dirs, data_dir, name, flower=False, interrupt_after=0, resume=False, **extra):
    """A tiny FedAvg run, 4 clients, 2 per round, 3 rounds; ``flower``: the clients on Flower's in-process
    engine (the same server code); returns the result and the ledger's clients per round."""
    from test_runs import Interrupt, tiny_config

    from fedkt.rounds import Checkpoints
    from fedkt.experiment import run_experiment

    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavg"], **{
        "partition.num_clients": 4, "federation.clients_per_round": 2, "federation.rounds": 3,
        "eval.every_round": "false", "data.max_train_examples": 24, "eval.limit": 4, **extra})
    make_server = None
    if flower:
        from fedkt.federation.flower import FlowerFederation
        from fedkt.federation.flower_secagg import SecAggSettings
        from fedkt.simulation import Simulation

        def make_server(cfg, out):
            sim = Simulation(cfg, out)
            server = sim.server()

            def open_federation(spec):
                specs = [sim.client_spec(i, spec.name) for i in range(len(sim.clients_data))]
                return FlowerFederation.in_process(specs, spec.handlers, secagg=SecAggSettings(reconstruction_threshold=2))

            server.open_federation = open_federation
            return server, sim.data_summary()
    orig = Checkpoints.save
    if interrupt_after:
        def save_then_die(self, round, tensors, state):
            orig(self, round, tensors, state)
            if round == interrupt_after:
                raise Interrupt()
        Checkpoints.save = save_then_die
        try:
            with pytest.raises(Interrupt):
                run_experiment(cfg, tmp_path / name, make_server=make_server)
        finally:
            Checkpoints.save = orig
    res = run_experiment(cfg, tmp_path / name, make_server=make_server, resume=resume)["methods"]["fedavg"]
    ledger = {r["round"]: sorted(r["clients"]) for r in res["comm"]["per_round"]}
    return res, ledger


def test_sampled_run_in_process_flower_and_resumed(tmp_path, model_dirs, data_dir):
    from fedkt.models import load_adapter_state

    local, ledger = _run(tmp_path, model_dirs, data_dir, "local")
    sampled = {e["round"]: e["sampled_clients"] for e in local["per_round"]}
    assert sampled == {r: sample_clients([f"client{i}" for i in range(4)], 0, r, 2) for r in (1, 2, 3)}
    assert ledger == {r: sorted(c) for r, c in sampled.items()}  # only the sampled clients were called
    a = load_adapter_state(tmp_path / "local" / "adapters" / "fedavg" / "slm")

    resumed, _ = _run(tmp_path, model_dirs, data_dir, "cut", interrupt_after=2, resume=True)
    b = load_adapter_state(tmp_path / "cut" / "adapters" / "fedavg" / "slm")
    assert resumed["per_round"] == local["per_round"] and resumed["comm"] == local["comm"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    flower, fledger = _run(tmp_path, model_dirs, data_dir, "flower", flower=True)
    c = load_adapter_state(tmp_path / "flower" / "adapters" / "fedavg" / "slm")
    assert [e["sampled_clients"] for e in flower["per_round"]] == list(sampled.values()) and fledger == ledger
    assert all(torch.equal(a[k], c[k]) for k in a)  # same clients, same training, same mean
