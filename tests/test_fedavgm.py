"""FedAvgM (server momentum): the update rule on hand-computed numbers, secure aggregation through the
shared round with no code of its own, and an end-to-end tiny run (resume included: the momentum is round
state, checkpointed with the adapter)."""

from types import SimpleNamespace

import pytest
import torch

from fedkt.algorithms.fedavgm import FedAvgM, FedAvgMConfig
from fedkt.config import ConfigError
from fedkt.registry import load_config
from fedkt.federation.base import Aggregate, Message, weighted_mean


class DeltaFederation:
    """Clients c0 (1 example) and c1 (3 examples) whose reply is the adapter sent plus a known delta."""

    clients = ["c0", "c1"]
    weights = {"c0": 1, "c1": 3}

    def __init__(self, deltas):
        self.deltas, self.rnd, self.used = deltas, 0, []

    def _replies(self, payloads):
        d = self.deltas[self.rnd]
        return {c: Message(tensors={"w": payloads[c].tensors["w"] + torch.tensor(d[c])},
                           meta={"num_examples": self.weights[c], "loss": 0.0}) for c in payloads}

    def call(self, method, payloads, rnd, **kw):
        self.rnd, _ = rnd, self.used.append("call")
        return self._replies(payloads)

    def aggregate(self, method, payloads, rnd, weight_key="num_examples", **kw):
        self.rnd, _ = rnd, self.used.append("aggregate")
        replies = self._replies(payloads)
        return Aggregate(weighted_mean([r.tensors for r in replies.values()], [self.weights[c] for c in replies]),
                         list(replies), dict(self.weights), {c: r.meta for c, r in replies.items()})

    def take_timing(self, method):
        return 0.0


def server(momentum, server_lr, secure=False):
    cfg = SimpleNamespace(seed=0, train=SimpleNamespace(epochs=1.0),
                          federation=SimpleNamespace(secure_aggregation=secure, clients_per_round=0),
                          section=lambda name: FedAvgMConfig(momentum=momentum, server_lr=server_lr))
    return SimpleNamespace(cfg=cfg)


DELTAS = {1: {"c0": [0.4, 0.0], "c1": [0.0, -0.8]},   # weighted mean delta (1·d0 + 3·d1)/4 = [0.1, -0.6]
          2: {"c0": [0.0, 0.4], "c1": [0.4, 0.0]}}    # = [0.3, 0.1]


@pytest.mark.parametrize("secure", [False, True])
def test_server_momentum_by_hand_two_rounds(secure):
    """β = 0.5, η = 2, θ⁰ = [1, 2].
    Round 1: Δ¹ = θ⁰ − mean = [-0.1, 0.6]; v¹ = Δ¹; θ¹ = θ⁰ − 2·v¹ = [1.2, 0.8].
    Round 2: Δ² = [-0.3, -0.1]; v² = 0.5·v¹ + Δ² = [-0.35, 0.2]; θ² = θ¹ − 2·v² = [1.9, 0.4]."""
    fed, algo, srv = DeltaFederation(DELTAS), FedAvgM(), server(0.5, 2.0, secure)
    state = {"slm": {"w": torch.tensor([1.0, 2.0])}, "momentum": {"w": torch.zeros(2)}}
    s1 = algo.round(srv, fed, state, 1).state
    assert s1["slm"]["w"].tolist() == pytest.approx([1.2, 0.8], abs=1e-6)
    assert s1["momentum"]["w"].tolist() == pytest.approx([-0.1, 0.6], abs=1e-6)
    s2 = algo.round(srv, fed, s1, 2).state
    assert s2["momentum"]["w"].tolist() == pytest.approx([-0.35, 0.2], abs=1e-6)
    assert s2["slm"]["w"].tolist() == pytest.approx([1.9, 0.4], abs=1e-6)
    # the base round chose the path: the secure one never sees a reply's tensors
    assert fed.used == (["aggregate"] * 2 if secure else ["call"] * 2)


def test_zero_momentum_unit_lr_is_fedavg():
    fed, state = DeltaFederation(DELTAS), {"slm": {"w": torch.tensor([1.0, 2.0])}, "momentum": {"w": torch.zeros(2)}}
    s1 = FedAvgM().round(server(0.0, 1.0), fed, state, 1).state
    assert s1["slm"]["w"].tolist() == pytest.approx([1.1, 1.4], abs=1e-6)  # θ⁰ + mean delta


def test_config_is_validated():
    with pytest.raises(ConfigError, match="fedavgm.momentum must be in \\[0, 1\\), got 1.0"):
        load_config(None, ["fedavgm.momentum=1.0"])
    with pytest.raises(ConfigError, match="fedavgm.server_lr must be > 0, got 0.0"):
        load_config(None, ["fedavgm.server_lr=0.0"])


def test_fedavgm_end_to_end_resume_and_secure(tmp_path, model_dirs, data_dir, monkeypatch):
    """A tiny 3-round run: FedAvgM with β = 0, η = 1 is FedAvg (to float32 rounding); with β = 0.9 a run cut
    after round 2 and resumed equals the uninterrupted one bit for bit (v is checkpointed); secure aggregation
    in process gives the same adapters."""
    from test_runs import interrupt_and_resume, tiny_config

    from fedkt.models import load_adapter_state
    from fedkt.experiment import run_experiment

    def adapter(out, m):
        return load_adapter_state(out / "adapters" / m / "slm")

    base = {"federation.rounds": 3, "eval.every_round": "false", "data.max_train_examples": 20, "eval.limit": 4}
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavg", "fedavgm"],
                         **base, **{"fedavgm.momentum": 0.0, "fedavgm.server_lr": 1.0})
    run_experiment(cfg, tmp_path / "plain")
    a, b = adapter(tmp_path / "plain", "fedavg"), adapter(tmp_path / "plain", "fedavgm")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)

    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavgm"], **base, **{"fedavgm.momentum": 0.9})
    full = run_experiment(cfg, tmp_path / "full")["methods"]["fedavgm"]
    m = adapter(tmp_path / "full", "fedavgm")
    assert not all(torch.allclose(a[k], m[k], atol=1e-6) for k in a)  # momentum changed the result
    def momentum_is_saved(tensors):
        assert set(tensors) == {"slm", "momentum"}

    resumed = interrupt_and_resume(cfg, tmp_path / "cut", monkeypatch, check=momentum_is_saved)["methods"]["fedavgm"]
    r = adapter(tmp_path / "cut", "fedavgm")
    assert all(torch.equal(m[k], r[k]) for k in m)
    assert full["per_round"] == resumed["per_round"] and full["comm"] == resumed["comm"]

    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavgm"], **base,
                         **{"fedavgm.momentum": 0.9, "federation.secure_aggregation": "true"})
    run_experiment(cfg, tmp_path / "secure")
    s = adapter(tmp_path / "secure", "fedavgm")
    assert all(torch.equal(m[k], s[k]) for k in m)
