"""Secure defaults of ``fedkt flower ...`` and the helpers behind them (fast: no Flower process runs).

Each command is invoked through the real CLI with ``exec_flower`` (the ``os.execve`` into Flower)
replaced by a recorder, so the argv and environment it *would* run are checked exactly."""

import asyncio
import json
import os
import stat

import pytest

pytest.importorskip("flwr")

from typer.testing import CliRunner  # noqa: E402

from fedkt.cli import app  # noqa: E402
from fedkt.config import ConfigError, FederationConfig  # noqa: E402
from fedkt.federation import flower_cli, flower_commands  # noqa: E402
from fedkt.federation.flower_credentials import AllowList, CredentialError, make_certs, make_node_key  # noqa: E402
from fedkt.federation.flower_link import FleetOnly  # noqa: E402
from fedkt.federation.flower_node_auth import capped_timeout, known_nodes, may_serve  # noqa: E402

runner = CliRunner()


@pytest.fixture
def execs(monkeypatch):
    calls = []
    monkeypatch.setattr(flower_cli, "exec_flower", lambda argv, home=None, **extra: calls.append((argv, extra)))
    return calls


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_superlink_refuses_without_certs_and_insecure_binds_loopback(tmp_path, execs):
    r = runner.invoke(app, ["flower", "superlink"])
    assert r.exit_code == 2 and execs == []
    assert "needs TLS certificates" in r.output and "--insecure" in r.output
    r = runner.invoke(app, ["flower", "superlink", "--insecure"])
    assert r.exit_code == 0, r.output
    assert "INSECURE" in r.output
    argv = execs[-1][0]
    assert argv[:5] == ["python", "-m", "fedkt.federation.flower_link", "--fleet-address", "127.0.0.1:9092"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "9093"
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv
    r = runner.invoke(app, ["flower", "superlink", "--insecure", "--address", "0.0.0.0"])
    assert execs[-1][0][4] == "0.0.0.0:9092"


def test_superlink_with_certs_tls_node_auth_and_fleet_only_public(tmp_path, execs):
    make_certs(tmp_path / "certs")
    r = runner.invoke(app, ["flower", "superlink", "--certs", str(tmp_path / "certs")])
    assert r.exit_code == 0, r.output
    argv = execs[-1][0]
    assert argv[4] == "0.0.0.0:9092"  # only the Fleet listener faces the network
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # Control + Runtime: loopback only
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert argv[argv.index("--ssl-keyfile") + 1] == str(tmp_path / "certs" / "server.key")
    r = runner.invoke(app, ["flower", "superlink", "--certs", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "lacks ca.pem, server.pem, server.key" in r.output
    r = runner.invoke(app, ["flower", "superlink", "--certs", str(tmp_path / "certs"), "--no-node-auth"])
    assert "--enable-supernode-auth" not in execs[-1][0] and "any SuperNode" in r.output


def test_flower_link_refuses_a_public_operator_listener():
    from fedkt.federation import flower_link

    with pytest.raises(SystemExit, match="must be a loopback address"):
        flower_link.main(["--fleet-address", "127.0.0.1:1", "--", "--host", "0.0.0.0", "--port", "2", "--insecure"])


def test_supernode_refuses_without_ca_or_key_and_runs_the_trusted_app(tmp_path, execs):
    spec = tmp_path / "client.toml"
    spec.write_text('[client]\ncid = "client0"\nworkdir = "state"\n')
    base = ["flower", "supernode", "--spec", str(spec), "--superlink", "server.example:9092"]
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "--auth-key" in r.output and execs == []
    key, _ = make_node_key(tmp_path / "node")
    r = runner.invoke(app, base + ["--auth-key", str(key)])
    assert r.exit_code == 2 and "client client0: the SuperNode needs the server's CA certificate" in r.output
    r = runner.invoke(app, base + ["--auth-key", str(key), "--ca", str(tmp_path / "ca.pem")])
    assert r.exit_code == 0, r.output
    argv, env = execs[-1]
    assert argv[argv.index("--root-certificates") + 1] == str(tmp_path / "ca.pem") and "--insecure" not in argv
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(key)
    trusted = tmp_path / "state" / "trusted-app"
    assert env["FEDKT_TRUSTED_APP"] == str(trusted)
    assert (trusted / "pyproject.toml").is_file() and (trusted / "fedkt_flower_app.py").is_file()
    shim = tmp_path / "state" / ".flwr-bin" / "flwr-clientapp"
    assert env["PATH"].split(os.pathsep)[0] == str(shim.parent) and _mode(shim) == 0o700
    assert "-m fedkt.federation.flower_node_app" in shim.read_text()
    r = runner.invoke(app, base + ["--insecure"])
    assert r.exit_code == 0 and "--insecure" in execs[-1][0] and "INSECURE" in r.output


def test_run_and_register_need_a_ca_and_run_an_allow_list(tmp_path, execs, monkeypatch):
    home = tmp_path / "home"
    r = runner.invoke(app, ["flower", "run", "x.toml", "--out", "o", "--home", str(home)])
    assert r.exit_code == 2 and "--ca" in r.output
    r = runner.invoke(app, ["flower", "run", "x.toml", "--out", "o", "--home", str(home), "--ca", "ca.pem"])
    assert r.exit_code == 2 and f"node allow-list {home / 'nodes.toml'} does not exist" in r.output
    r = runner.invoke(app, ["flower", "register-node", "k.pub", "--home", str(home)])
    assert r.exit_code != 0 and "--cid" in r.output
    cfg = (home / "config.toml").read_text()
    assert "127.0.0.1:9093" in cfg and "insecure" not in cfg  # the operator listener, over TLS
    seen = {}
    monkeypatch.setattr(flower_cli, "submit_experiment", lambda *a, **k: seen.update(k) or (1, "finished:completed"))
    AllowList(home / "nodes.toml", {"client0": {"public_key": "k", "node_id": "18446744073709551615"}}).save()
    r = runner.invoke(app, ["flower", "run", "x.toml", "--out", "o", "--home", str(home), "--ca", "ca.pem"])
    assert r.exit_code == 0, r.output
    assert seen["nodes"] == {"client0": 2**64 - 1}  # a node id beyond TOML's int64 survives


def test_keys_created_0600_ca_key_apart_and_never_overwritten(tmp_path):
    d = tmp_path / "certs"
    paths = make_certs(d, ("server.example",), days=3)
    assert paths["ca_key"] == d / "ca" / "ca.key" and _mode(d / "ca") == 0o700
    assert _mode(paths["ca_key"]) == 0o600 and _mode(paths["key"]) == 0o600 and _mode(paths["ca"]) == 0o644
    assert sorted(p.name for p in d.iterdir()) == ["ca", "ca.pem", "server.key", "server.pem"]
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 3
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["server.example", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]  # the operator listener
    before = paths["ca_key"].read_bytes()
    with pytest.raises(CredentialError, match="refusing to overwrite"):
        make_certs(d)
    assert paths["ca_key"].read_bytes() == before
    make_certs(d, force=True)
    assert paths["ca_key"].read_bytes() != before and _mode(paths["ca_key"]) == 0o600
    priv, pub = make_node_key(tmp_path / "node")
    assert _mode(priv) == 0o600 and pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(CredentialError, match="already exists"):
        make_node_key(tmp_path / "node")
    (tmp_path / "planted").symlink_to(tmp_path / "elsewhere")  # no write through a planted link
    with pytest.raises(CredentialError):
        make_node_key(tmp_path / "planted")
    assert not (tmp_path / "elsewhere").exists()
    r = runner.invoke(app, ["flower", "make-certs", str(d), "--days", "0"])
    assert r.exit_code == 2 and "at least 1 day" in r.output


def test_allow_list_binds_one_key_per_client(tmp_path):
    a = AllowList(tmp_path / "nodes.toml")
    a.add("c0", "ecdsa k0", 7)
    with pytest.raises(CredentialError, match="already registered with another key"):
        a.add("c0", "ecdsa k1", 8)
    with pytest.raises(CredentialError, match="already registered for client 'c0'"):
        a.add("c1", "ecdsa k0", 9)
    a.add("c1", "ecdsa k1", 9)
    a.save()
    assert _mode(a.path) == 0o600
    assert AllowList.load(a.path).node_ids() == {"c0": 7, "c1": 9}
    a.path.write_text('[nodes.c0]\npublic_key = "k"\nnode_id = 7\n')
    with pytest.raises(CredentialError, match="decimal digits"):
        AllowList.load(a.path)


def test_node_identity_checks(capsys):
    allowed = {"c0": 11, "c1": 12}
    assert known_nodes([11, 12, 13], allowed) == [11, 12]
    assert known_nodes([11, 13], None) == [11, 13]
    assert may_serve(11, "c0", allowed) and not may_serve(12, "c0", allowed) and not may_serve(12, ["c1"], allowed)
    assert not may_serve(12, "[/red]x", allowed)  # markup in a claimed id is printed, not interpreted
    err = " ".join(capsys.readouterr().err.split())
    assert "refused Flower node 13: its key is not on the allow-list" in err
    assert "refused Flower node 12: it claims client 'c0' but its key is registered for client 'c1'" in err
    assert "claims client '[/red]x'" in err


def test_round_deadline_caps_every_call_of_the_round():
    class M:
        def __init__(self, group):
            self.metadata = type("md", (), {"group_id": group})()

    starts = {}
    assert capped_timeout(30.0, [M("")], 10.0, starts) == 30.0  # no round: the per-call timeout
    assert capped_timeout(30.0, [M("1")], 10.0, starts) == pytest.approx(10.0, abs=0.05)
    starts["1"] -= 8.0  # 8 s of round 1 spent
    assert capped_timeout(30.0, [M("1")], 10.0, starts) == pytest.approx(2.0, abs=0.05)
    starts["1"] -= 5.0
    assert capped_timeout(30.0, [M("1")], 10.0, starts) == 0.0
    assert capped_timeout(5.0, [M("2")], 10.0, starts) == 5.0  # a new round starts its own clock
    assert capped_timeout(None, [M("3")], None, starts) is None


def test_timeouts_are_finite_by_default():
    f = FederationConfig()
    assert (f.timeout_s, f.round_deadline_s) == (1800.0, 7200.0)
    for bad in ({"timeout_s": 0}, {"round_deadline_s": 0}, {"timeout_s": float("inf")}):
        with pytest.raises(ConfigError, match="0 does not mean 'wait for ever'"):
            FederationConfig(**bad)


def test_fleet_only_passes_fleet_routes_and_refuses_the_rest():
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(path):
        sent = []

        async def send(m):
            sent.append(m)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "POST", "path": path, "client": ("10.0.0.9", 5)}
        asyncio.run(FleetOnly(inner)(scope, receive, send))
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    assert call("/v1/fleet/pull-messages") == (200, b"ok")
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/push-task-output", "/health",
                 "/docs", "/v1/fleet", "/v1/fleet/../control/start-run"):
        status, body = call(path)
        assert status == 403 and json.loads(body)["detail"] == "fedkt: only the Fleet API is served on this address"
    assert seen == ["/v1/fleet/pull-messages"]


def test_trusted_app_check(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from fedkt.federation.flower_app_files import write_app
    from fedkt.federation.flower_node_app import UntrustedAppError, check_fab, load_client_app

    trusted, shipped = write_app(tmp_path / "trusted"), write_app(tmp_path / "shipped")
    check_fab(build_fab_from_disk(shipped), trusted)
    (shipped / "evil.py").write_text("import os\n")
    with pytest.raises(UntrustedAppError, match=r"evil.py \(extra\)"):
        check_fab(build_fab_from_disk(shipped), trusted)
    (shipped / "evil.py").unlink()
    (shipped / "pyproject.toml").write_text((shipped / "pyproject.toml").read_text().replace("1.0.0", "1.0.1"))
    with pytest.raises(UntrustedAppError, match=r"pyproject.toml \(differs\)"):
        check_fab(build_fab_from_disk(shipped), trusted)
    from fedkt.federation.flower_experiment import client_app

    assert load_client_app(trusted) is client_app  # the node's own installed fedkt ClientApp


def test_flower_commands_module_is_the_cli():
    assert flower_commands.flower_app is not None
    r = runner.invoke(app, ["flower", "--help"])
    assert r.exit_code == 0 and "superlink" in r.output


def test_run_config_nodes_is_checked():
    from fedkt.federation.flower_app_files import PYPROJECT
    from fedkt.federation.flower_experiment import allowed_nodes

    assert allowed_nodes("") is None
    assert allowed_nodes('{"c0": 18446744073709551615}') == {"c0": 2**64 - 1}
    for bad in ("[1]", '{"c0": "7"}', '{"c0": true}', "{"):
        with pytest.raises(ConfigError, match="run config 'nodes'"):
            allowed_nodes(bad)
    assert 'nodes = ""' in PYPROJECT  # flwr only accepts run-config keys the app declares
