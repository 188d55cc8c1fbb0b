"""Start a local Flower deployment (one SuperLink + N SuperNodes) as subprocesses, and stop it for sure.

Used by the integration test and meant for ``fedkt`` deployment helpers. Everything binds to
127.0.0.1 on free ports, runs with :data:`~fedkt.federation.flower_env.FLOWER_ENV` (no runtime
dependency installation, no telemetry, no update check) and a private ``FLWR_HOME`` whose
``config.toml`` names only this SuperLink (Flower's default config points ``flwr`` at a hosted
SuperGrid; ours never does).

Process hygiene: each SuperLink/SuperNode starts in its own session, so the per-message
``flwr-serverapp``/``flwr-clientapp`` processes share its process group, and so does a SuperNode's
SuperExec; the SuperLink's SuperExec, though, is started by flwr in a session of its own (with the
ServerApp processes it spawns in its group). :meth:`LocalFlowerDeployment.stop` signals the groups of
the PIDs we started and the groups led by any of their descendants (found in ``/proc`` before the
first signal): SIGTERM, then SIGKILL after a grace period. Stopping only the SuperNode PID would leave
its SuperExec running for several seconds; stopping only the SuperLink's group left its SuperExec
spawning ServerApps (on a loaded machine, for minutes).

This module imports nothing from ``flwr``: it drives fedkt's SuperLink (``python -m
fedkt.federation.flower_link``) and the installed CLIs (``flower-supernode``, ``flwr run``/``flwr ls``)
found next to the running Python interpreter.

The SuperLink is fedkt's (:mod:`~fedkt.federation.flower_link`): the Fleet API alone on ``port``, the
Control and Runtime API on ``control_port`` (both 127.0.0.1 here). Optional TLS (``tls=True``: a local
CA and server certificate from :func:`~fedkt.federation.flower_credentials.make_certs`; without it the
SuperLink runs ``--insecure``, as only a test may), SuperNode authentication (``node_auth=True``: one
key pair per client, registered with ``flwr supernode register`` and bound to its client id in the
allow-list ``flwr-home/nodes.toml`` before the SuperNodes start; :meth:`allowed_nodes` is what
``fedkt flower run`` hands the ServerApp) and a trusted app (``trusted_app``: a directory; each SuperNode
then runs only that app, :mod:`~fedkt.federation.flower_node_app`), with the same command lines as
``fedkt flower ...`` (:mod:`fedkt.federation.flower_cli`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkt.federation import flower_cli, flower_credentials

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


@dataclass
class LocalFlowerDeployment:
    """A SuperLink and one SuperNode per client id, on 127.0.0.1, in ``workdir``.

    ``client_files``: cid -> that client's file (node config ``fedkt-client-spec``); ``tls`` and
    ``node_auth`` as in the module docstring; ``database`` and ``port`` to restart a SuperLink."""

    workdir: Path
    client_ids: list[str]
    bin_dir: Path = field(default_factory=lambda: Path(sys.executable).parent)
    superexec_poll_interval: float = 0.1
    """SuperExec task polling (Flower's default is 1 s): how soon a ClientApp/ServerApp process starts."""
    port: int = 0
    """Fleet listener port (0: a free one)."""
    control_port: int = 0
    """Operator listener port: Control + Runtime API (0: a free one)."""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    tls: bool = False
    node_auth: bool = False
    client_files: dict[str, Path] = field(default_factory=dict)
    database: Path | None = None
    trusted_app: Path | None = None
    """A Flower app directory: each SuperNode runs only this app and refuses a run whose app differs
    (default: the SuperNodes run the submitted app, as plain Flower does)."""
    """SQLite file keeping the SuperLink's state (``--database``): a SuperLink restarted with the same file
    (and ``port``) continues where the killed one stopped; default: in memory."""

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.home = self.workdir / "flwr-home"
        self.certs = self.workdir / "certs" if self.tls else None

    def _env(self) -> dict[str, str]:
        return flower_cli.flower_process_env(self.home, self.bin_dir,
                                     FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(self.superexec_poll_interval))

    def _spawn(self, name: str, argv: list[str], **extra: str) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([str(self.bin_dir / argv[0]), *argv[1:]], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**self._env(), **extra},
                                    cwd=self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    @property
    def address(self) -> str:
        """The Fleet listener (what SuperNodes connect to)."""
        return f"{HOST}:{self.port}"

    @property
    def control_address(self) -> str:
        """The operator listener (Control API: ``flwr``; Runtime API: the ServerApps)."""
        return f"{HOST}:{self.control_port}"

    def allowed_nodes(self) -> dict[str, int] | None:
        """The allow-list ``client id -> node id`` (None without node authentication)."""
        path = self.home / "nodes.toml"
        return flower_credentials.AllowList.load(path).node_ids() if self.node_auth else None

    def node_key(self, cid: str) -> Path:
        return self.workdir / "keys" / cid

    def start(self, timeout: float = 60.0) -> "LocalFlowerDeployment":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            self.port = self.port or free_port()
            self.control_port = self.control_port or free_port()
            if self.certs is not None and not (self.certs / "ca.pem").is_file():
                flower_credentials.make_certs(self.certs)
            ca = None if self.certs is None else self.certs / "ca.pem"
            flower_cli.write_connection(self.home, self.control_address, ca, name=CONNECTION)
            link = self._spawn("superlink", flower_cli.superlink_argv(
                HOST, self.port, self.certs, self.node_auth, self.database, self.control_port,
                insecure=self.certs is None))
            for p in (self.control_port, self.port):
                _wait_port(HOST, p, link, timeout, "fedkt's SuperLink", self.workdir / "superlink.log")
            for cid in self.client_ids:
                if self.node_auth:
                    key = self.node_key(cid)
                    pub = key.with_name(key.name + ".pub")
                    if not pub.is_file():  # a restarted deployment keeps its node keys
                        _, pub = flower_credentials.make_node_key(key)
                    flower_cli.register_node(pub, self.home, CONNECTION, self.bin_dir, cid=cid, force=True)
                self.start_node(cid)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, cid: str, auth_key: Path | None = None, name: str | None = None) -> subprocess.Popen:
        """(Re)start client ``cid``'s SuperNode (``auth_key``: another private key than its own; ``name``: of
        its process and log, default ``supernode-<cid>``: give another to start a second node for ``cid``)."""
        ca = None if self.certs is None else self.certs / "ca.pem"
        key = auth_key if auth_key is not None else (self.node_key(cid) if self.node_auth else None)
        extra = {} if self.trusted_app is None else flower_cli.trusted_node_env(
            self.trusted_app, self.workdir / f"bin-{cid}", self.bin_dir)
        return self._spawn(name or f"supernode-{cid}", flower_cli.supernode_argv(
            self.address, cid, self.client_files.get(cid), ca, key, port=free_port(), host=HOST,
            insecure=ca is None), **extra)

    def kill_node(self, cid: str) -> None:
        """SIGKILL client ``cid``'s SuperNode and everything it started (a machine that vanished)."""
        p = self.procs[f"supernode-{cid}"]
        _signal_group(p, signal.SIGKILL)
        p.wait(timeout=10)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment's SuperLink."""
        return subprocess.run([str(self.bin_dir / "flwr"), *args], env=self._env(), cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def run_app(self, app_dir: str | Path, run_config: dict[str, Any] | None = None) -> int:
        """Submit the Flower app in ``app_dir`` (``flwr run``); returns the run id."""
        return flower_cli.submit(app_dir, self.home, run_config, CONNECTION, self.bin_dir)

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if name == "superlink" and p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}; see {self.workdir}/{name}.log")

    def run_log(self, run_id: int) -> str:
        return flower_cli.run_log(run_id, self.home, CONNECTION, self.bin_dir)

    def run_status(self, run_id: int) -> str:
        return flower_cli.run_status(run_id, self.home, CONNECTION, self.bin_dir)

    def wait_run(self, run_id: int, timeout: float = 300.0, poll: float = 1.0) -> str:
        """Wait until the run finishes; returns its status (e.g. ``finished:completed``)."""
        try:
            return flower_cli.wait_run(run_id, self.home, timeout, poll, CONNECTION, self.bin_dir,
                                       check=self._check_alive)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; logs in {self.workdir}") from e

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process group we started, and those its processes started in sessions of their own
        (the SuperLink's SuperExec): SIGTERM, then SIGKILL after ``grace`` seconds."""
        detached = _detached_groups([p.pid for p in self.procs.values() if p.poll() is None])
        for p in self.procs.values():
            _signal_group(p, signal.SIGTERM)
        _signal_groups(detached, signal.SIGTERM)
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
        _signal_groups(detached, signal.SIGKILL)

    def __enter__(self) -> "LocalFlowerDeployment":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _detached_groups(pids: list[int]) -> set[int]:
    """Process groups led by a descendant of ``pids`` (read from Linux's ``/proc``; empty elsewhere)."""
    parent: dict[int, int] = {}
    group: dict[int, int] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return set()
    for e in entries:
        try:
            stat = Path(f"/proc/{e}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        parent[int(e)], group[int(e)] = int(fields[1]), int(fields[2])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return {c for c in found if group.get(c) == c and c not in pids}


def _signal_groups(groups: set[int], sig: int) -> None:
    for g in groups:
        try:
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the group whose leader is the process we started (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
