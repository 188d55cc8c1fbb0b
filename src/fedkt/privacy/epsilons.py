"""Per-client ε of the methods whose clients spend a privacy budget (FedCoT's text DP, FDKT's DP-SGD).

Both sections hold ``epsilon`` (every client's, by default) and ``client_epsilons`` (client i gets entry
i); one function turns them into each client's target, checked against the federation's clients."""

from __future__ import annotations

from typing import Sequence


def per_client(section: str, epsilon: float, client_epsilons: Sequence[float], clients: Sequence[str]
               ) -> dict[str, float]:
    """Client → its target ε: ``client_epsilons[i]`` for the i-th client, else ``epsilon`` for all."""
    if client_epsilons and len(client_epsilons) != len(clients):
        raise ValueError(f"{section}.client_epsilons lists {len(client_epsilons)} values for {len(clients)} "
                         f"clients; give one per client or none")
    return {c: (client_epsilons[i] if client_epsilons else epsilon) for i, c in enumerate(clients)}
