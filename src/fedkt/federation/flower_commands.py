"""``fedkt flower ...``: the commands of the three organisations (see docs/deployment.md).

Secure by default, insecure only when asked for by name (``--insecure``):

* ``superlink`` refuses to start without ``--certs``; node authentication is on; the Fleet API alone
  faces the clients (``--address``/``--port``), Control and Runtime API listen on 127.0.0.1
  (``--control-port``) (:mod:`fedkt.federation.flower_link`).
* ``supernode`` refuses to start without ``--ca`` and ``--auth-key``; it runs only the fedkt ClientApp of
  this machine's fedkt installation (:mod:`fedkt.federation.flower_node_app`).
* ``run`` and ``register-node`` talk to the operator listener (127.0.0.1) over TLS; ``run`` enforces the
  allow-list ``client id -> node key`` that ``register-node --cid`` keeps.
* ``make-certs``/``make-node-key`` write private keys 0600 from creation, the CA key apart
  (``ca/ca.key``), and never overwrite a file unless ``--force``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fedkt.config import ConfigError
from fedkt.federation import flower_cli as fc
from fedkt.federation.flower_app_files import write_app
from fedkt.federation.flower_client_file import load_client_file
from fedkt.federation.flower_credentials import AllowList, CredentialError, make_certs, make_node_key

flower_app = typer.Typer(no_args_is_help=True, help="Run fedkt on real Flower processes (SuperLink, SuperNodes, "
                         "flwr run). See docs/deployment.md.")
HOME_OPT = typer.Option(Path(".fedkt-flwr"), "--home", help="Private FLWR_HOME for flwr's connection config "
                        "(and the node allow-list nodes.toml).")
INSECURE_OPT = typer.Option(False, "--insecure", help="No TLS, no node authentication: only to try fedkt out "
                            "on one machine.")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _warn_insecure(what: str) -> None:
    typer.secho(f"WARNING: {what} runs INSECURE (--insecure): no TLS, no node authentication; anyone who can "
                "reach it can read the traffic and impersonate a party. Use it only to try fedkt out on one "
                "machine.", fg=typer.colors.RED, bold=True, err=True)


def _connection(home: Path, superlink: str, ca: Optional[Path], insecure: bool) -> None:
    if ca is None and not insecure:
        _fail(CredentialError("give the CA certificate (--ca certs/ca.pem) to check the SuperLink's identity, "
                              "or --insecure for an insecure trial SuperLink"))
    if insecure:
        _warn_insecure("this connection")
    fc.write_connection(home, superlink, None if insecure else ca)


@flower_app.command("superlink")
def cli_superlink(certs: Optional[Path] = typer.Option(None, help="TLS: a `fedkt flower make-certs` directory "
                                                       "(ca.pem, server.pem, server.key). Required unless --insecure."),
                  address: Optional[str] = typer.Option(None, help="Interface of the Fleet listener (the one the "
                                                        "clients reach). Default 0.0.0.0; 127.0.0.1 with --insecure."),
                  port: int = typer.Option(fc.FLEET_PORT, help="Fleet listener port (open it to the clients)."),
                  control_port: int = typer.Option(fc.CONTROL_PORT, help="Control + Runtime API port, on "
                                                   "127.0.0.1 only (never open it)."),
                  no_node_auth: bool = typer.Option(False, "--no-node-auth", help="Accept any SuperNode (not "
                                                    "recommended)."),
                  database: Optional[Path] = typer.Option(None, help="SQLite file keeping the SuperLink's state."),
                  insecure: bool = INSECURE_OPT):
    """The server operator: start the SuperLink (foreground)."""
    try:
        argv = fc.superlink_argv(address, port, certs, not no_node_auth, database, control_port, insecure)
    except CredentialError as e:
        _fail(e)
    if certs is not None and not insecure:
        missing = [f for f in ("ca.pem", "server.pem", "server.key") if not (certs / f).is_file()]
        if missing:
            _fail(CredentialError(f"--certs {certs} lacks {', '.join(missing)}: run `fedkt flower make-certs "
                                  f"{certs} --host <this server's name>`"))
    if insecure:
        _warn_insecure("the SuperLink")
    if no_node_auth and not insecure:
        typer.secho("WARNING: --no-node-auth: any SuperNode that reaches the Fleet port may connect.",
                    fg=typer.colors.RED, bold=True, err=True)
    fc.exec_flower(argv)


@flower_app.command("supernode")
def cli_supernode(spec: Path = typer.Option(..., "--spec", help="This client's file ([client] cid, data_files, ...)."),
                  superlink: str = typer.Option(..., help="The SuperLink's Fleet address HOST:PORT."),
                  ca: Optional[Path] = typer.Option(None, help="TLS: the server's CA certificate (ca.pem). "
                                                    "Required unless --insecure."),
                  auth_key: Optional[Path] = typer.Option(None, help="This node's private key (make-node-key). "
                                                          "Required unless --insecure."),
                  port: int = typer.Option(9094, help="Local port of the node's ClientApp API (127.0.0.1)."),
                  insecure: bool = INSECURE_OPT):
    """A client operator: start this organisation's SuperNode (foreground). It runs only the fedkt ClientApp
    of this machine's fedkt installation; a run whose app differs is refused."""

    try:
        client = load_client_file(spec)
        if auth_key is None and not insecure:
            raise CredentialError("the SuperLink authenticates SuperNodes: give this node's private key "
                                  "(--auth-key, from `fedkt flower make-node-key`), or --insecure for a trial")
        argv = fc.supernode_argv(superlink, str(client["cid"]), spec, None if insecure else ca, auth_key, port,
                                 insecure=insecure)
    except (CredentialError, ConfigError) as e:
        _fail(e)
    if insecure:
        _warn_insecure(f"the SuperNode of client {client['cid']}")
    root = Path(client["workdir"])
    trusted = write_app(root / "trusted-app")  # from this machine's fedkt: the only code the node runs
    fc.exec_flower(argv, None, **fc.trusted_node_env(trusted, root / ".flwr-bin"))


@flower_app.command("run")
def cli_run(config: Path = typer.Argument(..., help="Experiment TOML."),
            out: Path = typer.Option(..., "--out", help="Run directory, on the SuperLink's machine."),
            superlink: str = typer.Option(f"127.0.0.1:{fc.CONTROL_PORT}", help="The SuperLink's operator "
                                          "listener HOST:PORT (Control API; 127.0.0.1)."),
            ca: Optional[Path] = typer.Option(None, help="TLS: the CA certificate. Required unless --insecure."),
            allow_list: Optional[Path] = typer.Option(None, help="client id -> node key allow-list "
                                                      "(default: HOME/nodes.toml, kept by register-node)."),
            resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoints."),
            set_: List[str] = typer.Option([], "--set", help="Override a config key."),
            home: Path = HOME_OPT, insecure: bool = INSECURE_OPT):
    """The server operator: run an experiment's methods over the registered SuperNodes and wait for it."""
    _connection(home, superlink, ca, insecure)
    nodes = None
    try:
        if not insecure or allow_list is not None:
            allowed = AllowList.load(allow_list or home / "nodes.toml", must_exist=True)
            if not allowed.nodes:
                raise CredentialError(f"the allow-list {allowed.path} names no client")
            nodes = allowed.node_ids()
    except CredentialError as e:
        _fail(e)
    run_id, status = fc.submit_experiment(config, out, home, resume, set_, nodes=nodes)
    typer.echo(f"run {run_id}: {status}")
    if status != "finished:completed":
        typer.echo(fc.run_log(run_id, home)[-4000:], err=True)
        raise typer.Exit(1)
    typer.echo(f"run directory: {out}")


@flower_app.command("make-certs")
def cli_make_certs(directory: Path = typer.Argument(..., help="Where to write ca.pem, server.pem, server.key, "
                                                    "ca/ca.key."),
                   host: List[str] = typer.Option(["127.0.0.1", "localhost"], "--host",
                                                  help="Names/IPs the server certificate is valid for."),
                   days: int = typer.Option(30, help="Certificate lifetime in days."),
                   force: bool = typer.Option(False, "--force", help="Replace existing files.")):
    """A local CA + server certificate (use a real CA in production). Hand out only ca.pem."""
    try:
        paths = make_certs(directory, tuple(host), days, force)
    except CredentialError as e:
        _fail(e)
    typer.echo("\n".join(f"{k}: {v}" for k, v in paths.items()))
    typer.echo(f"hand {paths['ca']} to the client organisations; {paths['ca_key']} never leaves this machine")


@flower_app.command("make-node-key")
def cli_make_node_key(path: Path = typer.Argument(..., help="Private key path; the public key goes to PATH.pub."),
                      force: bool = typer.Option(False, "--force", help="Replace existing files.")):
    """A client operator: this SuperNode's authentication key pair (send PATH.pub to the server operator)."""
    try:
        priv, pub = make_node_key(path, force)
    except CredentialError as e:
        _fail(e)
    typer.echo(f"private (stays here, 0600): {priv}\npublic (send it to the server operator): {pub}")


@flower_app.command("register-node")
def cli_register_node(public_key: Path = typer.Argument(..., help="A client's PATH.pub."),
                      cid: str = typer.Option(..., "--cid", help="The client id this key is allowed to serve."),
                      superlink: str = typer.Option(f"127.0.0.1:{fc.CONTROL_PORT}",
                                                    help="The SuperLink's operator listener HOST:PORT."),
                      ca: Optional[Path] = typer.Option(None, help="TLS: the CA certificate. Required unless "
                                                        "--insecure."),
                      allow_list: Optional[Path] = typer.Option(None, help="Allow-list file (default "
                                                                "HOME/nodes.toml)."),
                      force: bool = typer.Option(False, "--force", help="Replace the key of an already "
                                                 "registered client id."),
                      home: Path = HOME_OPT, insecure: bool = INSECURE_OPT):
    """The server operator: allow the SuperNode holding the matching private key to serve client CID."""
    _connection(home, superlink, ca, insecure)
    try:
        node_id = fc.register_node(public_key, home, cid=cid, allow_list=allow_list, force=force)
    except CredentialError as e:
        _fail(e)
    typer.echo(f"registered {public_key} as client {cid} (node {node_id}) in "
               f"{allow_list or home / 'nodes.toml'}")
