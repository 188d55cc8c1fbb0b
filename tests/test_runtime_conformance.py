"""What every runtime must do, whatever its transport: the conformance suite of the Federation interface.

Parametrised over ``runtimes.RUNTIMES``; a new runtime passes it unchanged. Checks: payloads round-trip
bit-exact (every tensor dtype fedkt sends, texts, nested JSON), the byte ledger meters exactly the
serialised payloads per client/direction/round, client state survives between calls, the failure
policies, unknown handler/client errors, timings and resume of the bookkeeping.
"""

import pytest
import torch

from fedkt.federation import AllClientsFailed, ClientFailure, Federation, Message
from fedkt.federation import codec

from runtimes import RUNTIMES

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool]


def echo(ctx, msg):
    return Message(tensors=dict(msg.tensors), texts=list(msg.texts), meta=dict(msg.meta))


def double(ctx, msg):
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    return Message(tensors={k: v * 2 for k, v in msg.tensors.items()}, meta={"calls": ctx.state["calls"]})


def flaky(ctx, msg):
    if ctx.cid == "c1":
        raise RuntimeError("disk full")
    return Message(meta={"ok": ctx.cid})


def broken(ctx, msg):
    raise ValueError("nope")


HANDLERS = {"echo": echo, "double": double, "flaky": flaky, "broken": broken}


@pytest.fixture(params=sorted(RUNTIMES))
def make(request):
    made = []

    def factory(num_clients=2, on_failure="stop"):
        fed = RUNTIMES[request.param](HANDLERS, num_clients, on_failure)
        made.append(fed)
        return fed

    yield factory
    for fed in made:
        fed.close()


def payload():
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for dt in DTYPES:
        x = torch.randn(3, 5, generator=g) * 100
        tensors[str(dt).removeprefix("torch.")] = x.to(dt) if dt != torch.bool else x > 0
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["nan_inf"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    return Message(tensors=tensors, texts=["héllo wörld ✓", "", "line\nbreak", "🙂" * 3],
                   meta={"round": 3, "loss": 0.25, "nested": {"a": [1, 2, {"b": None}], "ok": True}, "s": "x"})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_is_a_federation(make):
    fed = make(3)
    assert isinstance(fed, Federation) and fed.clients == ["c0", "c1", "c2"]


def test_payloads_round_trip_bit_exact(make):
    fed = make()
    msg = payload()
    out = fed.broadcast("echo", msg, round=1)
    assert set(out) == {"c0", "c1"}
    for reply in out.values():
        assert reply.texts == msg.texts and reply.meta == msg.meta
        assert set(reply.tensors) == set(msg.tensors)
        for k, v in msg.tensors.items():
            got = reply.tensors[k]
            assert got.dtype == v.dtype and got.shape == v.shape, k
            assert torch.equal(_bits(got), _bits(v)), k  # bit-exact, NaN payloads and -0.0 included
    empty = fed.call("echo", {"c0": Message()})["c0"]
    assert empty.tensors == {} and empty.texts == [] and empty.meta == {}


def test_ledger_meters_serialised_bytes_per_client_direction_round(make):
    fed = make()
    big, small = Message(tensors={"w": torch.zeros(100)}), Message(tensors={"w": torch.zeros(10)})
    out = fed.call("double", {"c0": big, "c1": small}, round=1)
    assert torch.equal(out["c0"].tensors["w"], torch.zeros(100))
    fed.broadcast("double", small, round=2)
    down_big, down_small = len(codec.encode(big)), len(codec.encode(small))
    up_r2 = len(codec.encode(Message(tensors={"w": torch.zeros(10)}, meta={"calls": 2})))
    pr = fed.ledger.per_round()
    assert [r["round"] for r in pr] == [1, 2]
    assert pr[0]["clients"]["c0"]["down_bytes"] == down_big and pr[0]["clients"]["c1"]["down_bytes"] == down_small
    assert pr[1]["down_bytes"] == 2 * down_small and pr[1]["clients"]["c0"]["up_bytes"] == up_r2
    assert fed.ledger.total("down") == down_big + 3 * down_small
    assert 400 < down_big < 400 + 200  # 100 float32 + a small header
    # client state survived between calls
    assert out["c1"].meta["calls"] == 1 and fed.call("double", {"c1": small})["c1"].meta["calls"] == 3


def test_unmetered_calls_not_counted(make):
    fed = make()
    fed.broadcast("echo", Message(texts=["x"]), metered=False)
    assert fed.ledger.entries == []


def test_stop_policy_raises_naming_the_client(make):
    fed = make()
    with pytest.raises(ClientFailure, match="client c1 failed in 'flaky': RuntimeError: disk full") as e:
        fed.broadcast("flaky", Message())
    assert e.value.client == "c1" and e.value.method == "flaky"


def test_skip_policy_reports_and_continues(make):
    fed = make(3, on_failure="skip")
    out = fed.broadcast("flaky", Message(), round=4)
    assert sorted(out) == ["c0", "c2"] and out["c2"].meta == {"ok": "c2"}
    assert fed.failures == [{"round": 4, "method": "flaky", "client": "c1", "error": "RuntimeError('disk full')"}]
    assert {e.client for e in fed.ledger.entries} == {"c0", "c2"}  # a failed client's exchange is not counted
    with pytest.raises(AllClientsFailed, match="every client failed in 'broken'"):
        fed.broadcast("broken", Message(), round=5)


def test_unknown_handler_and_client(make):
    fed = make()
    with pytest.raises(KeyError, match="no client handler 'nope'; registered: echo"):
        fed.broadcast("nope", Message())
    with pytest.raises(KeyError, match="unknown client 'c9'"):
        fed.call("echo", {"c9": Message()})
    assert fed.ledger.entries == []


def test_timings_are_taken_once(make):
    fed = make()
    fed.broadcast("echo", Message())
    t = fed.take_timing("echo")
    assert t > 0 and fed.take_timing("echo") == 0.0


def test_bookkeeping_state_round_trips_for_resume(make):
    fed = make(on_failure="skip")
    fed.broadcast("flaky", Message(), round=1)
    state = fed.state_dict()
    other = make(on_failure="skip")
    other.load_state_dict(state)
    assert other.ledger.summary() == fed.ledger.summary() and other.failures == fed.failures
    import json

    json.dumps(state)  # a checkpoint stores it as JSON
