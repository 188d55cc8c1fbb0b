"""Secure aggregation (Federation.aggregate): SecAgg+ on Flower's in-process engine vs the plain weighted mean,
what the server can see, dropouts up to the threshold, the min_clients quorum, oversized payloads (the
in-process plain mean: tests/test_aggregate_local.py)."""

import numpy as np
import pytest
import torch

from fedkt.federation import AllClientsFailed, Message, weighted_mean
from test_aggregate_local import HANDLERS, X, _local, _payloads  # noqa: F401


# ------------------------------------------------------------------------------------------------ Flower
flwr = pytest.importorskip("flwr")

from fedkt.federation.flower import FlowerFederation  # noqa: E402
from fedkt.federation.flower_secagg import SecAggSettings, error_bound  # noqa: E402


class _SpyGrid:
    """Records every reply the server pulls."""

    def __init__(self, grid):
        self._grid, self.replies = grid, []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def pull_messages(self, ids):
        out = list(self._grid.pull_messages(ids))
        self.replies += out
        return out


def _blobs(reply):
    """Every array and every bytes value in a reply's content (what the server holds of it)."""
    arrays, raw = [], []
    if reply.has_error():
        return arrays, raw
    for rec in reply.content.array_records.values():
        for a in rec.values():
            arrays.append(a.numpy())
            raw.append(a.data)
    for rec in reply.content.config_records.values():
        for v in rec.values():
            for b in (v if isinstance(v, list) else [v]):
                if isinstance(b, bytes):
                    raw.append(b)
    return arrays, raw


def _leaks(spy, updates):
    """Does any pulled reply hold a client's update (its bytes, or an array numerically close to it)?"""
    for reply in spy.replies:
        arrays, raw = _blobs(reply)
        for u in updates:
            for t in u.values():
                for dt in (np.float32, np.float64):
                    needle = t.numpy().astype(dt).tobytes()[:64]
                    if any(needle in b for b in raw):
                        return True
                if any(a.shape == tuple(t.shape) and np.allclose(a.astype(np.float64), t.double().numpy(), atol=1e-3)
                       for a in arrays):
                    return True
    return False


@pytest.fixture(scope="module")
def flower_fed():
    fed = FlowerFederation.in_process([f"c{i}" for i in range(4)], HANDLERS, on_failure="skip",
                                      secagg=SecAggSettings(reconstruction_threshold=2, num_shares=1.0))
    yield fed
    fed.close()


def _expected(clients, fail=()):
    fed = _local(4)
    replies = {c: r for c, r in fed.call("fit", _payloads(clients)).items() if c not in fail}
    return replies, weighted_mean([r.tensors for r in replies.values()], [r.meta["num_examples"] for r in replies.values()])


def test_secagg_mean_within_quantisation_error_and_server_sees_only_the_aggregate(flower_fed):
    fed = flower_fed
    clients = ["c0", "c1", "c2"]
    replies, expect = _expected(clients)
    spy = fed.grid = _SpyGrid(fed.grid)
    try:
        agg = fed.aggregate("fit", _payloads(clients), round=1)
        secure_spy, spy.replies = spy.replies, []
        plain = fed.call("fit", _payloads(clients), round=1)
    finally:
        fed.grid = spy._grid
    bound = error_bound([10, 20, 30], fed.secagg)
    assert 1e-6 < bound < 1e-3
    assert agg.clients == clients and agg.weights == {"c0": 10.0, "c1": 20.0, "c2": 30.0}
    assert agg.meta["c1"] == {"num_examples": 20, "loss": 2.0}
    for k, v in expect.items():
        err = (agg.tensors[k].double() - v.double()).abs().max().item()
        assert agg.tensors[k].dtype == v.dtype and err <= bound, (k, err, bound)
    # the detector finds the updates in plain replies, and nothing of them in the SecAgg+ replies
    updates = [r.tensors for r in replies.values()]
    assert _leaks(spy, updates)
    spy.replies = secure_spy
    assert len(secure_spy) == 4 * 3  # four stages, three clients
    assert not _leaks(spy, updates)
    assert torch.equal(plain["c0"].tensors["lora_A"], replies["c0"].tensors["lora_A"])
    # bytes: the four stages' Flower bytes per client, down and up
    entries = [e for e in fed.ledger.entries if e.round == 1 and e.method == "fit"]
    assert {(e.client, e.direction) for e in entries[:6]} == {(c, d) for c in clients for d in ("down", "up")}
    assert all(e.bytes > 1000 for e in entries[:6])  # keys, shares, masked vectors: more than a plain reply
    assert all(e.bytes < 1000 for e in entries[6:])


def test_secagg_uniform_weights_is_the_plain_mean_on_the_finest_grid(flower_fed):
    """weight_key "" (FedCoLLM's aggregation = "uniform"): every weight travels as max_weight (ratio 1)."""
    clients = ["c0", "c1", "c2"]
    replies, _ = _expected(clients)
    expect = weighted_mean([r.tensors for r in replies.values()], [1.0] * 3)
    agg = flower_fed.aggregate("fit", _payloads(clients), round=8, weight_key="")
    assert agg.weights == {c: 1.0 for c in clients} and agg.meta["c2"]["num_examples"] == 30
    s = flower_fed.secagg
    bound = error_bound([s.max_weight] * 3, s)
    assert bound < error_bound([10, 20, 30], s) / 10
    for k, v in expect.items():
        assert (agg.tensors[k] - v).abs().max().item() <= bound, k


def test_secagg_tolerates_a_dropout_up_to_the_threshold_then_halts(flower_fed):
    fed = flower_fed
    clients = ["c0", "c1", "c2", "c3"]
    before = len(fed.failures)
    agg = fed.aggregate("fit", _payloads(clients, fail=["c2"]), round=2)
    _, expect = _expected(clients, fail=("c2",))
    assert agg.clients == ["c0", "c1", "c3"]
    bound = error_bound([10, 20, 40], fed.secagg)
    for k, v in expect.items():
        assert (agg.tensors[k] - v).abs().max().item() <= bound
    assert fed.failures[before:] == [{"round": 2, "method": "fit", "client": "c2",
                                      "error": "RuntimeError('c2 lost its GPU')"}]
    # three of four gone: every client keeps 1 live neighbour < threshold 2 -> the protocol halts
    with pytest.raises(AllClientsFailed, match="SecAgg\\+ halted in round 3 for 'fit'"):
        fed.aggregate("fit", _payloads(clients, fail=["c0", "c1", "c2"]), round=3)
    # two clients are refused (each would learn the other's update from the mean: secagg min_clients = 3)
    with pytest.raises(ValueError, match=r"secure aggregation needs at least 3 clients .*got 2 for 'fit' in round 4"):
        fed.aggregate("fit", _payloads(["c0", "c1"]), round=4)
    # and the federation still works afterwards (clients restart from the setup stage)
    agg = fed.aggregate("fit", _payloads(["c0", "c1", "c2"]), round=4)
    assert agg.clients == ["c0", "c1", "c2"]


def test_secagg_min_clients_and_oversized_reply_rejected(flower_fed):
    fed = flower_fed
    fed.min_clients = 4
    try:
        with pytest.raises(AllClientsFailed, match=r"only 3 of 4 clients replied in 'fit' \(round 5\)"):
            fed.aggregate("fit", _payloads(fed.clients, fail=["c3"]), round=5)
    finally:
        fed.min_clients = 1
    # a reply above the server's payload limit is a failure of that client, refused before decoding
    fed.max_bytes = 200
    try:
        with pytest.raises(AllClientsFailed, match=r"every client failed in 'fit' \(round 6\): .*exceeds the "
                                                   r"limit of 0.0 MiB"):
            fed.call("fit", _payloads(["c0"]), round=6)
    finally:
        fed.max_bytes = 2**31 - 2**20
    assert fed.call("fit", _payloads(["c0"]), round=7)["c0"].meta["num_examples"] == 10  # server survived


# ------------------------------------------------------------------------- FedCoLLM over Flower, SecAgg+
def _fedcollm_over_flower(tmp_path, model_dirs, data_dir, secure, name):
    """One round of FedCoLLM with the clients on Flower's in-process engine; returns the method result, the
    server's adapters, every client update the handlers produced and every reply the server pulled."""
    from test_runs import tiny_config

    from fedkt.algorithms.fedavg import client_fit
    from fedkt.models import load_adapter_state
    from fedkt.experiment import run_experiment
    from fedkt.simulation import Simulation

    updates, spies = [], []

    def fit(ctx, msg):  # the real FedAvg client, recording what it uploads (this process runs the nodes)
        reply = client_fit(ctx, msg)
        updates.append({k: v.clone() for k, v in reply.tensors.items()})
        return reply

    def make_server(cfg, out):
        sim = Simulation(cfg, out)
        server = sim.server()

        def open_federation(spec):
            specs = [sim.client_spec(i, spec.name) for i in range(len(sim.clients_data))]
            fed = FlowerFederation.in_process(specs, {**spec.handlers, "fit": fit},
                                              secagg=SecAggSettings(reconstruction_threshold=2))
            fed.grid = _SpyGrid(fed.grid)
            spies.append(fed.grid)
            return fed

        server.open_federation = open_federation
        return server, sim.data_summary()

    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedcollm"], **{
        "federation.secure_aggregation": str(secure).lower(), "federation.rounds": 1,
        "data.max_train_examples": 20, "eval.limit": 4})
    res = run_experiment(cfg, tmp_path / name, make_server=make_server)["methods"]["fedcollm"]
    adapters = {r: load_adapter_state(tmp_path / name / "adapters" / "fedcollm" / r) for r in ("slm", "llm")}
    spy = _SpyGrid(None)
    spy.replies = [r for s in spies for r in s.replies]
    return res, adapters, updates, spy


def test_fedcollm_secure_aggregation_over_flower_hides_client_adapters(tmp_path, model_dirs, data_dir):
    """FedCoLLM with federation.secure_aggregation over Flower (in-process engine, real SecAgg+): the server
    pulls nothing that holds a client's adapter (the same detector finds them in the plain run's replies),
    and the result differs from the plain run only by SecAgg+'s quantisation."""
    plain, plain_ad, plain_up, plain_spy = _fedcollm_over_flower(tmp_path, model_dirs, data_dir, False, "plain")
    sec, sec_ad, sec_up, sec_spy = _fedcollm_over_flower(tmp_path, model_dirs, data_dir, True, "secure")
    assert len(plain_up) == len(sec_up) == 3
    # the clients trained from the same θ⁰ on the same data: the same uploads in both runs
    for a, b in zip(plain_up, sec_up):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert _leaks(plain_spy, plain_up)
    assert not _leaks(sec_spy, sec_up)
    assert sec["comm"]["up_bytes"] > 2 * plain["comm"]["up_bytes"]  # keys, shares, masked vectors
    # the aggregate is SecAgg+'s (error <= bound; CSPRNG rounding, so it differs run to run); 3 distillation
    # steps run on it (measured: slm 7.6e-4, llm 8e-7 for a bound of 1.4e-3)
    bound = error_bound([4, 4, 4], SecAggSettings())  # 12 examples over 3 clients
    # the round's entry reports the induced error bound of the secure aggregate (and no clipping)
    note = sec["per_round"][0]["secagg"]["fit"]
    assert note["clients"] == 3 and note["error_bound"] == pytest.approx(bound) and note["clipped"] == {}
    assert "secagg" not in plain["per_round"][0]
    for role in ("slm", "llm"):
        err = max((plain_ad[role][k] - sec_ad[role][k]).abs().max().item() for k in plain_ad[role])
        assert 0 < err < 2 * bound, (role, err, bound)
