"""fedkt's SuperLink process: Flower's SuperLink app on two listeners, the client-facing one Fleet-only.

flwr 1.41 serves its Fleet API (SuperNodes), Control API (``flwr run``/``ls``/``stop``/``supernode
register``) and Runtime API (ServerApp/SuperExec) from **one** FastAPI app on **one** listener
(``flwr/superlink/main.py``: ``include_router(control_router)``, ``fleet_router``, the runtime router;
``flower-superlink --host/--port``). ``--fleet-api-address`` and ``--control-api-address`` are
deprecated no-ops in 1.41 (they only start legacy gRPC servers when the internal
``FLWR_INTERNAL_GRPC_*`` variables are set) and ``--serverappio-api-address`` is refused. Without
Flower's enterprise login the Control API accepts every request, so a port that faces the clients
must not serve it: any client could ``flwr run`` its own code on the server and every SuperNode,
register its own node key or stop runs.

This module runs the *same* flwr app object (built by flwr's own ``create_app`` with flwr's own
argument parsing, middlewares, node authentication and lifespan) under two uvicorn servers in one
process:

* the **operator listener** on ``127.0.0.1:CONTROL_PORT`` (``--host``/``--port`` of flwr's parser, which
  must be a loopback address): every API; the SuperExec and the ServerApps reach the Runtime API
  here, the operator's ``flwr``/``fedkt flower run``/``register-node`` the Control API;
* the **Fleet listener** on ``--fleet-address HOST:PORT`` (faces the clients): the same app behind
  :class:`FleetOnly`, which passes requests whose path starts with ``/v1/fleet/`` and answers every
  other request ``403`` without calling the app (logged, with the peer address).

Both use the same TLS certificate. The lifespan (LinkState, SuperExec) runs once, on the operator
listener. Usage (what ``fedkt flower superlink`` runs)::

    python -m fedkt.federation.flower_link --fleet-address 0.0.0.0:9092 -- \\
        --host 127.0.0.1 --port 9093 --ssl-ca-certfile ... --enable-supernode-auth ...

This uses flwr internals (``flwr.superlink.cli.flower_superlink``, ``flwr.superlink.main.create_app``),
pinned by the ``flower`` extra's exact version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import ipaddress
import json
import logging
import signal
import sys

from fedkt.federation.flower_env import set_flower_env

FLEET_PREFIX = "/v1/fleet/"
log = logging.getLogger("fedkt.flower_link")


class FleetOnly:
    """ASGI wrapper: only Fleet API requests reach ``app``; anything else is refused with 403."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith(FLEET_PREFIX) \
                and ".." not in scope.get("path", ""):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "lifespan":  # the operator listener owns the lifespan
            return
        peer = scope.get("client") or ("?", 0)
        log.warning("fedkt: refused %s %s from %s:%s on the Fleet listener (only %s* is served here)",
                    scope.get("method", scope["type"]), scope.get("path", ""), peer[0], peer[1], FLEET_PREFIX)
        if scope["type"] != "http":
            return  # a websocket: closed unanswered
        body = json.dumps({"detail": "fedkt: only the Fleet API is served on this address"}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m fedkt.federation.flower_link",
                                description="Flower SuperLink with a Fleet-only client-facing listener")
    p.add_argument("--fleet-address", required=True, help="HOST:PORT the SuperNodes connect to")
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    return args, rest


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    args, flwr_args = _parse(sys.argv[1:] if argv is None else argv)
    fleet_host, fleet_port = _split(args.fleet_address)

    set_flower_env()
    # deferred: flwr reads FLOWER_ENV at import time, and importing this module must not import flwr
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package re-exports a function
    from flwr.superlink.main import create_app

    sys.argv = ["flower-superlink", *flwr_args]
    config = fs._parse_superlink_lifespan_config()
    if not ipaddress.ip_address(config.host).is_loopback:
        raise SystemExit(f"fedkt: the operator listener (--host {config.host}) must be a loopback address: "
                         "it serves the Control and Runtime APIs")
    if (fleet_host, fleet_port) == (config.host, config.port):
        raise SystemExit("fedkt: the Fleet listener and the operator listener need different ports")
    app = create_app(config, fs.SuperLinkLifespan)
    log_config = get_uvicorn_log_config(console_handler.level)
    tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}

    class Server(uvicorn.Server):
        def capture_signals(self):  # one handler below stops both servers
            return contextlib.nullcontext()

    operator = Server(uvicorn.Config(app, host=config.host, port=config.port, lifespan="on", workers=1,
                                     access_log=True, log_config=log_config, **tls))
    fleet = Server(uvicorn.Config(FleetOnly(app), host=fleet_host, port=fleet_port, lifespan="off", workers=1,
                                  access_log=True, log_config=log_config, **tls))
    log.setLevel(logging.INFO)
    log.addHandler(console_handler)
    log.info("fedkt: Control + Runtime API on %s:%s (operator only); Fleet API only on %s:%s (clients)",
             config.host, config.port, fleet_host, fleet_port)

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            operator.should_exit = fleet.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        op_task = asyncio.create_task(operator.serve())
        while not operator.started and not op_task.done():  # lifespan (state, SuperExec) up first
            await asyncio.sleep(0.05)
        fl_task = asyncio.create_task(fleet.serve())
        done, _ = await asyncio.wait({op_task, fl_task}, return_when=asyncio.FIRST_COMPLETED)
        stop()  # one listener ended (or failed to bind): end the other too
        await asyncio.gather(op_task, fl_task, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        if not (operator.started and fleet.started):
            raise SystemExit("fedkt: a SuperLink listener failed to start (port in use?)")

    asyncio.run(serve())


if __name__ == "__main__":
    main()
