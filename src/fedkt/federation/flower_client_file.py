"""A client operator's file: the private side of one SuperNode's client (its id, data files, model, workdir,
secret seed) and what it accepts from the server (``[policy]``), read on the client's own machine.

Used by ``fedkt flower supernode`` (:mod:`~fedkt.federation.flower_commands`) and by the deployed
ClientApp (:mod:`~fedkt.federation.flower_experiment`). This module imports nothing from ``flwr``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fedkt.config import ConfigError, from_dict
from fedkt.privacy.policy import ClientPolicy
from fedkt.privacy.randomness import check_secret_seed

CLIENT_KEYS = {"cid", "model", "data_files", "data_task", "workdir", "secret_seed"}


def load_client_file(path: str | Path) -> dict[str, Any]:
    """A client operator's file: a TOML ``[client]`` table with ``cid`` (required), ``data_files`` (JSONL
    paths on this machine), optional ``data_task``, ``model`` (default: the experiment's ``model.slm``),
    ``workdir`` (client state kept for resume; default ``./fedkt-client-<cid>``) and ``secret_seed``
    (≥ 64 bits; without it the client's privacy noise comes from the OS CSPRNG), and an optional
    ``[policy]`` table: what the client accepts from the server (docs/privacy.md)."""
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
        try:
            check_secret_seed(d["secret_seed"])
        except ValueError as e:
            raise ConfigError(f"client file {p}: {e}") from None
    base = p.parent
    d["data_files"] = [str((base / f).resolve()) for f in d.get("data_files", [])]
    d["workdir"] = str((base / d.get("workdir", f"fedkt-client-{d['cid']}")).resolve())
    return d


def client_policy(table: Any, path: Path) -> ClientPolicy:
    """The client file's ``[policy]`` table as a validated :class:`~fedkt.privacy.policy.ClientPolicy`
    (missing keys keep their safe defaults; docs/privacy.md#policy)."""
    if not isinstance(table, dict):
        raise ConfigError(f"client file {path}: [policy] must be a table")
    try:
        return from_dict(ClientPolicy, table, prefix="policy.")
    except ConfigError as e:
        raise ConfigError(f"client file {path}: {e}") from None
