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
  5. θᵗ⁺¹ = θᵗ'ᴿ goes back to the clients next round; ωᵗ⁺¹ stays on the server. Optionally
     (``validation_fraction``, ``select = "best"``; :mod:`fedkt.algorithms.fedcollm_select`) each model keeps
     instead its best adapter on a held-out share of Dᵃ among the round's start and every
     ``select_every`` steps: per-round early stopping with the server's own data.

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
from fedkt.algorithms.fedcollm_select import Selector, checkpoints, round_slices, split_validation
from fedkt.config import check, check_positive
from fedkt.data.collate import IGNORE, collate_sft
from fedkt.data.prompts import with_format
from fedkt.devices import autocast, input_device
from fedkt.fedavg_round import FedAvgRound
from fedkt.losses import kd_kl
from fedkt.models import get_adapter_state
from fedkt.privacy.policy import guard
from fedkt.registry import MethodSpec, register
from fedkt.seeds import derive_seed
from fedkt.train import (LoopResult, batch_order, logits_at, make_optimizer, make_updater, place, run_loop,
                         seed_everything, tokenize_examples, trainable_parameters)


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
    """λ: weight of the distillation term against each model's own supervised loss."""
    temperature: float = 2.0
    """T: both distributions are softened by T and the KL is multiplied by T²; T = 1 is the plain KL."""
    top_k: int = 0
    """0: KL over the full vocabulary; k > 0: over the teacher's top-k logits (FATE default 128)."""
    lr_slm: float = 3e-4
    """η_θ: the SLM's learning rate during distillation."""
    lr_llm: float = 3e-4
    """η_ω: the LLM's learning rate during distillation."""
    batch_size: int = 8
    """Auxiliary examples per distillation step."""
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
    validation_fraction: float = 0.0
    """Share of the auxiliary set Dᵃ the server holds out (a seeded split, fixed for the run) to score both
    models while they distil; the distillation trains on the rest. 0: no validation, all of Dᵃ distils (the
    paper's). Scored at the round's start (the SLM's FedAvg aggregate, the LLM's previous adapter) and every
    ``select_every`` steps (docs/fedcollm.md, "Validation on Dᵃ")."""
    select: Literal["last", "best"] = "last"
    """Which adapter each model keeps after a round's distillation: "last" (after R steps, the paper's) or
    "best" (the best validation score among the scored ones, the round's start included: when distilling
    makes the SLM worse on validation, the clients get the FedAvg aggregate). "best" needs
    ``validation_fraction`` > 0."""
    select_every: int = 0
    """Score the models every this many distillation steps (and after the last); 0: at the start and after the
    last step only."""
    aux_schedule: Literal["whole", "fresh"] = "whole"
    """Which of Dᵃ's distillation examples each round distils on: "whole" = all of them every round (the
    paper's); "fresh" = Dᵃ (less the validation part) cut once into T disjoint seeded slices, round t distils
    on the t-th only, so later rounds do not fit answers earlier rounds have memorised (docs/fedcollm.md)."""

    def __post_init__(self):
        check_positive(self, "kd_steps", "batch_size", "temperature", "lr_slm", "lr_llm")
        check(self.kd_lambda >= 0, f"kd_lambda must be >= 0, got {self.kd_lambda}")
        check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        check(0 <= self.validation_fraction < 1,
              f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        check(self.select_every >= 0, f"select_every must be >= 0, got {self.select_every}")
        check(self.select == "last" or self.validation_fraction > 0,
              f"select = {self.select!r} picks by validation score: set validation_fraction > 0 (e.g. 0.25) "
              f"or select = 'last'")
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


def loss_positions(batch: dict[str, torch.Tensor], cfg: FedCoLLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the shifted positions the losses read: the KL's (``kd_mask``) and the answer tokens'
    (the CE's). Only these reach the models' LM heads (``logits_of``): padding and each row's last token never do."""
    need = kd_mask(batch, cfg.kd_tokens) | (batch["labels"][:, 1:] != IGNORE)
    return need.nonzero(as_tuple=True)


def logits_of(model, inputs: dict[str, torch.Tensor], pos: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``model``'s logits [N, V] for ``inputs`` at positions ``pos`` (see ``loss_positions``; the LM head runs
    on those hidden states only, ``train.logits_at``), computed on the model's device under autocast to its
    compute dtype and returned on the inputs' device: the two models may sit on different devices."""
    device = inputs["input_ids"].device
    target = input_device(model)
    inputs, rows, cols = place(inputs, target), pos[0].to(target), pos[1].to(target)
    with autocast(model):
        out = logits_at(model, rows, cols, **inputs)
        if out is None:  # no output embedding module to hook: full logits, then pick the positions
            out = model(**inputs).logits[rows, cols]
    return out.to(device)


@torch.no_grad()
def teacher_logits(model, inputs: dict[str, torch.Tensor], teacher_pass: str, pos) -> torch.Tensor:
    """A separate, gradient-free forward pass of the teacher: in eval mode (``"eval"``: no dropout) or in
    whatever mode the model is in (``"train"``)."""
    if teacher_pass == "eval":
        with eval_mode(model):
            return logits_of(model, inputs, pos)
    return logits_of(model, inputs, pos)


def student_terms(student: torch.Tensor, teacher: torch.Tensor, batch: dict[str, torch.Tensor],
                  cfg: FedCoLLMConfig, pos) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of the student's logits on the answer tokens and its KD term against the (detached) teacher.
    Logits are [N, V] at ``pos``; the sums equal those over full shifted logits with the masks applied."""
    kl = kd_kl(student[None], teacher[None], kd_mask(batch, cfg.kd_tokens)[pos][None], cfg.temperature, cfg.top_k,
               cfg.kl_direction, cfg.kd_reduction)
    target = batch["labels"][:, 1:][pos]
    ans = target != IGNORE
    return torch.nn.functional.cross_entropy(student[ans].float(), target[ans]), kl


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def mutual_losses(slm, llm, batch: dict[str, torch.Tensor], cfg: FedCoLLMConfig) -> dict[str, torch.Tensor]:
    """L_g and L_f for one batch, from one forward pass of each model (start-of-step outputs).

    With ``teacher_pass = "eval"`` each KL's teacher side comes from a separate no-dropout pass instead."""
    inputs, pos = model_inputs(batch), loss_positions(batch, cfg)
    g = logits_of(slm, inputs, pos)
    f = logits_of(llm, inputs, pos)
    if cfg.teacher_pass == "eval":
        f_t, g_t = teacher_logits(llm, inputs, "eval", pos), teacher_logits(slm, inputs, "eval", pos)
    else:
        f_t, g_t = f, g
    ce_g, kl_g = student_terms(g, f_t, batch, cfg, pos)  # KL(f‖g) (forward): teacher f, detached
    ce_f, kl_f = student_terms(f, g_t, batch, cfg, pos)  # KL(g‖f) (forward): teacher g, detached
    return {"loss_g": ce_g + cfg.kd_lambda * kl_g, "loss_f": ce_f + cfg.kd_lambda * kl_f,
            "ce_g": ce_g, "ce_f": ce_f, "kl_g": kl_g, "kl_f": kl_f}


def one_sided_losses(student, teacher, batch: dict[str, torch.Tensor], cfg: FedCoLLMConfig) -> dict[str, torch.Tensor]:
    """One model's loss against a frozen teacher (``update = "sequential"``): CE + λ·KL."""
    inputs, pos = model_inputs(batch), loss_positions(batch, cfg)
    ce, kl = student_terms(logits_of(student, inputs, pos), teacher_logits(teacher, inputs, cfg.teacher_pass, pos),
                           batch, cfg, pos)
    return {"loss": ce + cfg.kd_lambda * kl, "ce": ce, "kl": kl}


def mutual_distill(slm, llm, tok, aux, cfg: FedCoLLMConfig, max_length: int, max_grad_norm: float,
                   seed: int, desc: str = "distill", val=(), val_batch_size: int = 32) -> dict[str, float]:
    """Step 4: R updates of θ (in ``slm``) and R of ω (in ``llm``) on the auxiliary set, simultaneous or
    sequential (``cfg.update``); step functions over ``fedkt.train.run_loop``. With validation questions
    ``val`` each model is scored at its start and every ``cfg.select_every`` steps, and keeps its best
    adapter (``cfg.select = "best"``) or the last one (``fedcollm_select``)."""
    if not aux:
        raise ValueError("FedCoLLM needs an auxiliary dataset on the server: set partition.aux_size > 0")
    seed_everything(seed)
    data = tokenize_examples(tok, aux, max_length)
    params_g, params_f = trainable_parameters(slm), trainable_parameters(llm)
    opt_g, opt_f = make_optimizer(params_g, cfg.lr_slm), make_optimizer(params_f, cfg.lr_llm)
    steps = cfg.kd_steps
    batches = batch_order(len(data), cfg.batch_size, steps * cfg.batch_size / len(data), seed)[:steps]
    device = input_device(slm)
    ends = checkpoints(steps, cfg.select_every) if val else [steps]

    def batch_of(idx):
        return place(collate_sft([data[i] for i in idx], tok.pad_token_id), device)

    def selector(model, side):
        return Selector(model, tok, val, val_batch_size, f"{desc} validate {side}") if val else None

    def run_scored(step, models, label, show, sel):
        """``run_loop`` over the round's batches in pieces, ``sel`` offered the adapter before and after each."""
        hist: dict[str, list[float]] = {}
        start = 0
        for s in sel:
            s.offer(0)
        for end in ends:
            part = run_loop(batches[start:end], step, models, label, end - start, show=show).history
            for k, v in part.items():
                hist.setdefault(k, []).extend(v)
            for s in sel:
                s.offer(end)
            start = end
        if cfg.select == "best":
            for s in sel:
                s.keep_best()
        return hist

    sels = {"g": selector(slm, "g"), "f": selector(llm, "f")}
    if cfg.update == "simultaneous":
        upd = make_updater([slm, llm], [(params_g, opt_g), (params_f, opt_f)], max_grad_norm)

        def step(idx):
            losses = mutual_losses(slm, llm, batch_of(idx), cfg)
            # θ and ω are disjoint and each teacher side is detached: one backward serves both losses.
            upd.backward(losses["loss_g"] + losses["loss_f"])
            upd.step()
            return {k: v.item() for k, v in losses.items()}

        hist = run_scored(step, [slm, llm], desc, ("kl_g", "kl_f"), [s for s in sels.values() if s])
    else:
        # the reference code's order: the SLM learns from the LLM, then the LLM from the distilled (with
        # select = "best": the selected) SLM
        hist = {}
        for student, teacher, params, opt, side in ((slm, llm, params_g, opt_g, "g"), (llm, slm, params_f, opt_f, "f")):
            upd = make_updater([student], [(params, opt)], max_grad_norm)

            def step(idx, student=student, teacher=teacher, upd=upd, side=side):
                losses = one_sided_losses(student, teacher, batch_of(idx), cfg)
                upd.backward(losses["loss"])
                upd.step()
                return {f"{k}_{side}": v.item() for k, v in losses.items()}

            hist.update(run_scored(step, [slm, llm], f"{desc} ({side})", (f"kl_{side}",),
                                   [sels[side]] if sels[side] else []))
        hist = {k: hist[k] for k in ("loss_g", "loss_f", "ce_g", "ce_f", "kl_g", "kl_f")}
    out = LoopResult(hist, 0.0, len(batches)).summary()
    out["steps"] = len(batches)
    for side, sel in sels.items():
        if sel:
            out.update(sel.record(side, cfg.select))
    return out


class FedCoLLM(FedAvgRound):
    roles = ("slm", "llm")
    phases = ("client_train_s", "aggregate_s", "distill_s")

    def setup(self, server, fed):
        check_shared_vocabulary(server.slm.tokenizer, server.llm.tokenizer, server.slm.model, server.llm.model)
        self.aux, self.synthesis = server.aux, None
        if server.cfg.section(FedCoLLMConfig).aux_source == "fdkt":
            syn = fdkt.synthesize(server, fed, server.cfg.section(fdkt.FDKTConfig), rnd=1,
                                  cache=server.out / "fedcollm" / "synthetic_aux.json")
            if not syn.examples:
                raise ValueError(f"fedcollm.aux_source = 'fdkt': the clients' DP synthesis produced no usable "
                                 f"example (stages: {syn.record.get('stages')}); raise fdkt.samples_per_client or "
                                 f"use aux_source = 'public'")
            self.aux, self.synthesis = with_format(syn.examples, server.cfg.eval), syn.record
            progress.log(f"fedcollm: auxiliary set = {len(self.aux)} DP synthetic examples (FDKT steps 1-3)")
        kd = server.cfg.section(FedCoLLMConfig)
        self.aux, self.val = split_validation(self.aux, kd.validation_fraction, server.cfg.seed)
        if self.val:
            progress.log(f"fedcollm: {len(self.val)} of the auxiliary set's {len(self.aux) + len(self.val)} "
                         f"examples held out for validation (select = {kd.select!r})")
        self.slices = None
        if kd.aux_schedule == "fresh":
            rounds = server.cfg.federation.rounds
            self.slices = round_slices(self.aux, rounds, server.cfg.seed)
            progress.log(f"fedcollm: the {len(self.aux)} distillation examples cut into {rounds} fresh "
                         f"slices of {min(map(len, self.slices))}-{max(map(len, self.slices))}, one per round")

    def aux_of_round(self, rnd: int):
        """The distillation examples of round ``rnd`` (1-based): all of them, or that round's fresh slice."""
        return self.aux if self.slices is None else self.slices[rnd - 1]

    def weight_key(self, server):  # 1–3: FedAvg, sample-weighted or 1/K (the paper's Algorithm 1)
        return "" if server.cfg.section(FedCoLLMConfig).aggregation == "uniform" else "num_examples"

    def after_aggregate(self, server, fed, state, theta, rnd, out):
        # 4: mutual knowledge transfer on Dᵃ
        cfg, kd = server.cfg, server.cfg.section(FedCoLLMConfig)
        t1 = time.perf_counter()
        slm, llm = server.slm.use(theta), server.llm.use(state["llm"])
        stats = mutual_distill(slm, llm, server.slm.tokenizer, self.aux_of_round(rnd), kd, cfg.train.max_length,
                               cfg.train.max_grad_norm, seed=derive_seed(cfg.seed, "kd", rnd),
                               desc=f"round {rnd} server distill", val=self.val,
                               val_batch_size=cfg.eval.batch_size)
        g_term, f_term = ("KL(f‖g)", "KL(g‖f)") if kd.kl_direction == "forward" else ("KL(g‖f)", "KL(f‖g)")
        progress.log(f"round {rnd}: distill SLM's {g_term} {stats['kl_g_first']:.4f}->{stats['kl_g_last']:.4f}, "
                     f"LLM's {f_term} {stats['kl_f_first']:.4f}->{stats['kl_f_last']:.4f}")
        if self.val:
            progress.log(f"round {rnd}: validation acc SLM {stats['val_acc_g']} LLM {stats['val_acc_f']} at steps "
                         f"{stats['val_steps_g']}; kept step {stats['selected_step_g']} (SLM), "
                         f"{stats['selected_step_f']} (LLM)")
        # 5: θᵗ⁺¹ goes to the clients at the next broadcast; ωᵗ⁺¹ stays here
        out.state.update(slm=get_adapter_state(slm), llm=get_adapter_state(llm))
        out.entry.update(distill=stats, **({"fdkt": self.synthesis} if rnd == 1 and self.synthesis else {}))
        out.logs.setdefault("llm", {})["distill"] = stats
        out.timings["distill_s"] = time.perf_counter() - t1


register(MethodSpec(
    name="fedcollm", label="FedCoLLM", rank=30, algorithm=FedCoLLM, handlers=guard("fedcollm", HANDLERS), config=FedCoLLMConfig,
    needs_llm=True, supports_secure_aggregation=True,
    summary="FedAvg of SLM adapters + mutual LLM/SLM distillation on the server's auxiliary data"))
