"""Per-method rows of ``fedkt plan``: which role trains, how many optimizer steps, what crosses the wire.

Mirrors each method's code: FedAvg/FedProx/FedCoLLM clients run ``train.sft`` for ``train.epochs`` per
round and exchange the adapter both ways; FedCoLLM's server runs ``kd_steps`` of mutual distillation with
both models; standalone/FDKT clients train ``epochs × rounds`` once and send metrics (FDKT: also DP-SGD
and synthetic samples); FedCoT exchanges texts in round 1 (adapters too with ``share_adapters``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedkt.algorithms.fdkt import FDKTConfig
from fedkt.algorithms.fedcollm import FedCoLLMConfig
from fedkt.algorithms.fedcot import FedCoTConfig
from fedkt.plan_memory import (KD_LOGIT_COPIES, SFT_LOGIT_COPIES, Options, activation_bytes, dtype_bytes,
                               inference_bytes, weight_bytes)

# ``ModelFacts`` (in annotations) is fedkt.plan.ModelFacts, not imported: fedkt.plan imports this module.

SECAGG_BYTES_PER_VALUE = 8
"""SecAgg+ uploads each adapter value as a masked 64-bit integer (docs/deployment.md measured ~2x plain bytes)."""
ADAM_STATES = 2
"""AdamW keeps two fp32 moments per trainable parameter (``train.make_optimizer``)."""
PLANNED = ("zero_shot", "standalone", "fedavg", "fedprox", "fedcollm", "fedcot", "fdkt", "centralized")
"""Methods :mod:`fedkt.plan_methods` models one by one."""
BYTES_PER_TOKEN_TEXT = 4
"""Rough UTF-8 bytes per generated token, for text messages (FedCoT rationales, FDKT samples)."""


def sft_steps(n: int, train, epochs: float) -> int:
    """Optimizer steps of ``train.train_loop`` over ``n`` examples for ``epochs``."""
    batches = max(1, math.ceil(math.ceil(n / train.batch_size) * epochs))
    steps = math.ceil(batches / train.grad_accum)
    return min(steps, train.max_steps) if train.max_steps > 0 else steps


@dataclass
class Row:
    """One role of one method."""

    role: str
    where: str
    """"server" or "client" (each client)."""
    steps_per_round: int | str = 0
    steps_total: int = 0
    down_per_round: int = 0
    """Bytes the server sends one client per round (0 for server roles)."""
    up_per_round: int = 0
    peak: dict[str, int] = field(default_factory=dict)
    """Peak memory estimate by part: weights, states (adapter + gradients + AdamW), activations."""
    approx_bytes: bool = False
    """Bytes are text and estimated (FedCoT, FDKT)."""
    per_client_steps: list[int] = field(default_factory=list)
    """Client rows: each client's optimizer steps per round (per run for one-shot methods)."""

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "where": self.where, "steps_per_round": self.steps_per_round,
                "steps_total": self.steps_total, "down_bytes_per_round": self.down_per_round,
                "up_bytes_per_round": self.up_per_round, "bytes_estimated": self.approx_bytes,
                "peak_bytes": sum(self.peak.values()), "peak_parts": dict(self.peak),
                **({"per_client_steps": list(self.per_client_steps)} if self.per_client_steps else {})}


def states(m: ModelFacts, extra_copies: int = 0) -> int:
    """Adapter + its gradients + AdamW moments (+ ``extra_copies`` more adapter-sized buffers), fp32."""
    return 4 * m.trainable * (2 + ADAM_STATES + extra_copies)


FEW_SHOT_PROMPT_TOKENS = 256
"""FedCoT's teacher prompt (system + two worked examples) before the client's question, roughly."""


def _span(values: list[int]) -> int | str:
    lo, hi = min(values), max(values)
    return lo if lo == hi else f"{lo}-{hi}"


class _Ctx:
    def __init__(self, cfg, models: dict[str, ModelFacts], sizes: list[int], aux: int, opts: Options):
        self.cfg, self.models, self.sizes, self.aux, self.opts = cfg, models, sizes, aux, opts
        self.slm, self.llm = models["slm"], models.get("llm")
        self.S = opts.seq_len

    def act(self, m: ModelFacts) -> int:
        return dtype_bytes(self.opts.dtype_of(m.role))

    def train_act(self, m: ModelFacts, batch: int, copies: int = SFT_LOGIT_COPIES, seqs: int = 1,
                  seq_len: int = 0, answers: bool = False) -> int:
        """``answers``: answer-only SFT (``train.answer_loss``), the LM head on the supervised positions only."""
        at = batch * self.opts.answer_len if answers and self.opts.answer_len else None
        return activation_bytes(m.arch, batch * (seq_len or self.S) * seqs, self.act(m),
                                self.opts.gradient_checkpointing, copies, at)

    def eval_act(self, m: ModelFacts) -> int:
        """Evaluation's transient bytes: its activations, plus with ``eval.precision = "bf16-checked"`` on an
        fp32 model the bf16 copy of the decoder's linear layers (``fedkt.eval_checked.bf16_copy``)."""
        copy = 2 * m.quantizable if self.cfg.eval.precision == "bf16-checked" and self.act(m) == 4 \
            and not self.opts.four_bit(m.role) else 0
        return inference_bytes(m.arch, self.cfg.eval.batch_size, self.S, self.act(m)) + copy

    def adapter_up(self, m: ModelFacts) -> int:
        return SECAGG_BYTES_PER_VALUE * m.trainable if self.cfg.federation.secure_aggregation else m.adapter_bytes

    def client_fit(self, extra_copies: int = 0, epochs: float | None = None, per_round: bool = True,
                   exchange: bool = True, answers: bool = True) -> Row:
        """``answers``: the clients train by ``train.sft`` (answer-only logits); FedProx's loss takes full logits."""
        t, R = self.cfg.train, self.cfg.federation.rounds
        e = t.epochs if epochs is None else epochs
        steps = [sft_steps(n, t, e) for n in self.sizes]
        return Row("client SLM", "client", _span(steps) if per_round else "–",
                   sum(steps) * (R if per_round else 1),
                   self.slm.adapter_bytes if exchange else 0, self.adapter_up(self.slm) if exchange else 0,
                   {"weights": weight_bytes(self.slm, self.opts), "states": states(self.slm, extra_copies),
                    "activations": max(self.train_act(self.slm, t.batch_size, answers=answers),
                                       self.eval_act(self.slm))},
                   per_client_steps=steps)

    def server_eval(self, m: ModelFacts, buffers: int = 0) -> Row:
        """A server model that only evaluates (and, with ``buffers`` adapters, aggregates)."""
        return Row(f"server {m.role.upper()}", "server", 0, 0, 0, 0,
                   {"weights": weight_bytes(m, self.opts), "states": 4 * m.trainable * (1 + buffers),
                    "activations": self.eval_act(m)})

    def server_train(self, m: ModelFacts, steps: int, batch: int, copies: int, per_round: int | str = "–",
                     seq_len: int = 0, answers: bool = False) -> Row:
        return Row(f"server {m.role.upper()}", "server", per_round, steps, 0, 0,
                   {"weights": weight_bytes(m, self.opts), "states": states(m),
                    "activations": max(self.train_act(m, batch, copies, seq_len=seq_len, answers=answers),
                                       self.eval_act(m))})

    def server_generate(self, m: ModelFacts, batch: int, length: int) -> Row:
        if m.served:
            return Row("server LLM (served)", "server", 0, 0, 0, 0, {})
        return Row("server LLM", "server", 0, 0, 0, 0,
                   {"weights": weight_bytes(m, self.opts), "states": 0,
                    "activations": inference_bytes(m.arch, batch, length, self.act(m))})


def method_rows(name: str, cfg, models: dict[str, ModelFacts], sizes: list[int], aux: int,
                opts: Options) -> tuple[list[Row], dict[str, int]]:
    """(rows, transient): the rows of ``name`` and, per process ("server", "client"), the bytes beyond the
    resident weights at its busiest phase (roles busy at the same time summed)."""
    c = _Ctx(cfg, models, sizes, aux, opts)
    K, R, t = len(sizes), cfg.federation.rounds, cfg.train
    rows: list[Row]
    together: list[Row] = []  # server rows busy at the same time
    if name == "zero_shot":
        rows = [c.server_eval(c.slm)] + ([c.server_eval(c.llm)] if c.llm and not c.llm.served else [])
    elif name == "standalone":
        rows = [c.client_fit(epochs=t.epochs * R, per_round=False, exchange=False)]
    elif name in ("fedavg", "fedprox"):
        rows = [c.client_fit(extra_copies=1 if name == "fedprox" else 0, answers=name == "fedavg"),
                c.server_eval(c.slm, buffers=K + 1)]
    elif name == "fedcollm":
        kd = cfg.section(FedCoLLMConfig)
        rows = [c.client_fit()]
        for m in (c.slm, c.llm):
            r = c.server_train(m, kd.kd_steps * R, kd.batch_size, KD_LOGIT_COPIES, per_round=kd.kd_steps,
                               seq_len=opts.aux_seq_len, answers=kd.kd_tokens == "answer")  # logits_of's positions
            r.peak["states"] += 4 * m.trainable * (K + 1 if m is c.slm else 0)
            rows.append(r)
        if kd.update == "simultaneous":
            together = rows[1:]
    elif name == "fedcot":
        fc = cfg.section(FedCoTConfig)
        steps = [sft_steps(n, t, t.epochs) for n in sizes]
        up1 = max(n * c.S // 2 * BYTES_PER_TOKEN_TEXT for n in sizes)  # prompts: about half the training text
        down1 = max(n * fc.rationale_tokens * BYTES_PER_TOKEN_TEXT for n in sizes)
        share = fc.share_adapters
        client = Row("client SLM", "client", _span(steps), sum(steps) * R,
                     down1 + (c.slm.adapter_bytes if share else 0), up1 + (c.adapter_up(c.slm) if share else 0),
                     {"weights": weight_bytes(c.slm, opts), "states": states(c.slm),
                      "activations": max(c.train_act(c.slm, t.batch_size, seqs=2),
                                         inference_bytes(c.slm.arch, fc.gen_batch_size, c.S + fc.decode_tokens,
                                                         c.act(c.slm)))},
                     approx_bytes=True, per_client_steps=steps)
        rows = [client, c.server_eval(c.slm, buffers=K + 1 if share else 0),
                c.server_generate(c.llm, fc.gen_batch_size, FEW_SHOT_PROMPT_TOKENS + c.S + fc.rationale_tokens)]
    elif name == "fdkt":
        # deferred: opacus (through dp_sgd) and the algorithm registry load only for the methods a plan names
        from fedkt.privacy.dp_sgd import DPConfig, planned_steps

        fd = cfg.section(FDKTConfig)
        dp = [planned_steps(n, DPConfig(epochs=fd.dp_epochs, batch_size=fd.dp_batch_size)) for n in sizes]
        keep = 1.0 if fd.filter == "none" else fd.filter_keep
        kept = fd.synthetic_set in ("kept+augmented", "private+synthetic")  # trained on besides the augmented
        synthetic = int(K * fd.samples_per_client * keep * (int(kept) + fd.augment_per_kept))
        private = fd.synthetic_set.startswith("private+")
        final = [sft_steps(n + synthetic if private else synthetic, t, t.epochs * R) for n in sizes]
        sample_tokens = fd.question_tokens + 4 * fd.choice_tokens if fd.sampling == "template" else fd.sample_tokens
        dp_act = activation_bytes(c.slm.arch, fd.dp_batch_size * c.S, c.act(c.slm), opts.gradient_checkpointing,
                                  SFT_LOGIT_COPIES) + 4 * c.slm.trainable * fd.dp_batch_size  # per-sample grads
        client = Row("client SLM", "client", "–", sum(d + f for d, f in zip(dp, final)),
                     synthetic * sample_tokens * BYTES_PER_TOKEN_TEXT,
                     fd.samples_per_client * sample_tokens * BYTES_PER_TOKEN_TEXT,
                     {"weights": weight_bytes(c.slm, opts), "states": states(c.slm),
                      "activations": max(dp_act, c.train_act(c.slm, t.batch_size), c.eval_act(c.slm))},
                     approx_bytes=True, per_client_steps=[d + f for d, f in zip(dp, final)])
        client.steps_per_round = f"DP {_span(dp)} + train {_span(final)}"
        gen_len = (fd.shots + 1) * sample_tokens + fd.augment_tokens
        rows = [client, c.server_generate(c.llm, fd.gen_batch_size, gen_len)]
        if c.llm.served:  # the server SLM embeds the samples then
            rows.append(c.server_eval(c.slm))
    elif name == "centralized":
        pooled = sum(sizes)
        rows = [c.server_train(c.slm, sft_steps(pooled, t, t.epochs * R), t.batch_size, SFT_LOGIT_COPIES,
                               answers=True)]
        if c.llm and not c.llm.served:
            rows.append(c.server_train(c.llm, sft_steps(pooled + aux, t, t.epochs * R), t.batch_size,
                                       SFT_LOGIT_COPIES, answers=True))
    else:  # a method registered after this table: a round-based one is planned as FedAvg (said in the notes)
        # deferred: opacus (through dp_sgd) and the algorithm registry load only for the methods a plan names
        from fedkt import registry

        if registry.get(name).algorithm is None:
            return [], {"server": 0, "client": 0}
        rows = [c.client_fit(), c.server_eval(c.slm, buffers=K + 1)]
    transient = {}
    for where in ("server", "client"):
        own = [sum(r.peak.values()) - r.peak.get("weights", 0) for r in rows if r.where == where]
        busy = sum(sum(r.peak.values()) - r.peak.get("weights", 0) for r in together if r.where == where)
        transient[where] = max(own + [busy, 0])
    return rows, transient
