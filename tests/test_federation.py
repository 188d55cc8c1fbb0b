import pytest
import torch

from fedkt.algorithms.fedavg import aggregate
from fedkt.federation import ClientContext, ClientFailure, LocalFederation, Message
from fedkt.federation import codec


def test_fedavg_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = aggregate([a, b], [1, 3])  # (1*a + 3*b) / 4
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(out["b"], torch.tensor([[3.0]]))
    assert out["w"].dtype == torch.float32
    eq = aggregate([a, b], [5, 5])
    assert torch.allclose(eq["w"], torch.tensor([2.0, 4.0]))


def test_fedavg_errors():
    with pytest.raises(ValueError, match="different keys"):
        aggregate([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="nothing to aggregate"):
        aggregate([], [])
    with pytest.raises(ValueError, match="sum to > 0"):
        aggregate([{"a": torch.zeros(1)}], [0])


def test_codec_round_trip_bit_exact():
    msg = Message(tensors={"x": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16),
                           "i": torch.arange(6).reshape(2, 3)},
                  texts=["héllo", "world"], meta={"round": 3, "loss": 0.25, "nested": {"a": [1, 2]}})
    back = codec.decode(codec.encode(msg))
    assert back.texts == msg.texts and back.meta == msg.meta
    for k, v in msg.tensors.items():
        assert back.tensors[k].dtype == v.dtype and torch.equal(back.tensors[k], v)
    empty = codec.decode(codec.encode(Message()))
    assert empty.tensors == {} and empty.texts == [] and empty.meta == {}


def _double(ctx, msg):
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    return Message(tensors={k: v * 2 for k, v in msg.tensors.items()}, meta={"calls": ctx.state["calls"]})


def test_ledger_equals_serialised_size_per_client_direction_round():
    fed = LocalFederation([ClientContext("c0"), ClientContext("c1")], {"double": _double})
    big = Message(tensors={"w": torch.zeros(100)})
    small = Message(tensors={"w": torch.zeros(10)})
    out = fed.call("double", {"c0": big, "c1": small}, round=1)
    assert torch.equal(out["c0"].tensors["w"], torch.zeros(100))
    fed.broadcast("double", small, round=2)
    down_big, down_small = len(codec.encode(big)), len(codec.encode(small))
    up_small_r2 = len(codec.encode(Message(tensors={"w": torch.zeros(10)}, meta={"calls": 2})))
    pr = fed.ledger.per_round()
    assert pr[0]["clients"]["c0"]["down_bytes"] == down_big
    assert pr[0]["clients"]["c1"]["down_bytes"] == down_small
    assert pr[1]["down_bytes"] == 2 * down_small
    assert pr[1]["clients"]["c0"]["up_bytes"] == up_small_r2
    assert fed.ledger.total("down") == down_big + 3 * down_small
    # float32 payload of 100 elements: 400 bytes of data plus a small header
    assert 400 < down_big < 400 + 200
    # client state survives between calls
    assert out["c1"].meta["calls"] == 1 and fed.contexts["c1"].state["calls"] == 2


def test_unmetered_calls_not_counted():
    fed = LocalFederation([ClientContext("c0")], {"double": _double})
    fed.broadcast("double", Message(), metered=False)
    assert fed.ledger.entries == []


def _flaky(ctx, msg):
    if ctx.cid == "bad":
        raise RuntimeError("disk full")
    return Message(meta={"ok": True})


def test_failure_policies():
    ctxs = [ClientContext("good"), ClientContext("bad")]
    with pytest.raises(ClientFailure, match="client bad failed in 'f': RuntimeError: disk full"):
        LocalFederation(ctxs, {"f": _flaky}).broadcast("f", Message())
    fed = LocalFederation(ctxs, {"f": _flaky}, on_failure="skip")
    out = fed.broadcast("f", Message(), round=4)
    assert list(out) == ["good"]
    assert fed.failures == [{"round": 4, "method": "f", "client": "bad", "error": "RuntimeError('disk full')"}]
    with pytest.raises(KeyError, match="no client handler 'g'"):
        fed.broadcast("g", Message())
