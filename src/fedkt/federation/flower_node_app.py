"""A SuperNode that runs only the ClientApp its organisation installed, never code shipped by the server.

Flower's SuperNode runs, for every message, ``flwr-clientapp``, which unpacks the run's FAB (the app
the server operator submitted with ``flwr run``) and imports its ClientApp: whoever can submit a run
executes code on every client machine. Flower's own answer (``flower-supernode --trusted-entities``)
accepts only FABs signed through Flower's hosted platform (``valid_license``), which an offline
deployment does not have.

fedkt's SuperNode (``fedkt flower supernode``) therefore puts this module in front of
``flwr-clientapp``: :func:`shim_dir` writes an executable named ``flwr-clientapp`` into a private
directory that goes first on the SuperNode's ``PATH`` (Flower's SuperExec starts the ClientApp process
by that name). It runs Flower's own ``run_clientapp`` with two steps replaced:

* **install** (``install_from_fab``): nothing is unpacked or installed; the FAB's files are compared
  with the files of the node's **trusted app directory** (``FEDKT_TRUSTED_APP``, written by the client
  organisation from its own fedkt installation: :func:`fedkt.federation.flower_app_files.write_app`).
  Every file must be byte-identical and no file may be missing or extra (``.info/`` excepted); else the
  message is answered with a Flower error naming the differing files, and the node logs it.
* **load** (``get_load_client_app_fn``): the ClientApp is imported from the trusted directory (and the
  node's installed packages), never from the FAB.

So a server that ships modified code gets an error reply and none of its code runs on the node. The
run's *configuration* (the experiment settings) still comes from the server, and the node checks
every request against its own policy (the client side of ``DESIGN.md``'s trust boundaries).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import stat
import sys
import tomllib
import zipfile
from pathlib import Path

from fedkt.federation.flower_env import set_flower_env

TRUSTED_APP_ENV = "FEDKT_TRUSTED_APP"


class UntrustedAppError(RuntimeError):
    """The run's app differs from the one this node's organisation installed."""


def fab_files(fab: bytes) -> dict[str, bytes]:
    """The files of a FAB (a zip), without Flower's ``.info/`` metadata."""
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        return {n: z.read(n) for n in z.namelist() if not n.startswith(".info/") and not n.endswith("/")}


def trusted_files(app_dir: str | Path) -> dict[str, bytes]:
    """The files Flower would ship for ``app_dir`` (built with flwr's own FAB builder)."""
    from flwr.cli.build import build_fab_from_disk  # deferred: this module is imported by flwr-free fedkt CLI code

    return fab_files(build_fab_from_disk(Path(app_dir)))


def check_fab(fab: bytes, app_dir: str | Path) -> None:
    """Raise :class:`UntrustedAppError` unless the FAB has exactly the trusted app's files."""
    want, got = trusted_files(app_dir), fab_files(fab)
    bad = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))
    if bad:
        detail = ", ".join(f"{n} ({'extra' if n not in want else 'missing' if n not in got else 'differs'})"
                           for n in bad[:10])
        raise UntrustedAppError(f"refused the run's app: it differs from this node's trusted app "
                                f"{Path(app_dir)} in {detail}; sha256 of the FAB "
                                f"{hashlib.sha256(fab).hexdigest()[:16]}. This node runs only the fedkt "
                                "ClientApp its organisation installed (same fedkt version as the server)")


def load_client_app(app_dir: str | Path):
    """Import the ClientApp named in ``app_dir/pyproject.toml`` from ``app_dir``."""
    d = Path(app_dir).resolve()
    ref = tomllib.loads((d / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]["clientapp"]
    module, _, attr = ref.partition(":")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def shim_dir(directory: str | Path, python: str | None = None) -> Path:
    """Write ``directory/flwr-clientapp`` (0700) running this module with ``python``; returns ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    exe = d / "flwr-clientapp"
    script = f'#!/bin/sh\nexec "{python or sys.executable}" -m fedkt.federation.flower_node_app "$@"\n'
    tmp = d / ".flwr-clientapp.tmp"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    with os.fdopen(fd, "w") as f:
        f.write(script)
    os.replace(tmp, exe)
    os.chmod(exe, stat.S_IRWXU)
    return d


def main() -> None:
    app_dir = os.environ.get(TRUSTED_APP_ENV)
    set_flower_env()  # before flwr is imported below (flwr reads it at import time)
    # by module path: the packages re-export functions of the same names as these modules
    flwr_clientapp = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    rc = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    if not app_dir or not (Path(app_dir) / "pyproject.toml").is_file():
        raise SystemExit(f"fedkt ClientApp runner: {TRUSTED_APP_ENV} must name the trusted app directory "
                         f"(got {app_dir!r}); start the node with `fedkt flower supernode`")

    def install_from_fab(fab_content: bytes, *args, **kwargs) -> Path:
        check_fab(fab_content, app_dir)
        return Path(app_dir)

    def get_load_client_app_fn(*args, **kwargs):
        return lambda *a, **k: load_client_app(app_dir)

    rc.install_from_fab = install_from_fab
    rc.get_load_client_app_fn = get_load_client_app_fn
    rc.get_project_dir = lambda *a, **k: Path(app_dir)
    flwr_clientapp.flwr_clientapp()


if __name__ == "__main__":
    main()
