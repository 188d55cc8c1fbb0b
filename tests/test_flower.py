"""Flower runtime: the call interface on Flower's Message API, in process and as real processes."""

import time

import pytest
import torch

pytest.importorskip("flwr")

from fedkt.federation import ClientContext, ClientFailure, LocalFederation, Message, codec  # noqa: E402
from fedkt.federation.flower import (  # noqa: E402
    DirStateStore, FlowerFederation, InProcessFlower, make_client_app)


def _double(ctx, msg):
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    ctx.state["last"] = msg.tensors.get("x", torch.zeros(0)).float()
    return Message(tensors={k: v * 2 for k, v in msg.tensors.items()}, texts=msg.texts + [ctx.cid],
                   meta={"calls": ctx.state["calls"], "echo": msg.meta})


def _flaky(ctx, msg):
    if ctx.cid == "bad":
        raise RuntimeError("disk full")
    return Message(meta={"ok": True})


def _slow(ctx, msg):
    time.sleep(msg.meta["sleep"])
    return Message(meta={"slept": msg.meta["sleep"]})


HANDLERS = {"double": _double, "f": _flaky, "slow": _slow}


def _payload():
    g = torch.Generator().manual_seed(1)
    return Message(tensors={"x": torch.randn(3, 4, generator=g), "h": torch.randn(5, generator=g).bfloat16(),
                            "i": torch.tensor([-(2**63), 7, 2**63 - 1])},
                   texts=["héllo", "日本語 🚀"], meta={"round": 2, "nested": {"a": [1, {"b": None}], "f": 0.1}})


@pytest.fixture(scope="module")
def engine():
    """One in-process Flower engine for the module (stopping one takes ~1 s: Flower's queue timeouts)."""
    e = InProcessFlower(make_client_app(HANDLERS), ["c0", "c1", "e0", "e1", "good", "bad"])
    yield e
    e.close()


@pytest.fixture
def fed(engine):
    return FlowerFederation(engine.grid, ["c0", "c1"])


def test_round_trip_bit_exact_and_state_survives():
    msg = _payload()
    with FlowerFederation.in_process(["c0", "c1"], HANDLERS) as fed:
        for rnd in range(3):
            out = fed.broadcast("double", msg, round=rnd)
    assert list(out) == ["c0", "c1"]
    for cid, reply in out.items():
        for k, v in msg.tensors.items():
            assert reply.tensors[k].dtype == v.dtype and torch.equal(reply.tensors[k], v * 2)
        assert reply.texts == ["héllo", "日本語 🚀", cid]
        assert reply.meta == {"calls": 3, "echo": msg.meta}  # state kept across calls by Flower Context.state


def test_same_replies_and_bytes_as_local_federation(engine):
    fed = FlowerFederation(engine.grid, ["e0", "e1"])
    local = LocalFederation([ClientContext("e0"), ClientContext("e1")], HANDLERS)
    payloads = {"e0": _payload(), "e1": Message(tensors={"x": torch.ones(7)}, meta={"k": "v"})}
    for rnd in (1, 2):
        a, b = local.call("double", payloads, round=rnd), fed.call("double", payloads, round=rnd)
        for cid in payloads:
            assert codec.encode(a[cid]) == codec.encode(b[cid])
    assert fed.ledger.to_list() == local.ledger.to_list()
    assert fed.ledger.total("down") == 2 * (len(codec.encode(payloads["e0"])) + len(codec.encode(payloads["e1"])))
    fed.broadcast("double", Message(), metered=False)
    assert len(fed.ledger.entries) == 8
    assert fed.take_timing("double") > 0 and fed.take_timing("double") == 0.0


def test_failure_policies_match_local(engine):
    stop = FlowerFederation(engine.grid, ["good", "bad"])
    with pytest.raises(ClientFailure, match="client bad failed in 'f': RuntimeError: disk full"):
        stop.broadcast("f", Message())
    f = FlowerFederation(engine.grid, ["good", "bad"], on_failure="skip")
    out = f.broadcast("f", Message(), round=4)
    assert list(out) == ["good"] and out["good"].meta == {"ok": True}
    assert f.failures == [{"round": 4, "method": "f", "client": "bad", "error": "RuntimeError('disk full')"}]
    assert [e.client for e in f.ledger.entries] == ["good", "good"]
    with pytest.raises(RuntimeError, match="every client failed in 'f' \\(round 0\\)"):
        f.call("f", {"bad": Message()})
    # a reply that misses the deadline is a failure of that client (a dropout), not a hang
    late = FlowerFederation(engine.grid, ["good", "bad"], on_failure="skip", timeout=0.3)
    out = late.call("slow", {"good": Message(meta={"sleep": 0.0}), "bad": Message(meta={"sleep": 1.0})}, round=5)
    assert out["good"].meta == {"slept": 0.0} and "bad" not in out
    assert late.failures == [{"round": 5, "method": "slow", "client": "bad",
                              "error": "TimeoutError('no reply within 0.3 s')"}]


def test_unknown_handler_client_and_missing_node(fed):
    with pytest.raises(KeyError, match="no client handler 'g'; registered: double, f, slow"):
        fed.broadcast("g", Message())
    with pytest.raises(KeyError, match="unknown client 'zz'"):
        fed.call("double", {"zz": Message()})
    with pytest.raises(KeyError, match=r"clients .*c9.* are not served.*connected: .*c0"):
        FlowerFederation(fed.grid, clients=["c0", "c9"], wait_for_nodes=0.5)
    with pytest.raises(ValueError, match="cannot be a Flower message action"):
        make_client_app({"bad-name": _double})


def test_dir_state_store_and_context_factory(tmp_path):
    shared = {"scale": 3}

    def factory(cid, flower_ctx):
        return ClientContext(cid, shared=shared, workdir=tmp_path / cid)

    def scaled(ctx, msg):
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return Message(tensors={"y": msg.tensors["x"] * ctx.shared["scale"]}, meta={"n": ctx.state["n"]})

    app = make_client_app({"scaled": scaled}, factory, DirStateStore(tmp_path / "state"))
    engine = InProcessFlower(app, ["a", "b"])
    with FlowerFederation(engine.grid, ["a", "b"], on_close=engine.close) as f:
        f.call("scaled", {"a": Message(tensors={"x": torch.ones(2)})})
        out = f.broadcast("scaled", Message(tensors={"x": torch.arange(3)}))
    assert torch.equal(out["b"].tensors["y"], torch.tensor([0, 3, 6])) and out["a"].meta == {"n": 2}
    assert out["b"].meta == {"n": 1}
    assert len(list((tmp_path / "state").glob("*/a.pt"))) == 1


def test_in_process_latency(fed):
    msg = Message(tensors={"x": torch.zeros(10)})
    fed.broadcast("double", msg)
    t0 = time.perf_counter()
    for _ in range(5):
        fed.broadcast("double", msg)
    per_call = (time.perf_counter() - t0) / 5
    print(f"in-process Flower round trip (2 clients): {per_call * 1000:.0f} ms per call")
    assert per_call < 1.0  # Flower's message pump polls every 0.1 s
