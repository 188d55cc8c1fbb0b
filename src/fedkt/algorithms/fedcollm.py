"""FedCoLLM: federated co-tuning of a server LLM and the clients' SLMs (Fan et al., arXiv 2411.11707,
Algorithm 1).

Per round t = 1..T:
  1. the server broadcasts the global SLM adapter θᵗ to the K clients;
  2. each client sets θᵗ and fine-tunes it E epochs on its private data (task loss);
  3. clients upload; the server aggregates by FedAvg into θᵗ'⁰, sample-weighted or 1/K as in the
     paper's Algorithm 1 (``aggregation``; under secure aggregation when the runtime provides it: the
     server then only sees the weighted sum);
  4. on the auxiliary set Dᵃ the server runs R steps of *mutual* distillation between the LLM with its
     LoRA ω (f) and the SLM with θ (g), base weights frozen:
         L_g = CE(g) + λ·KL(f‖g)      (updates θ with lr η_θ)
         L_f = CE(f) + λ·KL(g‖f)      (updates ω with lr η_ω)
     KL at temperature T (scaled by T²), over the full vocabulary or the teacher's top-k logits;
  5. θᵗ⁺¹ = θᵗ'ᴿ goes back to the clients next round; ωᵗ⁺¹ stays on the server.

Where the paper (or FATE-LLM's reference code) chose differently from our defaults, its choice is a
``[fedcollm]`` option (:data:`PAPER_CHOICES`; docs/fedcollm.md relates each to the paper's equations):
``kl_direction`` (KL(teacher‖student) = "forward", the default and the reference code's, or "reverse"),
``kd_tokens`` (all tokens or answer tokens only), ``teacher_pass`` (teacher logits from the training
forward pass, LoRA dropout on, or from a separate no-dropout pass), ``temperature`` (T = 1 is the plain
KL), ``kd_reduction`` (token mean or token sum), ``update`` (simultaneous or the reference code's
sequential SLM-then-LLM order) and ``aggregation`` (sample-weighted or 1/K).

Design decision (step 4, ``update = "simultaneous"``): both updates of a step use the other model's
*start-of-step* outputs. Each model runs one forward pass on the batch; the teacher side of each KL is detached, so L_g's gradient
reaches θ only and L_f's reaches ω only, and the two updates are simultaneous (Jacobi), not sequential.
This costs one forward/backward per model per step and makes the step independent of update order.
The public FATE-LLM code takes the KL against logits that carry no gradient to the student and never
sends the distilled SLM back to clients; both are fixed here.

Optimizers for θ and ω are created fresh each round (no optimizer state crosses rounds), so a run
resumed from a round checkpoint equals an uninterrupted one.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args, get_origin, get_type_hints

import torch

from fedkt import progress
from fedkt.algorithms import fdkt
from fedkt.algorithms.fedavg import HANDLERS as FEDAVG_HANDLERS
from fedkt.algorithms.fedavg import fit_round
from fedkt.config import check, check_positive
from fedkt.data.collate import IGNORE, collate_sft
from fedkt.losses import answer_ce, kd_kl
from fedkt.models import get_adapter_state
from fedkt.privacy.policy import guard
from fedkt.registry import MethodSpec, register
from fedkt.rounds import RoundAlgorithm, RoundOutcome
from fedkt.seeds import derive_seed
from fedkt.train import batch_order, make_optimizer, seed_everything, tokenize_examples, trainable_parameters


@dataclass
class FedCoLLMConfig:
    """The ``[fedcollm]`` section."""

    aux_source: Literal["public", "fdkt"] = "public"
    """Dᵃ: ``public`` = the server's auxiliary set (``partition.aux_size`` examples); ``fdkt`` = the clients'
    DP synthetic data, filtered and augmented by the LLM (FDKT steps 1-3, ``[fdkt]`` settings): co-tuning
    without any server data, the whole run carrying the clients' (ε, δ)."""
    kd_steps: int = 20
    """R: optimizer steps of mutual distillation on the auxiliary set per round (per model)."""
    kd_lambda: float = 1.0
    temperature: float = 2.0
    """T: both distributions are softened by T and the KL is multiplied by T²; T = 1 is the plain KL."""
    top_k: int = 0
    """0: KL over the full vocabulary; k > 0: over the teacher's top-k logits (FATE default 128)."""
    lr_slm: float = 3e-4
    lr_llm: float = 3e-4
    batch_size: int = 8
    kd_tokens: Literal["all", "answer"] = "all"
    """Positions the KL is taken over: every non-padding token, or only the answer tokens."""
    kl_direction: Literal["forward", "reverse"] = "forward"
    """"forward": each model's KL is KL(teacher‖student) (the other model is the teacher); "reverse":
    KL(student‖teacher)."""
    kd_reduction: Literal["mean", "sum"] = "mean"
    """"mean": the KL averaged over the selected positions; "sum": summed over the batch's selected positions
    (the reference code's ``.sum()``; λ's weight then grows with the number of selected tokens)."""
    teacher_pass: Literal["train", "eval"] = "train"
    """Where the teacher side's logits come from: "train" reuses the training forward pass (LoRA dropout on:
    a noisy teacher); "eval" runs a separate no-gradient pass in eval mode (no dropout), one more forward
    per model per step."""
    update: Literal["simultaneous", "sequential"] = "simultaneous"
    """"simultaneous": each step updates θ and ω against each other's start-of-step outputs; "sequential"
    (the reference code's order): R steps of θ against the LLM, then R steps of ω against the distilled SLM."""
    aggregation: Literal["samples", "uniform"] = "samples"
    """FedAvg weights: clients' example counts, or 1/K each (the paper's Algorithm 1)."""

    def __post_init__(self):
        check_positive(self, "kd_steps", "batch_size", "temperature", "lr_slm", "lr_llm")
        check(self.kd_lambda >= 0, f"kd_lambda must be >= 0, got {self.kd_lambda}")
        check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        for name, tp in get_type_hints(type(self)).items():
            if get_origin(tp) is Literal:
                allowed = get_args(tp)
                check(getattr(self, name) in allowed,
                      f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")


PAPER_CHOICES: dict[str, object] = {
    "kl_direction": "forward",   # reference code: kl_div(log_softmax(own), other's probs) = KL(other‖own)
    "kd_tokens": "answer",       # reference code: loss_mask = labels != -100
    "teacher_pass": "eval",      # reference code: other model's logits from model.eval(), torch.no_grad()
    "temperature": 1.0,          # paper: plain KL; reference code: distill_temperature = 1.0, no T²
    "kd_reduction": "sum",       # reference code: kl_loss.sum() over the batch's selected positions
    "update": "sequential",      # reference code: LLM logits -> train SLM -> SLM logits -> train LLM
    "aggregation": "uniform",    # paper, Algorithm 1: θ = (1/K) Σ θ_k
}
"""The paper's (or, where the paper is silent, FATE-LLM's reference code's) choice for each option whose
default here differs or is a documented decision; ``--set fedcollm.KEY=VALUE`` selects one."""


# Clients do what FedAvg clients do (and, for ``aux_source = "fdkt"``, FDKT's DP synthesis); everything
# new happens on the server.
HANDLERS = {**FEDAVG_HANDLERS, **fdkt.CLIENT_HANDLERS}


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


@contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) inside the block, its previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@torch.no_grad()
def teacher_logits(model, inputs: dict[str, torch.Tensor], teacher_pass: str) -> torch.Tensor:
    """A separate, gradient-free forward pass of the teacher: in eval mode (``"eval"``: no dropout) or in
    whatever mode the model is in (``"train"``)."""
    if teacher_pass == "eval":
        with eval_mode(model):
            return model(**inputs).logits
    return model(**inputs).logits


def student_terms(student: torch.Tensor, teacher: torch.Tensor, batch: dict[str, torch.Tensor],
                  cfg: FedCoLLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of the student's logits on the answer tokens and its KD term against the (detached) teacher."""
    kl = kd_kl(student[:, :-1], teacher[:, :-1], kd_mask(batch, cfg.kd_tokens), cfg.temperature, cfg.top_k,
               cfg.kl_direction, cfg.kd_reduction)
    return answer_ce(student, batch["labels"]), kl


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def mutual_losses(slm, llm, batch: dict[str, torch.Tensor], cfg: FedCoLLMConfig) -> dict[str, torch.Tensor]:
    """L_g and L_f for one batch, from one forward pass of each model (start-of-step outputs).

    With ``teacher_pass = "eval"`` each KL's teacher side comes from a separate no-dropout pass instead."""
    inputs = model_inputs(batch)
    g = slm(**inputs).logits
    f = llm(**inputs).logits
    if cfg.teacher_pass == "eval":
        f_t, g_t = teacher_logits(llm, inputs, "eval"), teacher_logits(slm, inputs, "eval")
    else:
        f_t, g_t = f, g
    ce_g, kl_g = student_terms(g, f_t, batch, cfg)  # KL(f‖g) (forward): teacher f, detached
    ce_f, kl_f = student_terms(f, g_t, batch, cfg)  # KL(g‖f) (forward): teacher g, detached
    return {"loss_g": ce_g + cfg.kd_lambda * kl_g, "loss_f": ce_f + cfg.kd_lambda * kl_f,
            "ce_g": ce_g, "ce_f": ce_f, "kl_g": kl_g, "kl_f": kl_f}


def one_sided_losses(student, teacher, batch: dict[str, torch.Tensor], cfg: FedCoLLMConfig) -> dict[str, torch.Tensor]:
    """One model's loss against a frozen teacher (``update = "sequential"``): CE + λ·KL."""
    inputs = model_inputs(batch)
    ce, kl = student_terms(student(**inputs).logits, teacher_logits(teacher, inputs, cfg.teacher_pass), batch, cfg)
    return {"loss": ce + cfg.kd_lambda * kl, "ce": ce, "kl": kl}


def optimizer_step(params, opt, max_grad_norm: float) -> None:
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def mutual_distill(slm, llm, tok, aux, cfg: FedCoLLMConfig, max_length: int, max_grad_norm: float,
                   seed: int, desc: str = "distill") -> dict[str, float]:
    """Step 4: R updates of θ (in ``slm``) and R of ω (in ``llm``) on the auxiliary set, simultaneous or
    sequential (``cfg.update``)."""
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
    if cfg.update == "simultaneous":
        with progress.bar(desc, steps) as pb:
            for idx in batches:
                batch = collate_sft([data[i] for i in idx], tok.pad_token_id)
                losses = mutual_losses(slm, llm, batch, cfg)
                # θ and ω are disjoint and each teacher side is detached: one backward serves both losses.
                (losses["loss_g"] + losses["loss_f"]).backward()
                for params, opt in ((params_g, opt_g), (params_f, opt_f)):
                    optimizer_step(params, opt, max_grad_norm)
                for k in hist:
                    hist[k].append(losses[k].item())
                pb.advance(kl_g=hist["kl_g"][-1], kl_f=hist["kl_f"][-1])
    else:
        # the reference code's order: the SLM learns from the LLM, then the LLM from the distilled SLM
        with progress.bar(desc, 2 * steps) as pb:
            for student, teacher, params, opt, side in ((slm, llm, params_g, opt_g, "g"),
                                                        (llm, slm, params_f, opt_f, "f")):
                for idx in batches:
                    batch = collate_sft([data[i] for i in idx], tok.pad_token_id)
                    losses = one_sided_losses(student, teacher, batch, cfg)
                    losses["loss"].backward()
                    optimizer_step(params, opt, max_grad_norm)
                    for k in ("loss", "ce", "kl"):
                        hist[f"{k}_{side}"].append(losses[k].item())
                    pb.advance(**{f"kl_{side}": hist[f"kl_{side}"][-1]})
    slm.eval()
    llm.eval()
    out = {f"{k}_first": v[0] for k, v in hist.items() if v}
    out.update({f"{k}_mean": sum(v) / len(v) for k, v in hist.items() if v})
    out.update({f"{k}_last": v[-1] for k, v in hist.items() if v})
    out["steps"] = len(batches)
    return out


@torch.no_grad()
def kd_divergence(slm, llm, tok, examples, cfg: FedCoLLMConfig, max_length: int) -> dict[str, float]:
    """Mean KD terms on ``examples`` (no update): how far apart the two models are. ``kl_g`` is the SLM's
    (KL(f‖g) with ``kl_direction = "forward"``), ``kl_f`` the LLM's (KL(g‖f))."""
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
        self.aux, self.synthesis = server.aux, None
        if server.cfg.section("fedcollm").aux_source == "fdkt":
            syn = fdkt.synthesize(server, fed, server.cfg.section("fdkt"), rnd=1,
                                  cache=server.out / "fedcollm" / "synthetic_aux.json")
            if not syn.examples:
                raise ValueError(f"fedcollm.aux_source = 'fdkt': the clients' DP synthesis produced no usable "
                                 f"example (stages: {syn.record.get('stages')}); raise fdkt.samples_per_client or "
                                 f"use aux_source = 'public'")
            self.aux, self.synthesis = syn.examples, syn.record
            progress.log(f"fedcollm: auxiliary set = {len(self.aux)} DP synthetic examples (FDKT steps 1-3)")

    def round(self, server, fed, state, rnd):
        cfg, kd = server.cfg, server.cfg.section("fedcollm")
        # 1–3: broadcast θᵗ, local fine-tuning, FedAvg
        t0 = time.perf_counter()
        theta = fit_round(fed, state["slm"], rnd, cfg.train.epochs, weighting=kd.aggregation,
                          secure=cfg.federation.secure_aggregation)
        t1 = time.perf_counter()
        client_s = fed.take_timing("fit")
        # 4: mutual knowledge transfer on Dᵃ
        slm, llm = server.slm.use(theta), server.llm.use(state["llm"])
        stats = mutual_distill(slm, llm, server.slm.tokenizer, self.aux, kd, cfg.train.max_length,
                               cfg.train.max_grad_norm, seed=derive_seed(cfg.seed, "kd", rnd),
                               desc=f"round {rnd} server distill")
        theta, omega = get_adapter_state(slm), get_adapter_state(llm)
        g_term, f_term = ("KL(f‖g)", "KL(g‖f)") if kd.kl_direction == "forward" else ("KL(g‖f)", "KL(f‖g)")
        progress.log(f"round {rnd}: distill SLM's {g_term} {stats['kl_g_first']:.4f}->{stats['kl_g_last']:.4f}, "
                     f"LLM's {f_term} {stats['kl_f_first']:.4f}->{stats['kl_f_last']:.4f}")
        # 5: θᵗ⁺¹ goes to the clients at the next broadcast; ωᵗ⁺¹ stays here
        entry = {"distill": stats, **({"fdkt": self.synthesis} if rnd == 1 and self.synthesis else {})}
        return RoundOutcome({"slm": theta, "llm": omega}, entry=entry, logs={"llm": {"distill": stats}},
                            timings={"client_train_s": client_s, "aggregate_s": (t1 - t0) - client_s,
                                     "distill_s": time.perf_counter() - t1})


register(MethodSpec(
    name="fedcollm", label="FedCoLLM", rank=30, algorithm=FedCoLLM, handlers=guard("fedcollm", HANDLERS), config=FedCoLLMConfig,
    needs_llm=True,
    summary="FedAvg of SLM adapters + mutual LLM/SLM distillation on the server's auxiliary data"))
