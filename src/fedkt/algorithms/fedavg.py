"""FedAvg of LoRA adapters (McMahan et al. 2017), sample-weighted.

Per round t: the server broadcasts the global adapter θᵗ; each client sets it, fine-tunes E local
epochs on its private data and uploads its adapter with its example count; the server averages the
adapters weighted by example count. A and B matrices are averaged separately (as FATE-LLM and most LoRA
FL work do). With ``federation.secure_aggregation = true`` (FedAvg, and FedProx and FedCoLLM, which run
their clients' rounds through :func:`fit_round`) the server asks the federation for the weighted
mean itself (``Federation.aggregate``: SecAgg+ on Flower, so the server never sees a client's adapter; the
plain mean in process); the arithmetic is the same up to SecAgg+'s quantisation.
"""

from __future__ import annotations

import time

import torch

from fedkt import progress
from fedkt.clients import ClientContext
from fedkt.federation.base import Federation, Message, weighted_mean
from fedkt.models import get_adapter_state
from fedkt.privacy.policy import guard
from fedkt.registry import MethodSpec, register
from fedkt.rounds import RoundAlgorithm, RoundOutcome
from fedkt.train import sft


# ---------------------------------------------------------------------------------------------- client
def client_fit(ctx: ClientContext, msg: Message) -> Message:
    """Set the received adapter (or the common initial one), train ``epochs`` on local data, upload."""
    model = ctx.slm.use(msg.tensors or None)
    rnd = msg.meta.get("round", 0)
    stats = sft(model, ctx.slm.tokenizer, ctx.data, ctx.train, seed=ctx.seed_for("fit", rnd),
                epochs=msg.meta.get("epochs", ctx.train.epochs), desc=f"round {rnd} {ctx.cid} train")
    return Message(tensors=get_adapter_state(model),
                   meta={"num_examples": len(ctx.data), "loss": stats.mean_loss, "steps": stats.steps})


HANDLERS = {"fit": client_fit}


# ---------------------------------------------------------------------------------------------- server
def aggregate(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of adapter state dicts: Σ wᵢ θᵢ / Σ wᵢ, key by key (float64 accumulation); the
    federation's own mean (``weighted_mean``), bad inputs refused by ``check_mean_inputs``."""
    return weighted_mean(states, weights)


def fit_round(fed: Federation, global_state: dict[str, torch.Tensor], rnd: int, epochs: float,
              meta: dict | None = None, weighting: str = "samples", secure: bool = False) -> dict[str, torch.Tensor]:
    """Steps 1–3 of a FedAvg round: broadcast, local training, aggregation weighted by example count
    (``weighting="samples"``) or by 1/K (``"uniform"``); ``secure``: by the federation's secure
    aggregation (``Federation.aggregate``, same weights), so the server gets only the mean."""
    if weighting not in ("samples", "uniform"):
        raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
    msg = Message(tensors=global_state, meta={"round": rnd, "epochs": epochs, **(meta or {})})
    if secure:
        agg = fed.aggregate("fit", {cid: msg for cid in fed.clients}, rnd,
                            weight_key="num_examples" if weighting == "samples" else "", expect=global_state)
        progress.log(f"round {rnd}: client train loss {({c: round(m.get('loss', float('nan')), 4) for c, m in agg.meta.items()})} "
                     f"(securely aggregated over {len(agg.clients)} clients)")
        return agg.tensors
    replies = fed.broadcast("fit", msg, rnd, expect=global_state)  # replies checked against the adapter sent
    states = [r.tensors for r in replies.values()]
    weights = [r.meta["num_examples"] if weighting == "samples" else 1.0 for r in replies.values()]
    losses = {c: round(r.meta.get("loss", float("nan")), 4) for c, r in replies.items()}  # optional key
    progress.log(f"round {rnd}: client train loss {losses}")
    return aggregate(states, weights)


class FedAvg(RoundAlgorithm):
    roles = ("slm",)
    phases = ("client_train_s", "aggregate_s")

    def round(self, server, fed, state, rnd):
        t0 = time.perf_counter()
        theta = fit_round(fed, state["slm"], rnd, server.cfg.train.epochs,
                          secure=server.cfg.federation.secure_aggregation)
        client_s = fed.take_timing("fit")
        return RoundOutcome({"slm": theta},
                            timings={"client_train_s": client_s, "aggregate_s": time.perf_counter() - t0 - client_s})


register(MethodSpec(
    name="fedavg", label="FedAvg", rank=20, algorithm=FedAvg, handlers=guard("fedavg", HANDLERS),
    summary="clients fine-tune LoRA adapters, the server averages them (sample-weighted)"))
