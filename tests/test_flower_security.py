"""A deployment as an attacker meets it: real SuperLink + SuperNodes on 127.0.0.1, TLS, node
authentication, the node allow-list, trusted-app SuperNodes (slow, one deployment for every check).

* the Control API (``flwr ls``, ``flwr run``, ``flwr supernode register``) sent to the client-facing Fleet
  address is refused (403, no run created, no key registered), while the operator address serves it;
* a node with an unregistered key is refused by the SuperLink; a node whose key is registered for client
  c2 but which claims to be c0 is refused by the ServerApp (allow-list) and named in its log;
* a node that stops answering (its ClientApp hangs; the node itself stays connected and heartbeats, so
  only fedkt's deadline can end the wait) is dropped at the round deadline (45 s, the per-call timeout
  being 600 s) under ``skip``, and the round completes with the other client;
* a run whose app differs from the nodes' trusted app (one added line in the client module) is refused by
  every SuperNode: error replies naming the file, and none of its code ran on a node.
"""

import json
import os
import textwrap
import time

import pytest

pytest.importorskip("flwr")

from fedkt.federation import flower_cli, flower_credentials  # noqa: E402
from fedkt.federation.flower_deploy import CONNECTION, LocalFlowerDeployment  # noqa: E402

APP = '''
import json
import os
import time
from pathlib import Path

from fedkt.federation import Message
from fedkt.federation.flower import FlowerFederation
from fedkt.federation.flower_client_app import make_client_app
from flwr.app import Message as FlMessage, RecordDict
from flwr.serverapp import ServerApp

MARK = Path(os.environ["FEDKT_TEST_MARK_DIR"])


def double(ctx, msg):
    t0 = time.monotonic()
    while (MARK / f"hang-{ctx.cid}").exists() and time.monotonic() < t0 + 600:  # stops answering (alive)
        time.sleep(0.5)
    return Message(texts=[t + " <- " + ctx.cid for t in msg.texts], meta={"cid": ctx.cid})


client_app = make_client_app({"double": double})
server_app = ServerApp()


def probe(grid, out):
    """Send the identify message to every node and record what each one answers."""
    ids = sorted(grid.get_node_ids())
    msgs = [FlMessage(RecordDict(), dst_node_id=n, message_type="query._fedkt_identify") for n in ids]
    replies = grid.send_and_receive(msgs, timeout=180)
    Path(out).write_text(json.dumps({str(r.metadata.src_node_id): r.error.reason if r.has_error() else "ok"
                                     for r in replies}))


@server_app.main()
def main(grid, context):
    cfg = context.run_config
    if cfg["mode"] == "probe":
        return probe(grid, cfg["out"])
    fed = FlowerFederation(grid, clients=["c0", "c1"], on_failure="skip", min_clients=1, timeout=600.0,
                           round_deadline=float(cfg["deadline"]), wait_for_nodes=120.0,
                           allowed_nodes=json.loads(cfg["nodes"]))
    t0 = time.perf_counter()
    out = fed.broadcast("double", Message(texts=["hi"]), round=1)
    res = {"seconds": time.perf_counter() - t0, "texts": {c: m.texts for c, m in out.items()},
           "failures": [[f["round"], f["client"], f["error"]] for f in fed.failures],
           "clients": fed.clients}
    Path(cfg["out"]).write_text(json.dumps(res))
'''

PYPROJECT = '''
[project]
name = "fedkt-security-test"
version = "0.1.0"
description = "fedkt deployment security test app"
dependencies = []

[tool.flwr.app]
publisher = "fedkt"

[tool.flwr.app.components]
serverapp = "fedkt_sec_app:server_app"
clientapp = "fedkt_sec_app:client_app"

[tool.flwr.app.config]
out = ""
mode = "run"
deadline = 45.0
nodes = "{}"
'''


def _app(directory, extra=""):
    directory.mkdir()
    (directory / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (directory / "fedkt_sec_app.py").write_text(APP + extra)
    return directory


@pytest.mark.slow
def test_control_api_refused_on_fleet_address_allow_list_hung_node_and_untrusted_app(tmp_path, monkeypatch):
    t_start = time.perf_counter()
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("FEDKT_TEST_MARK_DIR", str(marks))
    trusted = _app(tmp_path / "trusted")
    submitted = _app(tmp_path / "submitted")  # the server operator's copy of the same app
    evil_mark = marks / "evil-code-ran"
    modified = _app(tmp_path / "modified", "\nimport sys\nif 'serverapp' not in ' '.join(sys.argv):  # not the "
                    f"server's own process\n    Path({str(evil_mark)!r}).write_text(' '.join(sys.argv))\n")
    dep = LocalFlowerDeployment(tmp_path / "deploy", ["c0", "c1"], tls=True, node_auth=True, trusted_app=trusted)
    timings = {}
    try:
        dep.start()
        timings["start"] = time.perf_counter() - t_start
        # (1) the Control API on the client-facing address: refused; on the operator address: served
        fleet_home = tmp_path / "client-home"
        flower_cli.write_connection(fleet_home, dep.address, dep.certs / "ca.pem", name=CONNECTION)
        ls_fleet = flower_cli.flwr(["ls", CONNECTION, "--format", "json"], fleet_home)
        run_fleet = flower_cli.flwr(["run", str(submitted), CONNECTION, "--format", "json"], fleet_home)
        ls_operator = dep.flwr("ls", CONNECTION, "--format", "json")
        _, rogue_pub = flower_credentials.make_node_key(tmp_path / "rogue")  # a client registering its own key
        reg_fleet = flower_cli.flwr(["supernode", "register", str(rogue_pub), CONNECTION, "--format", "json"],
                                    fleet_home)
        # (2) an unregistered key, and a registered key (c2's) claiming to be c0
        intruder_key, _ = flower_credentials.make_node_key(tmp_path / "deploy" / "keys" / "intruder")
        dep.start_node("c1", auth_key=intruder_key, name="supernode-intruder")
        impostor_key, impostor_pub = flower_credentials.make_node_key(tmp_path / "deploy" / "keys" / "c2")
        impostor_id = flower_cli.register_node(impostor_pub, dep.home, CONNECTION, dep.bin_dir, cid="c2")
        dep.start_node("c0", auth_key=impostor_key, name="supernode-impostor")
        nodes = dep.allowed_nodes()
        deadline = time.monotonic() + 120  # the impostor must be online when the ServerApp looks for nodes
        while f"Activated node_id={impostor_id}" not in (tmp_path / "deploy" / "superlink.log").read_text():
            assert time.monotonic() < deadline, "the impostor node did not connect"
            time.sleep(0.2)
        # (3) the hung node
        t0 = time.perf_counter()
        out = tmp_path / "run.json"
        (marks / "hang-c1").write_text("1")
        run_id = dep.run_app(submitted, {"out": str(out), "deadline": 45.0, "nodes": json.dumps(nodes)})
        status = dep.wait_run(run_id, timeout=400)
        run_log = dep.run_log(run_id)
        timings["hung-node run"] = time.perf_counter() - t0
        (marks / "hang-c1").unlink()  # c1's ClientApp returns (too late for run 1): c1 can serve run 2
        assert status == "finished:completed", run_log[-4000:]
        # (4) an app that differs from the trusted one
        t0 = time.perf_counter()
        probe = tmp_path / "probe.json"
        run2 = dep.run_app(modified, {"out": str(probe), "mode": "probe"})
        status2 = dep.wait_run(run2, timeout=400)
        timings["modified-app run"] = time.perf_counter() - t0
        assert status2 == "finished:completed", dep.run_log(run2)[-4000:]
        logs = {n: (tmp_path / "deploy" / f"{n}.log").read_text(errors="replace")
                for n in ("superlink", "supernode-intruder", "supernode-c0", "supernode-c1")}
    finally:
        dep.stop()

    # (1)
    assert json.loads(ls_fleet.stdout)["success"] is False
    assert "fedkt: only the Fleet API is served on this address" in ls_fleet.stdout
    assert json.loads(run_fleet.stdout)["success"] is False
    assert "fedkt: only the Fleet API is served on this address" in run_fleet.stdout
    assert json.loads(ls_operator.stdout) == {"success": True, "runs": []}
    assert logs["superlink"].count('"POST /v1/control/list-runs HTTP/1.1" 403') == 1
    assert logs["superlink"].count('"POST /v1/control/start-run HTTP/1.1" 403') == 1
    assert json.loads(reg_fleet.stdout)["success"] is False
    assert logs["superlink"].count('"POST /v1/control/register-node HTTP/1.1" 403') == 1
    assert logs["superlink"].count('"POST /v1/control/register-node HTTP/1.1" 200') == 3  # by S: c0, c1, c2
    assert "refused POST /v1/control/start-run from 127.0.0.1" in logs["superlink"]
    # (2)
    assert "No SuperNode found with the given public key" in logs["superlink"]
    assert set(nodes) == {"c0", "c1", "c2"} and nodes["c2"] == impostor_id
    assert f"refused Flower node {impostor_id}: it claims client 'c0' but its key is registered for client " \
           "'c2'" in " ".join(run_log.split())  # (rich wraps long lines)
    # (3) c1 hung: dropped at the 45 s round deadline (not the 600 s call timeout), the round completed with c0
    res = json.loads(out.read_text())
    assert res["clients"] == ["c0", "c1"]
    assert res["texts"] == {"c0": ["hi <- c0"]}
    assert [f[:2] for f in res["failures"]] == [[1, "c1"]] and "TimeoutError" in res["failures"][0][2]
    assert 44 <= res["seconds"] < 60, res["seconds"]
    assert "no reply within" in res["failures"][0][2]
    # (4) every trusted node refused the modified app; none of its code ran
    answers = json.loads(probe.read_text())
    assert len(answers) == 3  # c0, c1 and the impostor: every node answered, none ran the app
    for c in ("c0", "c1"):
        assert "refused the run's app" in answers[str(nodes[c])], answers
        assert "fedkt_sec_app.py (differs)" in answers[str(nodes[c])]
    assert not evil_mark.exists()
    print(f"\nsecurity deployment: {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}; "
          f"test wall time {time.perf_counter() - t_start:.1f} s")
