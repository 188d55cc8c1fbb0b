"""Flower runtime specifics (the shared behaviour is in tests/test_runtime_conformance.py, which runs over
Flower's in-process engine too): same replies and bytes as LocalFederation, tensor state across calls,
timeouts, node discovery, state stores, and clients built from their ClientSpec on the node."""

import time

import pytest
import torch

pytest.importorskip("flwr")

from fedkt.clients import ClientContext, ClientFactory, ClientSpec, StateStore  # noqa: E402
from fedkt.config import LoraSettings, TrainConfig  # noqa: E402
from fedkt.data.tasks import Example  # noqa: E402
from fedkt.federation import AllClientsFailed, Federation, Message, codec  # noqa: E402
from fedkt.federation.flower import FlowerFederation  # noqa: E402
from fedkt.federation.flower_client_app import make_client_app  # noqa: E402
from fedkt.federation.flower_engine import InProcessFlower  # noqa: E402
from fedkt.federation.flower_spec import spec_from_json, spec_to_json  # noqa: E402
from fedkt.federation.flower_state import DirStateStore  # noqa: E402
from fedkt.federation.local import LocalFederation  # noqa: E402
from fedkt.models import get_adapter_state  # noqa: E402
from fedkt.seeds import derive_seed  # noqa: E402


def _double(ctx, msg):
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    prev = ctx.state.tensors.get("last", {}).get("x")
    ctx.state.tensors["last"] = {"x": msg.tensors.get("x", torch.zeros(0)).float()}
    return Message(tensors={k: v * 2 for k, v in msg.tensors.items()}, texts=msg.texts + [ctx.cid],
                   meta={"calls": ctx.state["calls"], "echo": msg.meta,
                         "prev_sum": None if prev is None else float(prev.sum())})


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


def test_round_trip_bit_exact_and_tensor_state_survives():
    msg = _payload()
    with FlowerFederation.in_process(["c0", "c1"], HANDLERS) as fed:
        outs = [fed.broadcast("double", msg, round=rnd) for rnd in range(3)]
    out = outs[-1]
    assert list(out) == ["c0", "c1"]
    for cid, reply in out.items():
        for k, v in msg.tensors.items():
            assert reply.tensors[k].dtype == v.dtype and torch.equal(reply.tensors[k], v * 2)
        assert reply.texts == ["héllo", "日本語 🚀", cid]
        # JSON values and tensors of ctx.state kept across calls in the node's Flower Context.state
        assert reply.meta == {"calls": 3, "echo": msg.meta, "prev_sum": float(msg.tensors["x"].sum())}
    assert outs[0]["c0"].meta["prev_sum"] is None


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


def test_failures_all_failed_and_timeout(engine):
    f = FlowerFederation(engine.grid, ["good", "bad"], on_failure="skip")
    with pytest.raises(AllClientsFailed, match="every client failed in 'f' \\(round 0\\)"):
        f.call("f", {"bad": Message()})
    # a reply that misses the deadline is a failure of that client (a dropout), not a hang
    late = FlowerFederation(engine.grid, ["good", "bad"], on_failure="skip", timeout=0.3)
    out = late.call("slow", {"good": Message(meta={"sleep": 0.0}), "bad": Message(meta={"sleep": 1.0})}, round=5)
    assert out["good"].meta == {"slept": 0.0} and "bad" not in out
    assert late.failures == [{"round": 5, "method": "slow", "client": "bad",
                              "error": "TimeoutError('no reply within 0.3 s')"}]
    assert [(e.client, e.direction) for e in late.ledger.entries] == [("good", "down"), ("good", "up")]


def test_discovery_gives_clients_and_methods(fed):
    assert isinstance(fed, Federation)
    assert fed.clients == ["c0", "c1"] and fed.methods == ["double", "f", "slow"]
    assert FlowerFederation(fed.grid).clients == ["bad", "c0", "c1", "e0", "e1", "good"]  # every node, sorted
    with pytest.raises(KeyError, match="no client handler 'g'; registered: double, f, slow"):
        fed.broadcast("g", Message())
    with pytest.raises(KeyError, match="unknown client 'zz'"):
        fed.call("double", {"zz": Message()})
    with pytest.raises(KeyError, match=r"clients .*c9.* are not served.*connected: .*c0"):
        FlowerFederation(fed.grid, clients=["c0", "c9"], wait_for_nodes=0.5)
    with pytest.raises(ValueError, match="cannot be a Flower message action"):
        make_client_app({"bad-name": _double})


def _scaled_handlers(scale):
    def scaled(ctx, msg):
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return Message(tensors={"y": msg.tensors["x"] * scale}, meta={"n": ctx.state["n"]})
    return {"scaled": scaled}


def test_dir_state_store_context_factory_and_workdir_resume(tmp_path):
    def factory(cid, flower_ctx):
        return ClientContext(cid, workdir=tmp_path / cid)

    app = make_client_app(_scaled_handlers(3), factory, DirStateStore(tmp_path / "state"))
    engine = InProcessFlower(app, ["a", "b"])
    with FlowerFederation(engine.grid, ["a", "b"], on_close=engine.close) as f:
        f.call("scaled", {"a": Message(tensors={"x": torch.ones(2)})})
        out = f.broadcast("scaled", Message(tensors={"x": torch.arange(3)}))
    assert torch.equal(out["b"].tensors["y"], torch.tensor([0, 3, 6])) and out["a"].meta == {"n": 2}
    assert out["b"].meta == {"n": 1}
    (blob,) = [p.read_bytes() for p in (tmp_path / "state").glob("*/a.fkt")]
    assert StateStore.from_bytes(blob)["n"] == 2
    # ctx.save_state() wrote the workdir too, as LocalFederation does
    assert StateStore.from_bytes((tmp_path / "a" / "state.fkt").read_bytes())["n"] == 2
    # a new run (nothing in the node state yet) resumes from the workdir's state
    with FlowerFederation.in_process(["a"], _scaled_handlers(1), factory) as g:
        assert g.call("scaled", {"a": Message(tensors={"x": torch.ones(1)})})["a"].meta == {"n": 3}


def _probe(ctx, msg):
    model = ctx.slm.model
    with torch.no_grad():
        logits = model(input_ids=msg.tensors["ids"]).logits
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    return Message(tensors={"logits": logits, **{f"a.{k}": v for k, v in get_adapter_state(model).items()}},
                   texts=[e.question for e in ctx.data],
                   meta={"lr": ctx.train.lr, "r": ctx.slm.model.peft_config["default"].r,
                         "seed_for": ctx.seed_for("fit", 1), "model_id": id(ctx.slm),
                         "calls": ctx.state["calls"]})


def _spec(model_dir, cid="a"):
    data = [Example("custom", f"q{i}", f"question {i}?", ("x", "y"), i % 2, "x") for i in range(3)]
    return ClientSpec(cid=cid, model=str(model_dir), lora=LoraSettings(r=4, alpha=8), train=TrainConfig(lr=1e-3),
                      seed=7, examples=data, eval_sets={"t": data[:1]})


def test_client_spec_json_round_trip_and_errors(tmp_path):
    spec = _spec(tmp_path, "a")
    spec.workdir, spec.secret_seed = tmp_path / "w", 11
    assert spec_from_json(spec_to_json(spec)) == spec
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        spec_from_json('{"cid": "a", "model": "m", "bogus": 1}')
    with pytest.raises(ValueError, match=r"lora\.r must be > 0, got 0"):
        spec_from_json('{"cid": "a", "model": "m", "lora": {"r": 0}}')
    with pytest.raises(ValueError, match="not valid JSON"):
        spec_from_json("{nope")


def test_clients_built_from_their_spec_on_the_node(model_dirs):
    specs = [_spec(model_dirs["slm"], "a"), _spec(model_dirs["slm"], "b")]
    ids = torch.tensor([[1, 5, 9, 4]])
    with FlowerFederation.in_process(specs, {"probe": _probe}) as fed:
        first = fed.broadcast("probe", Message(tensors={"ids": ids}))
        second = fed.broadcast("probe", Message(tensors={"ids": ids}))
    local = ClientFactory(share_base=False).build(specs[0])
    want = _probe(local, Message(tensors={"ids": ids}))
    for cid in ("a", "b"):
        got = first[cid]
        assert got.texts == ["question 0?", "question 1?", "question 2?"]
        assert got.meta["lr"] == 1e-3 and got.meta["r"] == 4
        assert got.meta["seed_for"] == derive_seed(7, "fit", 1, cid)
        assert set(got.tensors) == set(want.tensors)
        for k, v in want.tensors.items():  # same base weights and same fresh adapter as built in-process
            assert torch.equal(got.tensors[k], v), k
        # built once per process (share_base=False: one model per client), state persisted by the node
        assert second[cid].meta["model_id"] == got.meta["model_id"] and second[cid].meta["calls"] == 2
    assert first["a"].meta["model_id"] != first["b"].meta["model_id"]


def test_in_process_latency(fed):
    msg = Message(tensors={"x": torch.zeros(10)})
    fed.broadcast("double", msg)
    t0 = time.perf_counter()
    for _ in range(5):
        fed.broadcast("double", msg)
    per_call = (time.perf_counter() - t0) / 5
    print(f"in-process Flower round trip (2 clients): {per_call * 1000:.0f} ms per call")
    assert per_call < 1.0  # Flower's message pump polls every 0.1 s
