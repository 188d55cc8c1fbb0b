"""What ``fedkt flower ...`` does: start a SuperLink or a SuperNode, submit an experiment, make certificates.

Every command is a thin layer over Flower's own executables (``flower-superlink``, ``flower-supernode``,
``flwr``), started with :data:`~fedkt.federation.flower_env.FLOWER_ENV` (no run-time dependency
installation, no telemetry, no update check) and, for ``flwr``, a private ``FLWR_HOME`` whose
``config.toml`` names exactly one SuperLink connection (never Flower's hosted default). The argv
builders here are used by the CLI and by :class:`~fedkt.federation.flower_deploy.LocalFlowerDeployment`
(the tests), so both run the same command lines.

* **TLS**: :func:`make_certs` writes a throw-away local CA (``ca.pem``/``ca.key``) and a server
  certificate for ``127.0.0.1``/``localhost`` (and any extra host names) signed by it
  (``server.pem``/``server.key``). The SuperLink serves with ``--ssl-ca-certfile ca.pem --ssl-certfile
  server.pem --ssl-keyfile server.key``; SuperNodes and ``flwr`` trust ``ca.pem``
  (``--root-certificates``, ``root-certificates`` in the connection). For production use a real CA.
* **SuperNode authentication** (flwr 1.41): the SuperLink runs with ``--enable-supernode-auth``; each
  SuperNode has an EC key pair (NIST curve, OpenSSH format: :func:`make_node_key` or ``ssh-keygen -t
  ecdsa -b 384 -N "" -f node``) and starts with ``--auth-supernode-private-key``; the server operator
  registers each client's *public* key with ``flwr supernode register node.pub CONNECTION`` before it
  connects (:func:`register_node`). A node whose key is not registered is refused by the SuperLink.
"""

from __future__ import annotations

import datetime
import tomllib
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

from fedkt.federation.flower_env import flower_subprocess_env

CONNECTION = "fedkt"
CLIENT_KEYS = {"cid", "model", "data_files", "data_task", "workdir", "secret_seed"}


def load_client_file(path: str | Path) -> dict[str, Any]:
    """A client operator's file: a TOML ``[client]`` table with ``cid`` (required), ``data_files`` (JSONL
    paths on this machine), optional ``data_task``, ``model`` (default: the experiment's ``model.slm``),
    ``workdir`` (client state kept for resume; default ``./fedkt-client-<cid>``) and ``secret_seed``
    (≥ 64 bits; without it the client's privacy noise comes from the OS CSPRNG), and an optional
    ``[policy]`` table: what the client accepts from the server (docs/privacy.md)."""
    from fedkt.config import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"client file {p} does not exist")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"client file {p} is not valid TOML: {e}") from e
    d = doc.get("client")
    if not isinstance(d, dict) or "cid" not in d:
        raise ConfigError(f"client file {p} needs a [client] table with at least cid = \"...\"")
    unknown = sorted(set(d) - CLIENT_KEYS)
    if unknown:
        raise ConfigError(f"client file {p}: unknown keys {unknown}; allowed: {', '.join(sorted(CLIENT_KEYS))}")
    extra = sorted(set(doc) - {"client", "policy"})
    if extra:
        raise ConfigError(f"client file {p}: unknown tables {extra}; allowed: [client], [policy]")
    d["policy"] = client_policy(doc.get("policy", {}), p)
    if d.get("secret_seed") is not None:
        from fedkt.privacy.randomness import check_secret_seed

        try:
            check_secret_seed(d["secret_seed"])
        except ValueError as e:
            raise ConfigError(f"client file {p}: {e}") from None
    base = p.parent
    d["data_files"] = [str((base / f).resolve()) for f in d.get("data_files", [])]
    d["workdir"] = str((base / d.get("workdir", f"fedkt-client-{d['cid']}")).resolve())
    return d


def client_policy(table: Any, path: Path):
    """The client file's ``[policy]`` table as a validated :class:`~fedkt.privacy.policy.ClientPolicy`
    (missing keys keep their safe defaults; docs/privacy.md#policy)."""
    from fedkt.config import ConfigError, from_dict
    from fedkt.privacy.policy import ClientPolicy

    if not isinstance(table, dict):
        raise ConfigError(f"client file {path}: [policy] must be a table")
    try:
        return from_dict(ClientPolicy, table, prefix="policy.")
    except ConfigError as e:
        raise ConfigError(f"client file {path}: {e}") from None


# ------------------------------------------------------------------------------------------ credentials
def make_certs(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
               days: int = 30) -> dict[str, Path]:
    """A local CA and a server certificate for ``hosts`` signed by it (for trying TLS out)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)

    def key():
        return ec.generate_private_key(ec.SECP384R1())

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("fedkt local CA")).issuer_name(name("fedkt local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    alt: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    srv_key = key()
    srv = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca.subject)
           .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now).not_valid_after(until)
           .add_extension(x509.SubjectAlternativeName(alt), critical=False)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {n: d / f for n, f in (("ca", "ca.pem"), ("ca_key", "ca.key"), ("cert", "server.pem"),
                                    ("key", "server.key"))}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(srv.public_bytes(pem))
    for k, path in ((ca_key, paths["ca_key"]), (srv_key, paths["key"])):
        path.write_bytes(k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        path.chmod(0o600)
    return paths


def make_node_key(path: str | Path) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair: ``path`` (private, OpenSSH) and ``path.pub`` (register it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv = Path(path)
    priv.parent.mkdir(parents=True, exist_ok=True)
    k = ec.generate_private_key(ec.SECP384R1())
    priv.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption()))
    priv.chmod(0o600)
    pub = priv.with_name(priv.name + ".pub")
    pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH) + b" fedkt-node\n")
    return priv, pub


# ------------------------------------------------------------------------------------------ command lines
def superlink_argv(host: str = "0.0.0.0", port: int = 9093, certs: str | Path | None = None,
                   node_auth: bool = False, database: str | Path | None = None) -> list[str]:
    """``flower-superlink``: Fleet, Control and Runtime API on one port; TLS from ``certs`` (a
    :func:`make_certs` directory) or ``--insecure``; ``database`` keeps its state across restarts."""
    argv = ["flower-superlink", "--host", host, "--port", str(port)]
    if certs is None:
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
                   auth_key: str | Path | None = None, port: int = 9094, host: str = "127.0.0.1") -> list[str]:
    """``flower-supernode`` for client ``cid`` (``client_file``: its private side, see
    :func:`fedkt.federation.flower_experiment.load_client_file`)."""
    node_config = f"fedkt-client-id={json.dumps(cid)}"
    if client_file is not None:
        node_config += f" fedkt-client-spec={json.dumps(str(Path(client_file).resolve()))}"
    argv = ["flower-supernode", "--superlink", superlink, "--host", host, "--port", str(port),
            "--node-config", node_config]
    argv += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_key)]
    return argv


def write_connection(home: str | Path, address: str, ca: str | Path | None = None,
                     name: str = CONNECTION) -> Path:
    """``FLWR_HOME/config.toml`` naming only this SuperLink (``flwr`` never talks to Flower's hosted one)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    tls = "insecure = true\n" if ca is None else f"root-certificates = {json.dumps(str(Path(ca).resolve()))}\n"
    path = home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}')
    return path


def flower_env(home: str | Path | None = None, bin_dir: Path | None = None, **extra: str) -> dict[str, str]:
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
    return subprocess.run([str(bin_dir / "flwr"), *args], env=flower_env(home, bin_dir), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _json_out(res: subprocess.CompletedProcess) -> dict[str, Any]:
    try:
        return json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        return {}


def register_node(public_key: str | Path, home: str | Path, connection: str = CONNECTION,
                  bin_dir: Path | None = None) -> None:
    """``flwr supernode register KEY.pub CONNECTION``: allow the SuperNode holding the matching private key."""
    res = flwr(["supernode", "register", str(public_key), connection, "--format", "json"], home, bin_dir=bin_dir)
    if res.returncode != 0 or _json_out(res).get("success") is False:
        raise RuntimeError(f"flwr supernode register {public_key} failed (exit {res.returncode}): "
                           f"{res.stdout}{res.stderr}")


def submit(app_dir: str | Path, home: str | Path, run_config: dict[str, Any] | None = None,
           connection: str = CONNECTION, bin_dir: Path | None = None) -> int:
    """``flwr run APP CONNECTION``; returns the run id.

    ``run_config`` goes to ``flwr`` as one TOML file (``--run-config FILE.toml``): its ``key=value``
    form cannot carry a value holding a double quote or a newline (an experiment's TOML text)."""
    import tempfile

    import tomli_w

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


def run_experiment(config: str | Path, out: str | Path, home: str | Path, resume: bool = False,
                   overrides: list[str] | None = None, timeout: float = 24 * 3600.0,
                   bin_dir: Path | None = None) -> tuple[int, str]:
    """Submit experiment ``config`` to the SuperLink of ``home``'s connection; the ServerApp writes the run
    directory ``out`` on the SuperLink's machine. Returns (run id, final status)."""
    from fedkt.config import dump_toml, load_config
    from fedkt.federation.flower_experiment import write_app

    cfg = load_config(config, overrides or [])
    out = Path(out).resolve()
    app = write_app(Path(home) / "app")
    run_id = submit(app, home, {"experiment": dump_toml(cfg), "out": str(out), "resume": resume},
                    bin_dir=bin_dir)
    return run_id, wait_run(run_id, home, timeout=timeout, bin_dir=bin_dir)


def exec_flower(argv: list[str], home: str | Path | None = None) -> None:
    """Replace this process with Flower executable ``argv[0]`` (found next to this Python) in FLOWER_ENV."""
    bin_dir = Path(sys.executable).parent
    exe = bin_dir / argv[0]
    if not exe.exists():
        raise FileNotFoundError(f"{argv[0]} not found next to {sys.executable}: install fedkt's Flower extra "
                                "(pip install 'fedkt[flower]')")
    os.execve(str(exe), [str(exe), *argv[1:]], flower_env(home, bin_dir))


# ------------------------------------------------------------------------------------------ `fedkt flower`
import typer  # noqa: E402

flower_app = typer.Typer(no_args_is_help=True, help="Run fedkt on real Flower processes (SuperLink, SuperNodes, "
                         "flwr run). See docs/deployment.md.")
HOME_OPT = typer.Option(Path(".fedkt-flwr"), "--home", help="Private FLWR_HOME for flwr's connection config.")


@flower_app.command("superlink")
def cli_superlink(host: str = typer.Option("0.0.0.0", help="Interface to listen on."),
                  port: int = typer.Option(9093, help="Fleet, Control and Runtime API port."),
                  certs: Optional[Path] = typer.Option(None, help="TLS: a `fedkt flower make-certs` directory "
                                                       "(ca.pem, server.pem, server.key); default: insecure."),
                  node_auth: bool = typer.Option(False, "--node-auth", help="Accept only registered SuperNodes."),
                  database: Optional[Path] = typer.Option(None, help="SQLite file keeping the SuperLink's state.")):
    """The server operator: start the SuperLink (foreground)."""
    exec_flower(superlink_argv(host, port, certs, node_auth, database))


@flower_app.command("supernode")
def cli_supernode(spec: Path = typer.Option(..., "--spec", help="This client's file ([client] cid, data_files, ...)."),
                  superlink: str = typer.Option(..., help="The SuperLink's HOST:PORT."),
                  ca: Optional[Path] = typer.Option(None, help="TLS: the CA certificate (ca.pem); default: insecure."),
                  auth_key: Optional[Path] = typer.Option(None, help="Node auth: this node's private key."),
                  port: int = typer.Option(9094, help="Local port of the node's ClientApp API (127.0.0.1).")):
    """A client operator: start this organisation's SuperNode (foreground)."""
    client = load_client_file(spec)
    exec_flower(supernode_argv(superlink, str(client["cid"]), spec, ca, auth_key, port))


@flower_app.command("run")
def cli_run(config: Path = typer.Argument(..., help="Experiment TOML."),
            out: Path = typer.Option(..., "--out", help="Run directory, on the SuperLink's machine."),
            superlink: str = typer.Option("127.0.0.1:9093", help="The SuperLink's HOST:PORT (Control API)."),
            ca: Optional[Path] = typer.Option(None, help="TLS: the CA certificate; default: insecure."),
            resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoints."),
            set_: List[str] = typer.Option([], "--set", help="Override a config key."),
            home: Path = HOME_OPT):
    """The server operator: run an experiment's methods over the connected SuperNodes and wait for it."""
    write_connection(home, superlink, ca)
    run_id, status = run_experiment(config, out, home, resume, set_)
    typer.echo(f"run {run_id}: {status}")
    if status != "finished:completed":
        typer.echo(run_log(run_id, home)[-4000:], err=True)
        raise typer.Exit(1)
    typer.echo(f"run directory: {out}")


@flower_app.command("make-certs")
def cli_make_certs(directory: Path = typer.Argument(..., help="Where to write ca.pem, server.pem, server.key."),
                   host: List[str] = typer.Option(["127.0.0.1", "localhost"], "--host",
                                                  help="Names/IPs the server certificate is valid for.")):
    """A local CA + server certificate, for trying TLS out (use a real CA in production)."""
    paths = make_certs(directory, tuple(host))
    typer.echo("\n".join(f"{k}: {v}" for k, v in paths.items()))


@flower_app.command("make-node-key")
def cli_make_node_key(path: Path = typer.Argument(..., help="Private key path; the public key goes to PATH.pub.")):
    """A client operator: this SuperNode's authentication key pair (send PATH.pub to the server operator)."""
    priv, pub = make_node_key(path)
    typer.echo(f"private: {priv}\npublic (register it on the SuperLink): {pub}")


@flower_app.command("register-node")
def cli_register_node(public_key: Path = typer.Argument(..., help="A client's PATH.pub."),
                      superlink: str = typer.Option("127.0.0.1:9093", help="The SuperLink's HOST:PORT."),
                      ca: Optional[Path] = typer.Option(None, help="TLS: the CA certificate; default: insecure."),
                      home: Path = HOME_OPT):
    """The server operator: allow the SuperNode holding the matching private key (node auth)."""
    write_connection(home, superlink, ca)
    register_node(public_key, home)
    typer.echo(f"registered {public_key}")
