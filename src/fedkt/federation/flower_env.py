"""The environment fedkt runs Flower in: never install dependencies at run time, never phone home.

:data:`FLOWER_ENV` is set in ``os.environ`` by :func:`set_flower_env` before any ``flwr`` import in fedkt
(``flwr`` reads some of these at import time: import fedkt's Flower modules before importing ``flwr``
yourself), and is passed to every Flower process fedkt starts (SuperLink, SuperNodes, ``flwr run``).
This module imports nothing from ``flwr``.
"""

from __future__ import annotations

import os

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no `uv sync` of a FAB's dependencies
    "FLWR_TELEMETRY_ENABLED": "0",  # no usage events sent to Flower Labs
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # no query for a newer flwr release
}


def set_flower_env() -> None:
    os.environ.update(FLOWER_ENV)


def flower_subprocess_env(**extra: str) -> dict[str, str]:
    """A copy of this process's environment with :data:`FLOWER_ENV` (and ``extra``) forced."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env.update(extra)
    return env
