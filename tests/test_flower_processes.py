"""A real Flower deployment: SuperLink + 2 SuperNodes as subprocesses on 127.0.0.1 (insecure), a ServerApp
doing two round trips of a toy handler through FlowerFederation, replies checked bit for bit.

Slow (~1-1.5 min on 2 busy cores): every Flower message starts a fresh ``flwr-clientapp`` process that
imports torch, and SuperNodes poll the SuperLink every 3 s when idle. Also (fast): stopping a deployment
ends the processes flwr starts in sessions of their own (the SuperLink's SuperExec and its ServerApps)."""

import json
import os
import textwrap
import time

import pytest
import torch

pytest.importorskip("flwr")

from fedkt.federation import Message, codec  # noqa: E402
from fedkt.federation.flower_deploy import LocalFlowerDeployment  # noqa: E402

APP = '''
import json
import time

import torch

from fedkt.federation import Message, codec
from fedkt.federation.flower import FlowerFederation
from fedkt.federation.flower_client_app import make_client_app
from flwr.serverapp import ServerApp


def double(ctx, msg):
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    return Message(tensors={k: v * 2 for k, v in msg.tensors.items()}, texts=msg.texts + [ctx.cid],
                   meta={"calls": ctx.state["calls"], "echo": msg.meta})


client_app = make_client_app({"double": double})
server_app = ServerApp()


@server_app.main()
def main(grid, context):
    cfg = context.run_config
    fed = FlowerFederation(grid, clients=["c0", "c1"], timeout=float(cfg["timeout"]))
    msg = codec.decode(open(cfg["payload"], "rb").read())
    latencies, replies = [], []
    for rnd in range(2):
        t0 = time.perf_counter()
        out = fed.broadcast("double", msg, round=rnd)
        latencies.append(time.perf_counter() - t0)
        replies.append(out)
        msg = Message(tensors=out["c0"].tensors, texts=msg.texts, meta=msg.meta)
    res = Message(tensors={f"{r}.{c}.{k}": v for r, out in enumerate(replies) for c, m in out.items()
                           for k, v in m.tensors.items()},
                  texts=[json.dumps({c: m.texts for c, m in out.items()}) for out in replies],
                  meta={"latency_s": latencies, "meta": [{c: m.meta for c, m in out.items()} for out in replies],
                        "ledger": fed.ledger.to_list()})
    open(cfg["out"], "wb").write(codec.encode(res))
'''

PYPROJECT = '''
[project]
name = "fedkt-toy"
version = "0.1.0"
description = "fedkt toy Flower app (test)"
dependencies = []

[tool.flwr.app]
publisher = "fedkt"

[tool.flwr.app.components]
serverapp = "fedkt_toy_app:server_app"
clientapp = "fedkt_toy_app:client_app"

[tool.flwr.app.config]
out = ""
payload = ""
timeout = 120.0
'''


@pytest.mark.slow
def test_superlink_two_supernodes_two_round_trips(tmp_path):
    t_start = time.perf_counter()
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (app / "fedkt_toy_app.py").write_text(APP)
    g = torch.Generator().manual_seed(0)
    payload = Message(tensors={"x": torch.randn(3, 4, generator=g), "h": torch.randn(6, generator=g).bfloat16(),
                               "i": torch.tensor([-(2**63), 5, 2**63 - 1])},
                      texts=["héllo", "日本語 🚀"], meta={"nested": {"a": [1, {"b": None}]}, "f": 0.1})
    (tmp_path / "payload.bin").write_bytes(codec.encode(payload))
    out = tmp_path / "out.bin"
    with LocalFlowerDeployment(tmp_path / "deploy", ["c0", "c1"]) as dep:
        run_id = dep.run_app(app, {"out": str(out), "payload": str(tmp_path / "payload.bin")})
        status = dep.wait_run(run_id, timeout=240)
        logs = (tmp_path / "deploy" / "superlink.log").read_text()
        assert status == "finished:completed", logs[-3000:]
        pids = [p.pid for p in dep.procs.values()]
    for pid in pids:  # every process we started is gone (stopped by its PID / process group)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    res = codec.decode(out.read_bytes())
    for rnd in (0, 1):
        for cid in ("c0", "c1"):
            for k, v in payload.tensors.items():
                got = res.tensors[f"{rnd}.{cid}.{k}"]
                assert got.dtype == v.dtype and torch.equal(got, v * 2 ** (rnd + 1)), (rnd, cid, k)
        texts = json.loads(res.texts[rnd])
        assert texts == {c: ["héllo", "日本語 🚀", c] for c in ("c0", "c1")}
        # state survived between the two calls in the node's Flower Context
        assert res.meta["meta"][rnd] == {c: {"calls": rnd + 1, "echo": payload.meta} for c in ("c0", "c1")}
    down0 = len(codec.encode(payload))
    assert [e["bytes"] for e in res.meta["ledger"] if e["round"] == 0 and e["direction"] == "down"] == [down0] * 2
    print(f"deployment round trips: {['%.1f s' % s for s in res.meta['latency_s']]}; "
          f"test wall time {time.perf_counter() - t_start:.1f} s")


def test_stop_also_ends_processes_started_in_a_session_of_their_own(tmp_path):
    """flwr's SuperLink starts its SuperExec with start_new_session (and the ServerApps in the SuperExec's
    group): stop() must end them too, not only the process groups it started itself."""
    import subprocess
    import sys

    pidfile = tmp_path / "app.pid"
    # a stand-in SuperLink: starts a detached "SuperExec" that starts a "ServerApp" in its group
    (tmp_path / "superexec.py").write_text(
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)\n")
    code = (f"import subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, {str(tmp_path / 'superexec.py')!r}], start_new_session=True)\n"
            "time.sleep(600)\n")
    dep = LocalFlowerDeployment(tmp_path / "deploy", [])
    dep.workdir.mkdir(parents=True)
    dep.procs["superlink"] = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 60
    while not (pidfile.is_file() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    app_pid = int(pidfile.read_text())
    superexec_pgid = os.getpgid(app_pid)
    try:
        assert superexec_pgid != dep.procs["superlink"].pid  # in a session of its own
        dep.stop(grace=2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(app_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        with pytest.raises(ProcessLookupError):
            os.kill(app_pid, 0)
        with pytest.raises(ProcessLookupError):
            os.killpg(superexec_pgid, 0)
    finally:  # whatever happened, leave nothing behind
        for pgid in (superexec_pgid, dep.procs["superlink"].pid):
            try:
                os.killpg(pgid, 9)
            except ProcessLookupError:
                pass
