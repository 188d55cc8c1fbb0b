"""Runtimes under test for the conformance suite. A runtime is a function
``make(handlers, num_clients, on_failure) -> Federation`` whose clients answer ``handlers``; a new runtime
(Flower) adds itself to ``RUNTIMES`` and must pass tests/test_runtime_conformance.py unchanged."""

from __future__ import annotations

from fedkt.clients import ClientContext
from fedkt.federation.local import LocalFederation


def make_local(handlers, num_clients: int = 2, on_failure: str = "stop"):
    return LocalFederation([ClientContext(f"c{i}") for i in range(num_clients)], handlers, on_failure)


RUNTIMES = {"local": make_local}


try:
    import flwr  # noqa: F401
except ImportError:  # the optional `flower` extra is not installed: the Flower runtime is not tested
    pass
else:
    from fedkt.federation.flower import FlowerFederation

    def make_flower(handlers, num_clients: int = 2, on_failure: str = "stop"):
        """Flower's in-process engine (no Ray): the same handlers behind a ClientApp, a Grid in between."""
        return FlowerFederation.in_process([f"c{i}" for i in range(num_clients)], handlers, on_failure=on_failure)

    RUNTIMES["flower"] = make_flower
