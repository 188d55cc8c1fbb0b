"""What ``fedkt flower ...`` runs: command lines of the SuperLink and SuperNodes, ``flwr`` calls.

The commands themselves are in :mod:`fedkt.federation.flower_commands`. Every process is started with
:data:`~fedkt.federation.flower_env.FLOWER_ENV` (no run-time dependency installation, no telemetry, no
update check) and, for ``flwr``, a private ``FLWR_HOME`` whose ``config.toml`` names exactly one
SuperLink connection (never Flower's hosted default). The argv builders here are used by the CLI and by
:class:`~fedkt.federation.flower_deploy.LocalFlowerDeployment` (the tests), so both run the same command
lines.

* **SuperLink** (:func:`superlink_argv`): fedkt's :mod:`~fedkt.federation.flower_link` process, Fleet API
  alone on the client-facing address, Control and Runtime API on 127.0.0.1; TLS required (or
  ``insecure`` by name); node authentication (``--enable-supernode-auth``) on by default.
* **SuperNode** (:func:`supernode_argv`, :func:`trusted_node_env`): TLS with the server's ``ca.pem``
  required (or ``insecure``), signs its requests with its EC key (``--auth-supernode-private-key``), and
  runs only the trusted local app (:mod:`~fedkt.federation.flower_node_app`).
* **Registration** (:func:`register_node`): ``flwr supernode register KEY.pub`` on the operator listener,
  then the allow-list entry ``cid -> (key, node id)`` (:class:`~fedkt.federation.flower_credentials.AllowList`)
  that ``fedkt flower run`` hands to the ServerApp.
* **Credentials** (certificates, node keys, the allow-list): :mod:`fedkt.federation.flower_credentials`
  (0600 from creation, no overwrite); a client operator's file: :mod:`fedkt.federation.flower_client_file`;
  the submitted app's files: :mod:`fedkt.federation.flower_app_files`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedkt.config import dump_toml
from fedkt.federation.flower_app_files import write_app
from fedkt.federation.flower_credentials import AllowList, CredentialError, public_key_text
from fedkt.federation.flower_env import flower_subprocess_env
from fedkt.federation.flower_node_app import TRUSTED_APP_ENV, shim_dir
from fedkt.registry import load_config

CONNECTION = "fedkt"


# ------------------------------------------------------------------------------------------ command lines
FLEET_PORT = 9092
"""Default port of the Fleet listener (the only one the clients reach)."""
CONTROL_PORT = 9093
"""Default port of the operator listener (Control + Runtime API), always on 127.0.0.1."""
LOOPBACK = "127.0.0.1"


def superlink_argv(host: str | None = None, port: int = FLEET_PORT, certs: str | Path | None = None,
                   node_auth: bool = True, database: str | Path | None = None, control_port: int = CONTROL_PORT,
                   insecure: bool = False) -> list[str]:
    """fedkt's SuperLink (:mod:`fedkt.federation.flower_link`): the Fleet API alone on ``host:port``
    (default ``0.0.0.0`` with TLS, ``127.0.0.1`` when insecure), Control and Runtime API on
    ``127.0.0.1:control_port``. TLS from ``certs`` (a
    :func:`~fedkt.federation.flower_credentials.make_certs` directory) unless ``insecure`` (then no node
    authentication: flwr requires TLS for it); ``database`` keeps its state across restarts.
    ``argv[0]`` is ``python`` (next to this interpreter)."""
    if certs is None and not insecure:
        raise CredentialError("the SuperLink needs TLS certificates (--certs DIR from `fedkt flower make-certs`, "
                              "or a real CA's); pass --insecure only to try fedkt out on one machine")
    if host is None:
        host = LOOPBACK if insecure else "0.0.0.0"
    argv = ["python", "-m", "fedkt.federation.flower_link", "--fleet-address", f"{host}:{port}", "--",
            "--host", LOOPBACK, "--port", str(control_port)]
    if insecure:
        argv.append("--insecure")
    else:
        c = Path(certs)
        argv += ["--ssl-ca-certfile", str(c / "ca.pem"), "--ssl-certfile", str(c / "server.pem"),
                 "--ssl-keyfile", str(c / "server.key")]
        if node_auth:
            argv.append("--enable-supernode-auth")
    if database is not None:
        argv += ["--database", str(database)]
    return argv


def supernode_argv(superlink: str, cid: str, client_file: str | Path | None = None, ca: str | Path | None = None,
                   auth_key: str | Path | None = None, port: int = 9094, host: str = LOOPBACK,
                   insecure: bool = False) -> list[str]:
    """``flower-supernode`` for client ``cid`` (``client_file``: its private side, see
    :func:`fedkt.federation.flower_client_file.load_client_file`). TLS with ``ca`` (the server's ``ca.pem``)
    unless ``insecure``; ``auth_key``: this node's private key (node authentication)."""
    if ca is None and not insecure:
        raise CredentialError(f"client {cid}: the SuperNode needs the server's CA certificate (--ca ca.pem) to "
                              "check whom it talks to; pass --insecure only to try fedkt out on one machine")
    node_config = f"fedkt-client-id={json.dumps(cid)}"
    if client_file is not None:
        node_config += f" fedkt-client-spec={json.dumps(str(Path(client_file).resolve()))}"
    argv = ["flower-supernode", "--superlink", superlink, "--host", host, "--port", str(port),
            "--node-config", node_config]
    argv += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_key)]
    return argv


def trusted_node_env(trusted_app: str | Path, shim: str | Path, bin_dir: Path | None = None) -> dict[str, str]:
    """Environment of a SuperNode that runs only the app in ``trusted_app``
    (:mod:`fedkt.federation.flower_node_app`): its ``flwr-clientapp`` shim in ``shim`` first on PATH."""
    bin_dir = bin_dir or Path(sys.executable).parent
    shim_dir(shim, str(bin_dir / "python"))
    return {TRUSTED_APP_ENV: str(Path(trusted_app).resolve()),
            "PATH": f"{Path(shim).resolve()}{os.pathsep}{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def write_connection(home: str | Path, address: str, ca: str | Path | None = None,
                     name: str = CONNECTION) -> Path:
    """``FLWR_HOME/config.toml`` naming only this SuperLink (``flwr`` never talks to Flower's hosted one)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    tls = "insecure = true\n" if ca is None else f"root-certificates = {json.dumps(str(Path(ca).resolve()))}\n"
    path = home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}')
    return path


def flower_process_env(home: str | Path | None = None, bin_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a Flower process fedkt starts: FLOWER_ENV, this interpreter's bin directory first on
    PATH, this process's PYTHONPATH (absolute), ``FLWR_HOME=home`` and ``extra``."""
    bin_dir = bin_dir or Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1", **extra}
    if os.environ.get("PYTHONPATH"):  # Flower processes run in other directories: keep the same imports
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in os.environ["PYTHONPATH"].split(os.pathsep)
                                            if p)
    if home is not None:
        env["FLWR_HOME"] = str(Path(home).resolve())
    return flower_subprocess_env(**env)


def flwr(args: list[str], home: str | Path, timeout: float = 120.0, bin_dir: Path | None = None,
         cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI with ``FLWR_HOME=home``."""
    bin_dir = bin_dir or Path(sys.executable).parent
    return subprocess.run([str(bin_dir / "flwr"), *args], env=flower_process_env(home, bin_dir), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _json_out(res: subprocess.CompletedProcess) -> dict[str, Any]:
    try:
        return json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        return {}


def register_node(public_key: str | Path, home: str | Path, connection: str = CONNECTION,
                  bin_dir: Path | None = None, cid: str | None = None, allow_list: str | Path | None = None,
                  force: bool = False) -> int:
    """``flwr supernode register KEY.pub CONNECTION``: allow the SuperNode holding the matching private key;
    returns its node id. With ``cid``, also bind client ``cid`` to this key and node id in the allow-list
    file ``allow_list`` (default ``home/nodes.toml``): the ServerApp then accepts only this node as ``cid``."""
    allowed = None
    if cid is not None:  # check the allow-list first: nothing registered when it would refuse
        allowed = AllowList.load(allow_list or Path(home) / "nodes.toml")
        allowed.add(cid, public_key_text(public_key), 0, force)
    res = flwr(["supernode", "register", str(public_key), connection, "--format", "json"], home, bin_dir=bin_dir)
    out = _json_out(res)
    if res.returncode != 0 or out.get("success") is False or "node-id" not in out:
        raise RuntimeError(f"flwr supernode register {public_key} failed (exit {res.returncode}): "
                           f"{res.stdout}{res.stderr}")
    node_id = int(out["node-id"])
    if allowed is not None:
        allowed.add(cid, public_key_text(public_key), node_id, True)
        allowed.save()
    return node_id


def submit(app_dir: str | Path, home: str | Path, run_config: dict[str, Any] | None = None,
           connection: str = CONNECTION, bin_dir: Path | None = None) -> int:
    """``flwr run APP CONNECTION``; returns the run id.

    ``run_config`` goes to ``flwr`` as one TOML file (``--run-config FILE.toml``): its ``key=value``
    form cannot carry a value holding a double quote or a newline (an experiment's TOML text)."""
    args = ["run", str(app_dir), connection, "--format", "json"]
    Path(home).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        if run_config:
            path = Path(tmp) / "run-config.toml"
            path.write_text(tomli_w.dumps(run_config))
            args += ["--run-config", str(path)]
        res = flwr(args, home, bin_dir=bin_dir)
    out = _json_out(res)
    if res.returncode != 0 or not out.get("success"):
        raise RuntimeError(f"flwr run failed (exit {res.returncode}): {res.stdout}{res.stderr}")
    return int(out["run-id"])


def run_status(run_id: int, home: str | Path, connection: str = CONNECTION, bin_dir: Path | None = None) -> str:
    res = flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], home, bin_dir=bin_dir)
    try:
        return _json_out(res)["runs"][0]["status"]
    except (KeyError, IndexError) as e:
        raise RuntimeError(f"flwr ls failed (exit {res.returncode}): {res.stdout}{res.stderr}") from e


def wait_run(run_id: int, home: str | Path, timeout: float = 3600.0, poll: float = 1.0,
             connection: str = CONNECTION, bin_dir: Path | None = None, check=None) -> str:
    """Wait until the run finishes; returns its status (``finished:completed`` when it succeeded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            status = run_status(run_id, home, connection, bin_dir)
        except subprocess.TimeoutExpired:
            continue  # `flwr ls` itself took over its 120 s (a starved machine): ask again
        if status.startswith("finished"):
            return status
        time.sleep(poll)
    raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s")


def run_log(run_id: int, home: str | Path, connection: str = CONNECTION, bin_dir: Path | None = None) -> str:
    """The ServerApp's log (``flwr log RUN_ID --show``)."""
    try:
        res = flwr(["log", str(run_id), connection, "--show"], home, bin_dir=bin_dir, timeout=120)
    except subprocess.TimeoutExpired:
        return f"(`flwr log {run_id}` did not answer within 120 s; the SuperLink's log has the details)"
    return res.stdout + res.stderr


def submit_experiment(config: str | Path, out: str | Path, home: str | Path, resume: bool = False,
                      overrides: list[str] | None = None, timeout: float = 24 * 3600.0,
                      bin_dir: Path | None = None, nodes: dict[str, int] | None = None) -> tuple[int, str]:
    """Submit experiment ``config`` to the SuperLink of ``home``'s connection; the ServerApp writes the run
    directory ``out`` on the SuperLink's machine. ``nodes``: the allow-list (client id -> node id) the
    ServerApp enforces (None: any node that names itself, insecure trials only). Returns (run id, status)."""
    cfg = load_config(config, overrides or [])
    out = Path(out).resolve()
    app = write_app(Path(home) / "app")
    run_config = {"experiment": dump_toml(cfg), "out": str(out), "resume": resume}
    if nodes is not None:
        run_config["nodes"] = json.dumps(nodes)
    run_id = submit(app, home, run_config, bin_dir=bin_dir)
    return run_id, wait_run(run_id, home, timeout=timeout, bin_dir=bin_dir)


def exec_flower(argv: list[str], home: str | Path | None = None, **extra: str) -> None:
    """Replace this process with ``argv[0]`` (found next to this Python) in FLOWER_ENV (plus ``extra``)."""
    bin_dir = Path(sys.executable).parent
    exe = bin_dir / argv[0]
    if not exe.exists():
        raise FileNotFoundError(f"{argv[0]} not found next to {sys.executable}: install fedkt's Flower extra "
                                "(pip install 'fedkt[flower]')")
    os.execve(str(exe), [str(exe), *argv[1:]], flower_process_env(home, bin_dir, **extra))


