"""FedAvg of LoRA adapters (McMahan et al. 2017), sample-weighted.

Per round t: the server broadcasts the global adapter θᵗ; each client sets it, fine-tunes E local
epochs on its private data and uploads its adapter with its example count; the server averages the
adapters weighted by example count. A and B matrices are averaged separately (as FATE-LLM and most LoRA
FL work do). FedAvg is the shared round (:class:`~fedkt.fedavg_round.FedAvgRound`) with no hook
overridden; that round owns client sampling, secure aggregation (``federation.secure_aggregation = true``:
the server gets only the mean, SecAgg+ on Flower) and timing.
"""

from __future__ import annotations

import torch

from fedkt.clients import ClientContext
from fedkt.fedavg_round import FedAvgRound, federated_mean
from fedkt.federation.base import Federation, Message, weighted_mean
from fedkt.models import get_adapter_state
from fedkt.privacy.policy import guard
from fedkt.registry import MethodSpec, register
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
    """Steps 1–3 of a FedAvg round over all clients, outside the round driver: broadcast, local training,
    the mean weighted by example count (``weighting="samples"``) or 1/K (``"uniform"``); ``secure``: by the
    federation's secure aggregation (:func:`~fedkt.fedavg_round.federated_mean`)."""
    if weighting not in ("samples", "uniform"):
        raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
    msg = Message(tensors=global_state, meta={"round": rnd, "epochs": epochs, **(meta or {})})
    return federated_mean(fed, "fit", {cid: msg for cid in fed.clients}, rnd, global_state,
                          "num_examples" if weighting == "samples" else "", secure=secure)


class FedAvg(FedAvgRound):
    """The base round as it is: θᵗ⁺¹ = the (sample-weighted) mean of the clients' adapters."""


register(MethodSpec(
    name="fedavg", label="FedAvg", rank=20, algorithm=FedAvg, handlers=guard("fedavg", HANDLERS),
    supports_secure_aggregation=True,
    summary="clients fine-tune LoRA adapters, the server averages them (sample-weighted)"))
