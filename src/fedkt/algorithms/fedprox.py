"""FedProx (Li et al., MLSys 2020): FedAvg whose clients add a proximal term to their local objective.

Per round t: the server broadcasts θᵗ; client k minimises  L_k(θ) + μ/2 · ‖θ − θᵗ‖²  over its LoRA
adapter for E local epochs, which keeps heterogeneous clients from drifting far from the global model;
the server aggregates exactly as FedAvg (sample-weighted). μ = 0 is FedAvg, bit for bit (tested).

This module is the worked example of docs/adding-an-algorithm.md: a config section, one client handler,
a round step and one ``register`` call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedkt.algorithms.fedavg import fit_round
from fedkt.clients import ClientContext
from fedkt.config import check
from fedkt.federation.base import Message
from fedkt.losses import answer_ce
from fedkt.models import get_adapter_state
from fedkt.privacy.policy import guard
from fedkt.registry import MethodSpec, register
from fedkt.rounds import RoundAlgorithm, RoundOutcome
from fedkt.train import tokenize_examples, train_loop, trainable_parameters


@dataclass
class FedProxConfig:
    """The ``[fedprox]`` section."""

    mu: float = 0.01
    """Weight μ of the proximal term μ/2·‖θ − θᵗ‖² (0 = FedAvg)."""

    def __post_init__(self):
        check(self.mu >= 0, f"mu must be >= 0, got {self.mu}")


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """‖θ − θᵗ‖² over the adapter's parameters (θᵗ detached)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


# ---------------------------------------------------------------------------------------------- client
def client_fit(ctx: ClientContext, msg: Message) -> Message:
    """Set θᵗ, train on local data with the proximal term, upload the adapter and the example count."""
    model, tok = ctx.slm.use(msg.tensors or None), ctx.slm.tokenizer
    rnd, mu = msg.meta.get("round", 0), msg.meta["mu"]
    params = trainable_parameters(model)
    anchor = [p.detach().clone() for p in params]

    def loss_fn(m, b):
        ce = answer_ce(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        return ce + 0.5 * mu * proximal_term(params, anchor) if mu else ce

    stats = train_loop(model, tokenize_examples(tok, ctx.data, ctx.train.max_length), loss_fn, ctx.train,
                       seed=ctx.seed_for("fit", rnd), pad_id=tok.pad_token_id,
                       epochs=msg.meta.get("epochs", ctx.train.epochs), desc=f"round {rnd} {ctx.cid} train")
    return Message(tensors=get_adapter_state(model),
                   meta={"num_examples": len(ctx.data), "loss": stats.mean_loss, "steps": stats.steps})


# ---------------------------------------------------------------------------------------------- server
class FedProx(RoundAlgorithm):
    roles = ("slm",)
    phases = ("client_train_s", "aggregate_s")

    def round(self, server, fed, state, rnd):
        t0 = time.perf_counter()
        theta = fit_round(fed, state["slm"], rnd, server.cfg.train.epochs, meta={"mu": server.cfg.section(FedProxConfig).mu},
                          secure=server.cfg.federation.secure_aggregation)
        client_s = fed.take_timing("fit")
        return RoundOutcome({"slm": theta},
                            timings={"client_train_s": client_s, "aggregate_s": time.perf_counter() - t0 - client_s})


register(MethodSpec(
    name="fedprox", label="FedProx", rank=25, algorithm=FedProx, handlers=guard("fedprox", {"fit": client_fit}),
    config=FedProxConfig, summary="FedAvg with a proximal term μ/2·‖θ − θᵗ‖² in each client's objective"))
