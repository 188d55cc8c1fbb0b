"""Start a local Flower deployment (one SuperLink + N SuperNodes) as subprocesses, and stop it for sure.

Used by the integration test and meant for ``fedkt`` deployment helpers. Everything binds to
127.0.0.1 on free ports, runs with :data:`~fedkt.federation.flower_env.FLOWER_ENV` (no runtime
dependency installation, no telemetry, no update check) and a private ``FLWR_HOME`` whose
``config.toml`` names only this SuperLink (Flower's default config points ``flwr`` at a hosted
SuperGrid; ours never does).

Process hygiene: each SuperLink/SuperNode starts in its own session, so the SuperExec and the
per-message ``flwr-serverapp``/``flwr-clientapp`` processes it spawns share its process group;
:meth:`LocalFlowerDeployment.stop` signals exactly those groups (by the PIDs we started: SIGTERM,
then SIGKILL after a grace period). Stopping only the SuperNode PID would leave its SuperExec
running for several seconds.

This module imports nothing from ``flwr``: it drives the installed CLIs (``flower-superlink``,
``flower-supernode``, ``flwr run``/``flwr ls``) found next to the running Python interpreter.

Insecure mode only for now. TLS (``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` on the
SuperLink, ``--root-certificates`` on SuperNodes, ``root-certificates`` in the connection) and node
authentication (``--enable-supernode-auth`` + ``flwr supernode register``, and
``--auth-supernode-private-key`` on each SuperNode) are documented in docs/flower-notes.md.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkt.federation.flower_env import flower_subprocess_env

HOST = "127.0.0.1"
CONNECTION = "fedkt-local"


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on "
                               f"{host}:{port}; see {log}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s; see {log}")


def _toml_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


@dataclass
class LocalFlowerDeployment:
    """A SuperLink and one SuperNode per client id, on 127.0.0.1, insecure, in ``workdir``."""

    workdir: Path
    client_ids: list[str]
    bin_dir: Path = field(default_factory=lambda: Path(sys.executable).parent)
    superexec_poll_interval: float = 0.1
    """SuperExec task polling (Flower's default is 1 s): how soon a ClientApp/ServerApp process starts."""
    port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.home = self.workdir / "flwr-home"

    def _env(self) -> dict[str, str]:
        return flower_subprocess_env(
            FLWR_HOME=str(self.home),
            PATH=f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(self.superexec_poll_interval),
            PYTHONUNBUFFERED="1",
        )

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(self.bin_dir / argv[0]), *argv[1:]], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env(),
                                    cwd=self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self, timeout: float = 60.0) -> "LocalFlowerDeployment":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            self.port = self.port or free_port()
            (self.home / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f'address = "{HOST}:{self.port}"\ninsecure = true\n')
            link = self._spawn("superlink", ["flower-superlink", "--insecure", "--host", HOST,
                                             "--port", str(self.port)])
            _wait_port(HOST, self.port, link, timeout, "flower-superlink", self.workdir / "superlink.log")
            for cid in self.client_ids:
                self._spawn(f"supernode-{cid}", [
                    "flower-supernode", "--insecure", "--superlink", f"{HOST}:{self.port}",
                    "--host", HOST, "--port", str(free_port()),
                    "--node-config", f"fedkt-client-id={json.dumps(cid)}"])
        except BaseException:
            self.stop()
            raise
        return self

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment's SuperLink."""
        return subprocess.run([str(self.bin_dir / "flwr"), *args], env=self._env(), cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def run_app(self, app_dir: str | Path, run_config: dict[str, Any] | None = None) -> int:
        """Submit the Flower app in ``app_dir`` (``flwr run``); returns the run id."""
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        for k, v in (run_config or {}).items():
            args += ["--run-config", f"{k}={_toml_value(v)}"]
        res = self.flwr(*args)
        try:
            out = json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            out = {}
        if res.returncode != 0 or not out.get("success"):
            raise RuntimeError(f"flwr run failed (exit {res.returncode}): {res.stdout}{res.stderr}")
        return int(out["run-id"])

    def run_status(self, run_id: int) -> str:
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(res.stdout[res.stdout.index("{"):])["runs"]
            return runs[0]["status"]
        except (ValueError, KeyError, IndexError) as e:
            raise RuntimeError(f"flwr ls failed (exit {res.returncode}): {res.stdout}{res.stderr}") from e

    def wait_run(self, run_id: int, timeout: float = 300.0, poll: float = 1.0) -> str:
        """Wait until the run finishes; returns its status (e.g. ``finished:completed``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {p.returncode}; see {self.workdir}/{name}.log")
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s; logs in {self.workdir}")

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process group we started: SIGTERM, then SIGKILL after ``grace`` seconds."""
        for p in self.procs.values():
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            _signal_group(p, signal.SIGKILL)  # also reaps SuperExec/app children still in the group
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "LocalFlowerDeployment":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the group whose leader is the process we started (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
