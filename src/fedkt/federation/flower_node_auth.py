"""Server-side node identity and finite waits for :class:`~fedkt.federation.flower.FlowerFederation`.

* **Identity.** With SuperNode authentication the SuperLink accepts only nodes whose public key the
  operator registered, and gives each key a node id (``flwr supernode register``). A node's *client
  id*, though, is what the node says in its node config. The allow-list ``client id -> node id``
  (``fedkt flower register-node --cid``, :class:`~fedkt.federation.flower_credentials.AllowList`) binds
  the two: :func:`known_nodes` drops every node that is not on it (before anything is sent to it) and
  :func:`may_serve` refuses a node that claims a client id registered for another key. Both are logged.
* **Finite waits.** :func:`capped_timeout`: every exchange waits at most the per-call ``timeout``, and a
  call of round ``r`` (Flower ``group_id``) at most until ``r``'s deadline (``round_deadline`` seconds
  after round ``r``'s first exchange), so one hung node costs a round at most its deadline.
"""

from __future__ import annotations

import time
from typing import Any

from rich.markup import escape

from fedkt import progress


def known_nodes(node_ids: list[int], allowed: dict[str, int] | None) -> list[int]:
    """The node ids on the allow-list (all of them when there is none); the others are logged."""
    if allowed is None:
        return node_ids
    registered = set(allowed.values())
    for n in node_ids:
        if n not in registered:
            progress.log(f"[red]refused Flower node {n}: its key is not on the allow-list of any client "
                         "(fedkt flower register-node --cid ...); nothing is sent to it[/]")
    return [n for n in node_ids if n in registered]


def may_serve(node: int, cid: Any, allowed: dict[str, int] | None) -> bool:
    """Whether node ``node`` may serve client ``cid`` (it authenticated with ``cid``'s registered key)."""
    if allowed is None:
        return True
    if not isinstance(cid, str) or allowed.get(cid) != node:
        owner = next((c for c, n in allowed.items() if n == node), None)
        progress.log(f"[red]refused Flower node {node}: it claims client {escape(repr(cid))} but its key is "
                     f"registered for client {escape(repr(owner))}; fix its --node-config / client file, or "
                     "register its key for that client[/]")
        return False
    return True


def capped_timeout(timeout: float | None, messages: list, round_deadline: float | None,
                   round_start: dict[str, float]) -> float | None:
    """``timeout`` capped by the deadline of the round the messages carry (their ``group_id``)."""
    group = messages[0].metadata.group_id if messages else ""
    if round_deadline is None or not group:
        return timeout
    now = time.monotonic()
    left = max(0.0, round_start.setdefault(group, now) + round_deadline - now)
    return left if timeout is None else min(timeout, left)
