"""The FedAvg-style round every averaging method shares: send the global adapter to the round's clients,
they train, the server takes the weighted mean of their adapters, then (optionally) does more with it.

FedAvg, FedProx, FedAvgM, FedCoLLM and FedCoT are :class:`FedAvgRound` with some hooks overridden. The base
round owns what no method should re-implement:

- **client sampling**: ``federation.clients_per_round`` clients, drawn by :func:`sample_clients` from the
  experiment seed and the round number (so a resumed run draws the same clients as an uninterrupted one);
  the mean is over the sampled clients' replies, with their own weights;
- **secure aggregation**: with ``federation.secure_aggregation = true`` the mean comes from
  :meth:`Federation.aggregate <fedkt.federation.base.Federation.aggregate>` (Flower: SecAgg+, the server
  never sees one client's adapter; in process: the same mean in the clear), else from the replies
  (:func:`~fedkt.federation.base.weighted_mean`). A hook only ever sees the mean, so a method built on
  these hooks supports secure aggregation with no code of its own (its ``MethodSpec`` says so:
  ``supports_secure_aggregation = True``);
- **timing**: ``client_train_s`` (the clients' call) and ``aggregate_s`` (the server's mean).

Hooks, in the order a round calls them: :meth:`~FedAvgRound.before_round` (e.g. FedCoT's round-1 prompt
exchange), :meth:`~FedAvgRound.client_request` / :meth:`~FedAvgRound.client_requests` (what each client is
sent), :meth:`~FedAvgRound.weight_key` (sample-weighted or 1/K), then :meth:`~FedAvgRound.after_aggregate`
(the new state from the mean: FedAvg takes it, FedAvgM adds momentum, FedCoLLM distils), or, for a round
whose clients keep their adapters (:meth:`~FedAvgRound.aggregates` false: FedCoT's paper mode),
:meth:`~FedAvgRound.after_replies`.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import torch

from fedkt import progress
from fedkt.federation.base import Message, weighted_mean
from fedkt.rounds import Adapter, RoundAlgorithm, RoundOutcome
from fedkt.seeds import derive_seed

if TYPE_CHECKING:
    from fedkt.federation.base import Federation
    from fedkt.server import ServerContext


def sample_clients(clients: list[str], seed: int, rnd: int, per_round: int) -> list[str]:
    """The clients of round ``rnd``: all of them when ``per_round`` is 0 or covers them, else ``per_round``
    drawn without replacement by a generator seeded from (``seed``, ``rnd``) alone, kept in the
    federation's order (so the mean sums in the same order on every runtime and on resume)."""
    if not per_round or per_round >= len(clients):
        return list(clients)
    if per_round < 1:
        raise ValueError(f"federation.clients_per_round = {per_round}; it must be >= 1 (or 0 for all clients)")
    chosen = set(random.Random(derive_seed(seed, "clients_per_round", rnd)).sample(range(len(clients)), per_round))
    return [c for i, c in enumerate(clients) if i in chosen]


def federated_mean(fed: "Federation", method: str, payloads: dict[str, Message], rnd: int, expect: Adapter,
                   weight_key: str = "num_examples", secure: bool = False) -> Adapter:
    """Run client handler ``method`` on the addressed clients and return the weighted mean of the adapters
    they reply (weight ``reply.meta[weight_key]``; ``""``: 1/K): by the federation's secure aggregation
    when ``secure`` (the server gets only the mean), else from the replies. Replies are checked against
    ``expect`` (the adapter sent: names, shapes, dtypes)."""
    if secure:
        agg = fed.aggregate(method, payloads, rnd, weight_key=weight_key, expect=expect)
        _log_losses(rnd, agg.meta, f" (securely aggregated over {len(agg.clients)} clients)")
        return agg.tensors
    replies = fed.call(method, payloads, rnd, expect=expect)
    weights = [r.meta[weight_key] if weight_key else 1.0 for r in replies.values()]
    _log_losses(rnd, {c: r.meta for c, r in replies.items()})
    return weighted_mean([r.tensors for r in replies.values()], weights)


def _log_losses(rnd: int, metas: dict[str, dict], note: str = "") -> None:
    """The clients' train losses (an optional reply key) in the progress log."""
    if any("loss" in m for m in metas.values()):
        losses = {c: round(m.get("loss", float("nan")), 4) for c, m in metas.items()}
        progress.log(f"round {rnd}: client train loss {losses}{note}")


class FedAvgRound(RoundAlgorithm):
    """One FedAvg-style round of the ``"slm"`` adapter; subclasses override hooks, not :meth:`round`."""

    roles: tuple[str, ...] = ("slm",)
    phases: tuple[str, ...] = ("client_train_s", "aggregate_s")
    client_method = "fit"
    """The client handler each round calls."""

    # -- hooks -----------------------------------------------------------------------------------------
    def before_round(self, server: "ServerContext", fed: "Federation", state: dict[str, Adapter], rnd: int,
                     out: RoundOutcome) -> None:
        """Before the clients are called (may add to ``out.entry``/``out.timings``)."""

    def client_request(self, server: "ServerContext", state: dict[str, Adapter], rnd: int) -> Message:
        """What every client is sent: the global adapter, the round and the local epochs."""
        return Message(tensors=state["slm"], meta={"round": rnd, "epochs": server.cfg.train.epochs})

    def client_requests(self, server: "ServerContext", state: dict[str, Adapter], rnd: int,
                        clients: list[str]) -> dict[str, Message]:
        """Each client's request (default: the same :meth:`client_request` to all)."""
        msg = self.client_request(server, state, rnd)
        return {c: msg for c in clients}

    def weight_key(self, server: "ServerContext") -> str:
        """The reply meta key that weights a client in the mean (``""``: 1/K each)."""
        return "num_examples"

    def aggregates(self, server: "ServerContext") -> bool:
        """Whether the clients' adapters are averaged this run (false: they keep them; see after_replies)."""
        return True

    def after_aggregate(self, server: "ServerContext", fed: "Federation", state: dict[str, Adapter],
                        mean: Adapter, rnd: int, out: RoundOutcome) -> None:
        """Set the round's new state from the clients' mean (default: θᵗ⁺¹ = the mean)."""
        out.state["slm"] = mean

    def after_replies(self, server: "ServerContext", fed: "Federation", replies: dict[str, Message], rnd: int,
                      out: RoundOutcome) -> None:
        """When :meth:`aggregates` is false: use the clients' replies (no adapter among them)."""

    # -- the round -------------------------------------------------------------------------------------
    def round(self, server, fed, state, rnd):
        out = RoundOutcome(dict(state))
        f = server.cfg.federation
        clients = sample_clients(fed.clients, server.cfg.seed, rnd, f.clients_per_round)
        if len(clients) < len(fed.clients):
            out.entry["sampled_clients"] = clients
            out.logs[self.roles[0]] = {"sampled_clients": clients}
        self.before_round(server, fed, state, rnd, out)
        payloads = self.client_requests(server, state, rnd, clients)
        t0 = time.perf_counter()
        if not self.aggregates(server):
            replies = fed.call(self.client_method, payloads, rnd)
            out.timings.update(client_train_s=fed.take_timing(self.client_method), aggregate_s=0.0)
            self.after_replies(server, fed, replies, rnd, out)
            return out
        mean = federated_mean(fed, self.client_method, payloads, rnd, state["slm"], self.weight_key(server),
                              secure=f.secure_aggregation)
        client_s = fed.take_timing(self.client_method)
        out.timings.update(client_train_s=client_s, aggregate_s=time.perf_counter() - t0 - client_s)
        self.after_aggregate(server, fed, state, mean, rnd, out)
        return out


def zeros_like(adapter: Adapter) -> Adapter:
    """An adapter of zeros (e.g. a server optimizer's initial state, carried in the round state)."""
    return {k: torch.zeros_like(v) for k, v in adapter.items()}
