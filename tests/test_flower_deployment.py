"""Real Flower deployment on 127.0.0.1 with TLS + SuperNode authentication: a SuperLink, 3 registered
SuperNodes and one unregistered (refused). One ServerApp run does a text round trip and 2 rounds of SecAgg+
aggregation (checked against the plain weighted mean to SecAgg+'s quantisation bound); in round 2 one
SuperNode is SIGKILLed mid-round and the round completes with the other two (SecAgg+ reconstructs its
masks). Every process is stopped by PID / process group whatever happens.

Slow (~2-4 min on 2 busy cores): each Flower message starts a fresh ``flwr-clientapp`` process (imports
torch), SuperNodes poll every 3 s, and the killed node costs the federation's reply timeout (90 s: generous, so that a loaded
machine makes it slow rather than fail)."""

import json
import os
import textwrap
import threading
import time

import pytest
import torch

pytest.importorskip("flwr")

from fedkt.federation import Message, codec, weighted_mean  # noqa: E402
from fedkt.federation.flower_deploy import LocalFlowerDeployment  # noqa: E402
from fedkt.federation.flower_secagg import SecAggSettings, error_bound  # noqa: E402

APP = '''
import json
import os
import time
from pathlib import Path

import torch

from fedkt.federation import Message, codec
from fedkt.federation.flower import FlowerFederation
from fedkt.federation.flower_client_app import make_client_app
from flwr.serverapp import ServerApp

MARK = Path(os.environ["FEDKT_TEST_MARK_DIR"])


def update(ctx, msg):
    i = int(ctx.cid[1:])
    rnd = msg.meta["round"]
    if ctx.cid == "c2" and rnd == 2:  # tell the test we are mid-round, then wait to be killed
        (MARK / "c2-round2").write_text("1")
        time.sleep(600)
    g = torch.Generator().manual_seed(100 * rnd + i)
    return Message(tensors={"lora_A": msg.tensors["x"] + torch.randn(4, 6, generator=g) * 0.3,
                            "lora_B": torch.randn(6, 2, generator=g) * 0.1},
                   meta={"num_examples": 10 * (i + 1), "loss": float(i)})


def echo(ctx, msg):
    return Message(texts=[t + " <- " + ctx.cid for t in msg.texts], meta={"cid": ctx.cid})


client_app = make_client_app({"fit": update, "echo": echo})
server_app = ServerApp()


@server_app.main()
def main(grid, context):
    cfg = context.run_config
    fed = FlowerFederation(grid, clients=["c0", "c1", "c2"], on_failure="skip", min_clients=2,
                           timeout=float(cfg["timeout"]), wait_for_nodes=120.0)
    res, lat = {"nodes": len(list(grid.get_node_ids()))}, {}
    t0 = time.perf_counter()
    texts = fed.broadcast("echo", Message(texts=["héllo 日本"]), round=0)
    lat["text"] = time.perf_counter() - t0
    res["texts"] = {c: m.texts for c, m in texts.items()}
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 24
    out = {}
    for rnd in (1, 2):
        t0 = time.perf_counter()
        agg = fed.aggregate("fit", {c: Message(tensors={"x": x}, meta={"round": rnd}) for c in fed.clients}, round=rnd)
        lat[f"secagg_round{rnd}"] = time.perf_counter() - t0
        res[f"clients{rnd}"], res[f"weights{rnd}"] = agg.clients, agg.weights
        out.update({f"{rnd}.{k}": v for k, v in agg.tensors.items()})
    res.update(latency_s=lat, failures=fed.failures, ledger=fed.ledger.summary())
    Path(cfg["out"]).write_bytes(codec.encode(Message(tensors=out, meta=res)))
'''

PYPROJECT = '''
[project]
name = "fedkt-secagg-test"
version = "0.1.0"
description = "fedkt deployment test app"
dependencies = []

[tool.flwr.app]
publisher = "fedkt"

[tool.flwr.app.components]
serverapp = "fedkt_secagg_app:server_app"
clientapp = "fedkt_secagg_app:client_app"

[tool.flwr.app.config]
out = ""
timeout = 60.0
'''


def _expected(rnd, clients):
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 24
    states, weights = [], []
    for c in clients:
        i = int(c[1:])
        g = torch.Generator().manual_seed(100 * rnd + i)
        states.append({"lora_A": x + torch.randn(4, 6, generator=g) * 0.3, "lora_B": torch.randn(6, 2, generator=g) * 0.1})
        weights.append(10 * (i + 1))
    return weighted_mean(states, weights), weights


@pytest.mark.slow
def test_tls_node_auth_secagg_text_and_a_node_killed_mid_round(tmp_path, monkeypatch):
    t_start = time.perf_counter()
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (app / "fedkt_secagg_app.py").write_text(APP)
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("FEDKT_TEST_MARK_DIR", str(marks))
    out = tmp_path / "out.bin"
    dep = LocalFlowerDeployment(tmp_path / "deploy", ["c0", "c1", "c2"], tls=True, node_auth=True)
    pids = []
    try:
        dep.start()
        # an organisation whose key the server operator never registered
        from fedkt.federation.flower_credentials import make_node_key

        intruder_key, _ = make_node_key(tmp_path / "deploy" / "keys" / "intruder")
        dep.start_node("intruder", auth_key=intruder_key)

        def kill_c2_mid_round():
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not (marks / "c2-round2").exists():
                time.sleep(0.2)
            if (marks / "c2-round2").exists():
                dep.kill_node("c2")

        killer = threading.Thread(target=kill_c2_mid_round, daemon=True)
        killer.start()
        run_id = dep.run_app(app, {"out": str(out), "timeout": 90.0})
        status = dep.wait_run(run_id, timeout=600)
        pids = [p.pid for p in dep.procs.values()]
        logs = {n: (tmp_path / "deploy" / f"{n}.log").read_text(errors="replace") for n in ("superlink", "supernode-intruder")}
        if status != "finished:completed":
            pytest.fail(f"run {status}: {dep.run_log(run_id)[-5000:]}")
    finally:
        dep.stop()
    for pid in pids:  # every process we started is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    res = codec.decode(out.read_bytes())
    meta = res.meta
    # the unregistered node was refused: 3 nodes known to the SuperLink, and its log says why
    assert meta["nodes"] == 3
    assert "intruder" not in json.dumps(meta["texts"])
    assert "No SuperNode found with the given public key" in logs["superlink"]
    assert "SuperNode ID" not in logs["supernode-intruder"] and "connection attempt failed" in logs["supernode-intruder"].lower()
    assert meta["texts"] == {c: [f"héllo 日本 <- {c}"] for c in ("c0", "c1", "c2")}
    s = SecAggSettings()
    for rnd, clients in ((1, ["c0", "c1", "c2"]), (2, ["c0", "c1"])):
        assert meta[f"clients{rnd}"] == clients
        expect, weights = _expected(rnd, clients)
        bound = error_bound(weights, s)
        for k, v in expect.items():
            err = (res.tensors[f"{rnd}.{k}"] - v).abs().max().item()
            assert err <= bound, (rnd, k, err, bound)
        if rnd == 2:  # a mean of the two survivors, not of all three
            wrong, _ = _expected(2, ["c0", "c1", "c2"])
            assert (res.tensors["2.lora_A"] - wrong["lora_A"]).abs().max().item() > 100 * bound
    assert [(f["round"], f["client"]) for f in meta["failures"]] == [(2, "c2")]
    print(f"\ndeployment (TLS + node auth) latencies: {meta['latency_s']}; bytes {meta['ledger']['up_bytes']} up, "
          f"{meta['ledger']['down_bytes']} down; test wall time {time.perf_counter() - t_start:.1f} s")
