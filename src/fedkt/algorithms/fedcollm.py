"""FedCoLLM: federated co-tuning of a server LLM and the clients' SLMs (Fan et al., arXiv 2411.11707,
Algorithm 1).

Per round t = 1..T:
  1. the server broadcasts the global SLM adapter θᵗ to the K clients;
  2. each client sets θᵗ and fine-tunes it E epochs on its private data (task loss);
  3. clients upload; the server aggregates by sample-weighted FedAvg into θᵗ'⁰ (under secure
     aggregation when the runtime provides it: the server then only sees the weighted sum);
  4. on the auxiliary set Dᵃ the server runs R steps of *mutual* distillation between the LLM with its
     LoRA ω (f) and the SLM with θ (g), base weights frozen:
         L_g = CE(g) + λ·KL(f‖g)      (updates θ with lr η_θ)
         L_f = CE(f) + λ·KL(g‖f)      (updates ω with lr η_ω)
     KL at temperature T (scaled by T²), over the full vocabulary or the teacher's top-k logits;
  5. θᵗ⁺¹ = θᵗ'ᴿ goes back to the clients next round; ωᵗ⁺¹ stays on the server.

Design decision (step 4): both updates of a step use the other model's *start-of-step* outputs. Each
model runs one forward pass on the batch; the teacher side of each KL is detached, so L_g's gradient
reaches θ only and L_f's reaches ω only, and the two updates are simultaneous (Jacobi), not sequential.
This costs one forward/backward per model per step and makes the step independent of update order.
The public FATE-LLM code takes the KL against logits that carry no gradient to the student and never
sends the distilled SLM back to clients; both are fixed here.

Optimizers for θ and ω are created fresh each round (no optimizer state crosses rounds), so a run
resumed from a round checkpoint equals an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from fedkt import progress
from fedkt.algorithms.fedavg import HANDLERS as FEDAVG_HANDLERS
from fedkt.algorithms.fedavg import fit_round
from fedkt.config import check, check_positive
from fedkt.data.collate import IGNORE, collate_sft
from fedkt.losses import answer_ce, kd_kl
from fedkt.models import get_adapter_state
from fedkt.registry import MethodSpec, register
from fedkt.rounds import RoundAlgorithm, RoundOutcome
from fedkt.seeds import derive_seed
from fedkt.train import batch_order, make_optimizer, seed_everything, tokenize_examples, trainable_parameters


@dataclass
class FedCoLLMConfig:
    """The ``[fedcollm]`` section."""

    kd_steps: int = 20
    """R: optimizer steps of mutual distillation on the auxiliary set per round."""
    kd_lambda: float = 1.0
    temperature: float = 2.0
    top_k: int = 0
    """0: KL over the full vocabulary; k > 0: over the teacher's top-k logits (FATE default 128)."""
    lr_slm: float = 3e-4
    lr_llm: float = 3e-4
    batch_size: int = 8
    kd_tokens: Literal["all", "answer"] = "all"
    """Positions the KL is taken over: every non-padding token, or only the answer tokens."""

    def __post_init__(self):
        check_positive(self, "kd_steps", "batch_size", "temperature", "lr_slm", "lr_llm")
        check(self.kd_lambda >= 0, f"kd_lambda must be >= 0, got {self.kd_lambda}")
        check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")


# Clients do exactly what FedAvg clients do; everything new happens on the server.
HANDLERS = FEDAVG_HANDLERS


def check_shared_vocabulary(slm_tok, llm_tok, slm, llm) -> None:
    """Token-level KD needs the two models to index the same vocabulary."""
    vs, vl = slm.get_output_embeddings().weight.shape[0], llm.get_output_embeddings().weight.shape[0]
    if vs != vl or slm_tok.get_vocab() != llm_tok.get_vocab():
        raise ValueError(
            f"FedCoLLM distils token distributions, so the SLM and LLM must share a tokenizer and vocabulary "
            f"(SLM vocab {vs}, LLM vocab {vl}). Derive a same-tokenizer SLM from the LLM with "
            f"`fedkt derive-slm` (see docs/derive-slm.md)."
        )


def kd_mask(batch: dict[str, torch.Tensor], kd_tokens: str) -> torch.Tensor:
    """Positions (aligned with shifted logits) that the KL is averaged over."""
    if kd_tokens == "answer":
        return batch["labels"][:, 1:] != IGNORE
    return batch["attention_mask"][:, 1:].bool()


def mutual_losses(slm, llm, batch: dict[str, torch.Tensor], cfg: FedCoLLMConfig) -> dict[str, torch.Tensor]:
    """L_g and L_f for one batch, from one forward pass of each model (start-of-step outputs)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    g = slm(**inputs).logits
    f = llm(**inputs).logits
    mask = kd_mask(batch, cfg.kd_tokens)
    ce_g, ce_f = answer_ce(g, batch["labels"]), answer_ce(f, batch["labels"])
    kl_g = kd_kl(g[:, :-1], f[:, :-1], mask, cfg.temperature, cfg.top_k)  # KL(f‖g): teacher f, detached
    kl_f = kd_kl(f[:, :-1], g[:, :-1], mask, cfg.temperature, cfg.top_k)  # KL(g‖f): teacher g, detached
    return {"loss_g": ce_g + cfg.kd_lambda * kl_g, "loss_f": ce_f + cfg.kd_lambda * kl_f,
            "ce_g": ce_g, "ce_f": ce_f, "kl_g": kl_g, "kl_f": kl_f}


def mutual_distill(slm, llm, tok, aux, cfg: FedCoLLMConfig, max_length: int, max_grad_norm: float,
                   seed: int, desc: str = "distill") -> dict[str, float]:
    """Step 4: R simultaneous updates of θ (in ``slm``) and ω (in ``llm``) on the auxiliary set."""
    if not aux:
        raise ValueError("FedCoLLM needs an auxiliary dataset on the server: set partition.aux_size > 0")
    seed_everything(seed)
    data = tokenize_examples(tok, aux, max_length)
    params_g, params_f = trainable_parameters(slm), trainable_parameters(llm)
    opt_g, opt_f = make_optimizer(params_g, cfg.lr_slm), make_optimizer(params_f, cfg.lr_llm)
    steps = cfg.kd_steps
    epochs = steps * cfg.batch_size / len(data)
    batches = batch_order(len(data), cfg.batch_size, epochs, seed)[:steps]
    slm.train()
    llm.train()
    hist: dict[str, list[float]] = {k: [] for k in ("loss_g", "loss_f", "ce_g", "ce_f", "kl_g", "kl_f")}
    with progress.bar(desc, steps) as pb:
        for idx in batches:
            batch = collate_sft([data[i] for i in idx], tok.pad_token_id)
            losses = mutual_losses(slm, llm, batch, cfg)
            # θ and ω are disjoint and each teacher side is detached: one backward serves both losses.
            (losses["loss_g"] + losses["loss_f"]).backward()
            for params, opt in ((params_g, opt_g), (params_f, opt_f)):
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            for k in hist:
                hist[k].append(losses[k].item())
            pb.advance(kl_g=hist["kl_g"][-1], kl_f=hist["kl_f"][-1])
    slm.eval()
    llm.eval()
    out = {f"{k}_first": v[0] for k, v in hist.items() if v}
    out.update({f"{k}_mean": sum(v) / len(v) for k, v in hist.items() if v})
    out.update({f"{k}_last": v[-1] for k, v in hist.items() if v})
    out["steps"] = len(batches)
    return out


@torch.no_grad()
def kd_divergence(slm, llm, tok, examples, cfg: FedCoLLMConfig, max_length: int) -> dict[str, float]:
    """Mean KL(f‖g) and KL(g‖f) on ``examples`` (no update): how far apart the two models are."""
    data = tokenize_examples(tok, examples, max_length)
    tot = {"kl_g": 0.0, "kl_f": 0.0}
    n = 0
    for s in range(0, len(data), cfg.batch_size):
        batch = collate_sft(data[s:s + cfg.batch_size], tok.pad_token_id)
        losses = mutual_losses(slm, llm, batch, cfg)
        for k in tot:
            tot[k] += losses[k].item() * len(batch["input_ids"])
        n += len(batch["input_ids"])
    return {k: v / n for k, v in tot.items()}


class FedCoLLM(RoundAlgorithm):
    roles = ("slm", "llm")
    phases = ("client_train_s", "aggregate_s", "distill_s")

    def setup(self, server, fed):
        check_shared_vocabulary(server.slm.tokenizer, server.llm.tokenizer, server.slm.model, server.llm.model)

    def round(self, server, fed, state, rnd):
        cfg, kd = server.cfg, server.cfg.section("fedcollm")
        # 1–3: broadcast θᵗ, local fine-tuning, FedAvg
        t0 = time.perf_counter()
        theta = fit_round(fed, state["slm"], rnd, cfg.train.epochs)
        t1 = time.perf_counter()
        client_s = fed.take_timing("fit")
        # 4: mutual knowledge transfer on Dᵃ
        slm, llm = server.slm.use(theta), server.llm.use(state["llm"])
        stats = mutual_distill(slm, llm, server.slm.tokenizer, server.aux, kd, cfg.train.max_length,
                               cfg.train.max_grad_norm, seed=derive_seed(cfg.seed, "kd", rnd),
                               desc=f"round {rnd} server distill")
        theta, omega = get_adapter_state(slm), get_adapter_state(llm)
        progress.log(f"round {rnd}: distill KL(f‖g) {stats['kl_g_first']:.4f}->{stats['kl_g_last']:.4f} "
                     f"KL(g‖f) {stats['kl_f_first']:.4f}->{stats['kl_f_last']:.4f}")
        # 5: θᵗ⁺¹ goes to the clients at the next broadcast; ωᵗ⁺¹ stays here
        return RoundOutcome({"slm": theta, "llm": omega}, entry={"distill": stats}, logs={"llm": {"distill": stats}},
                            timings={"client_train_s": client_s, "aggregate_s": (t1 - t0) - client_s,
                                     "distill_s": time.perf_counter() - t1})


register(MethodSpec(
    name="fedcollm", label="FedCoLLM", rank=30, algorithm=FedCoLLM, handlers=HANDLERS, config=FedCoLLMConfig,
    needs_llm=True,
    summary="FedAvg of SLM adapters + mutual LLM/SLM distillation on the server's auxiliary data"))
