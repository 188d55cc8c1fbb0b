"""Runtimes under test for the conformance suite. A runtime is a function
``make(handlers, num_clients, on_failure) -> Federation`` whose clients answer ``handlers``; a new runtime
(Flower) adds itself to ``RUNTIMES`` and must pass tests/test_runtime_conformance.py unchanged."""

from __future__ import annotations

from fedkt.clients import ClientContext
from fedkt.federation.local import LocalFederation


def make_local(handlers, num_clients: int = 2, on_failure: str = "stop"):
    return LocalFederation([ClientContext(f"c{i}") for i in range(num_clients)], handlers, on_failure)


RUNTIMES = {"local": make_local}
