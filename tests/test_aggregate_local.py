"""Federation.aggregate in process: the plain weighted mean (what FedAvg uses with
federation.secure_aggregation on LocalFederation), the min_clients quorum, weight checks. No flwr needed;
tests/test_flower_secagg.py runs the same handler through SecAgg+."""

import pytest
import torch

from fedkt.algorithms.fedavg import aggregate as fedavg_aggregate
from fedkt.algorithms.fedavg import fit_round
from fedkt.clients import ClientContext
from fedkt.federation import AllClientsFailed, ClientFailure, Message
from fedkt.federation.local import LocalFederation


def _update(ctx, msg):
    """A distinctive update per client: seeded noise around the received tensor, weight 10·(i+1)."""
    i = int(ctx.cid[1:])
    if ctx.cid in msg.meta.get("fail", []):
        raise RuntimeError(f"{ctx.cid} lost its GPU")
    g = torch.Generator().manual_seed(100 + i)
    return Message(tensors={"lora_A": msg.tensors["x"] + torch.randn(4, 6, generator=g) * 0.3,
                            "lora_B": torch.randn(6, 2, generator=g) * 0.1 - 0.05 * i},
                   meta={"num_examples": 10 * (i + 1), "loss": 1.0 + i})


HANDLERS = {"fit": _update}
X = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 24


def _payloads(clients, **meta):
    return {c: Message(tensors={"x": X}, meta=dict(meta)) for c in clients}


def _local(n=3, **kw):
    return LocalFederation([ClientContext(f"c{i}") for i in range(n)], HANDLERS, **kw)


def test_local_aggregate_is_the_plain_weighted_mean_bit_for_bit():
    fed = _local()
    agg = fed.aggregate("fit", _payloads(fed.clients), round=1)
    replies = _local().call("fit", _payloads(fed.clients), round=1)
    expect = fedavg_aggregate([r.tensors for r in replies.values()], [10, 20, 30])
    assert agg.clients == ["c0", "c1", "c2"] and agg.weights == {"c0": 10.0, "c1": 20.0, "c2": 30.0}
    assert agg.meta["c2"] == {"num_examples": 30, "loss": 3.0}
    for k in expect:
        assert torch.equal(agg.tensors[k], expect[k])
    # hand-checked on one coordinate: Σ wᵢ xᵢ / Σ wᵢ
    hand = sum(w * replies[c].tensors["lora_B"][0, 0].double() for c, w in zip(fed.clients, [10, 20, 30])) / 60
    assert agg.tensors["lora_B"][0, 0].item() == pytest.approx(hand.item(), abs=1e-7)


def test_local_aggregate_quorum_and_bad_weights():
    fed = _local(4, on_failure="skip", min_clients=4)
    with pytest.raises(AllClientsFailed, match=r"only 3 of 4 clients replied in 'fit' \(round 2\); "
                                               r"federation.min_clients = 4"):
        fed.aggregate("fit", _payloads(fed.clients, fail=["c1"]), round=2)
    # a reply without its weight fails the 'fit' schema (fedkt.federation.validate): that client's failure
    fed = LocalFederation([ClientContext("c0")], {"fit": lambda c, m: Message(tensors={"a": X}, meta={})})
    with pytest.raises(ClientFailure, match=r"client c0 reply to 'fit': meta lacks 'num_examples'"):
        fed.aggregate("fit", _payloads(["c0"]))
    # a handler without a schema: the weight itself is checked when aggregating
    fed = LocalFederation([ClientContext("c0")], {"g": lambda c, m: Message(tensors={"a": X}, meta={"n": True})})
    with pytest.raises(ClientFailure, match=r"client c0 replied meta\['n'\] = True"):
        fed.aggregate("g", _payloads(["c0"]), weight_key="n")


def test_fit_round_secure_equals_plain_in_process():
    """FedAvg with federation.secure_aggregation on LocalFederation: the same adapter, bit for bit."""
    def fit(ctx, msg):
        r = _update(ctx, Message(tensors={"x": msg.tensors["lora_A"]}))
        return Message(tensors=r.tensors, meta={**r.meta, "steps": 1})

    state = {"lora_A": X.clone(), "lora_B": torch.zeros(6, 2)}
    fed = LocalFederation([ClientContext(f"c{i}") for i in range(3)], {"fit": fit})
    plain = fit_round(fed, state, 1, 1.0)
    secure = fit_round(fed, state, 1, 1.0, secure=True)
    for k in plain:
        assert torch.equal(plain[k], secure[k])


def test_local_aggregate_uniform_weight_key_is_the_plain_mean():
    fed = _local()
    agg = fed.aggregate("fit", _payloads(fed.clients), round=1, weight_key="")
    replies = _local().call("fit", _payloads(fed.clients), round=1)
    expect = fedavg_aggregate([r.tensors for r in replies.values()], [1.0, 1.0, 1.0])
    assert agg.weights == {"c0": 1.0, "c1": 1.0, "c2": 1.0}
    assert all(torch.equal(agg.tensors[k], expect[k]) for k in expect)


class _CallSpy:
    """Which federation entry points the server's algorithm used for ``fit``."""

    def __init__(self, monkeypatch):
        from fedkt.federation.base import Federation

        self.calls: list[tuple[str, int]] = []
        spy = self
        broadcast, aggregate = Federation.broadcast, Federation.aggregate

        def spy_broadcast(fed, method, msg, round=0, metered=True, **kw):
            out = broadcast(fed, method, msg, round, metered, **kw)
            spy.calls.append(("broadcast", len(out)))
            return out

        def spy_aggregate(fed, method, payloads, round=0, weight_key="num_examples", **kw):
            agg = aggregate(fed, method, payloads, round, weight_key, **kw)
            spy.calls.append(("aggregate", len(agg.clients)))
            return agg

        monkeypatch.setattr(Federation, "broadcast", spy_broadcast)
        monkeypatch.setattr(Federation, "aggregate", spy_aggregate)


@pytest.mark.parametrize("method,extra", [("fedprox", {}), ("fedcollm", {}),
                                          ("fedcollm", {"fedcollm.aggregation": '"uniform"'})])
def test_secure_aggregation_in_process_equals_plain(tmp_path, model_dirs, data_dir, monkeypatch, method, extra):
    """FedProx and FedCoLLM with federation.secure_aggregation on LocalFederation: the same adapters and
    results bit for bit (the in-process mean is the same arithmetic), and the algorithm only ever received
    the mean (``Federation.aggregate``), never the clients' replies (``broadcast``). Over Flower the mean
    is SecAgg+'s: tests/test_flower_secagg.py."""
    from test_runs import tiny_config

    from fedkt.models import load_adapter_state
    from fedkt.experiment import run_experiment

    results, calls = {}, {}
    for secure in (False, True):
        cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, [method], **{
            "federation.secure_aggregation": str(secure).lower(), "eval.every_round": "false",
            "data.max_train_examples": 20, "eval.limit": 4, **extra})
        spy = _CallSpy(monkeypatch)
        results[secure] = run_experiment(cfg, tmp_path / str(secure))["methods"][method]
        calls[secure] = spy.calls
        monkeypatch.undo()
    assert calls == {False: [("broadcast", 3)] * 2, True: [("aggregate", 3)] * 2}
    for role in (["slm", "llm"] if method == "fedcollm" else ["slm"]):
        a = load_adapter_state(tmp_path / "False" / "adapters" / method / role)
        b = load_adapter_state(tmp_path / "True" / "adapters" / method / role)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role
    assert results[False]["per_round"] == results[True]["per_round"]
    assert results[False]["comm"] == results[True]["comm"]


def test_fedcot_secure_aggregation_in_process_equals_plain(tmp_path, model_dirs, data_dir, monkeypatch):
    """FedCoT with federation.secure_aggregation: the clients' trained adapters reach the server only as
    their mean (``Federation.aggregate`` of ``decode_train``; plain runs collect the replies by ``call``),
    and in process the result is the same bit for bit (text rounds are unchanged)."""
    from test_fedcot import fedcot_config

    from fedkt.federation.base import Federation
    from fedkt.models import load_adapter_state
    from fedkt.experiment import run_experiment

    monkeypatch.setenv("FEDKT_CACHE", str(tmp_path / "cache"))
    results, used = {}, {}
    for secure in (False, True):
        cfg = fedcot_config(tmp_path / str(secure), model_dirs, data_dir, **{
            "federation.secure_aggregation": str(secure).lower(), "eval.every_round": "false",
            "fedcot.share_adapters": "true"})
        seen: list[tuple[str, str]] = []
        call, aggregate = Federation.call, Federation.aggregate

        def spy_call(fed, method, payloads, round=0, metered=True, _seen=seen, _call=call, **kw):
            _seen.append(("call", method))
            return _call(fed, method, payloads, round, metered, **kw)

        def spy_aggregate(fed, method, payloads, round=0, weight_key="num_examples", _seen=seen, _agg=aggregate,
                          **kw):
            _seen.append(("aggregate", method))
            return _agg(fed, method, payloads, round, weight_key, **kw)

        monkeypatch.setattr(Federation, "call", spy_call)
        monkeypatch.setattr(Federation, "aggregate", spy_aggregate)
        # equal-length run directories: the encode message names the text-DP kit's path under the run
        results[secure] = run_experiment(cfg, tmp_path / f"run-{int(secure)}")["methods"]["fedcot"]
        monkeypatch.setattr(Federation, "call", call)
        monkeypatch.setattr(Federation, "aggregate", aggregate)
        used[secure] = [s for s in seen if s[1] in ("encode", "decode_train")]
    assert used[False] == [("call", "encode"), ("call", "decode_train"), ("call", "decode_train")]
    # LocalFederation.aggregate collects the replies through call, inside the federation
    assert used[True] == [("call", "encode"), ("aggregate", "decode_train"), ("call", "decode_train"),
                          ("aggregate", "decode_train"), ("call", "decode_train")]
    a = load_adapter_state(tmp_path / "run-0" / "adapters" / "fedcot" / "slm")
    b = load_adapter_state(tmp_path / "run-1" / "adapters" / "fedcot" / "slm")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert results[False]["slm"] == results[True]["slm"]
    assert results[False]["comm"] == results[True]["comm"]
