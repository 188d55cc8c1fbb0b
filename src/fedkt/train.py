"""The one training loop of fedkt and its step functions.

:func:`run_loop` owns what every training call shares: train/eval mode, the progress bar, metric history
and wall time. A *step function* does one optimizer step (forward under autocast, backward, update) through
an :class:`Updater`, which owns optimizers, LR schedules, gradient clipping and fp16 grad scaling. Supervised
fine-tuning (:func:`train_loop`, :func:`sft`), FedCoLLM's mutual distillation
(``fedkt.algorithms.fedcollm.mutual_distill``) and DP-SGD (``fedkt.privacy.dp_sgd.dp_train_loop``) are
step functions over this loop. Batches follow their model's device (``fedkt.devices``).

Only parameters with ``requires_grad`` train (for a peft model: the LoRA adapter).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from fedkt import devices, progress
from fedkt.config import TrainConfig
from fedkt.data.collate import IGNORE, SFTExample, collate_sft, make_sft_example
from fedkt.data.prompts import training_text
from fedkt.data.tasks import Example
from fedkt.losses import answer_ce


@dataclass
class TrainStats:
    steps: int
    examples: int
    mean_loss: float
    last_loss: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(opt, total_steps: int, warmup_ratio: float, schedule: str):
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total_steps <= warmup:
            return 1.0
        frac = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        return max(0.0, 1.0 - frac)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def tokenize_examples(tok, examples: Sequence[Example], max_length: int) -> list[SFTExample]:
    return [make_sft_example(tok, *training_text(ex), max_length) for ex in examples]


def batch_order(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Batches of indices: a fresh seeded shuffle every epoch; a fractional epoch takes its first batches."""
    rng = random.Random(seed)
    per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(per_epoch * epochs))
    batches: list[list[int]] = []
    while len(batches) < total:
        order = list(range(n))
        rng.shuffle(order)
        batches.extend(order[i:i + batch_size] for i in range(0, n, batch_size))
    return batches[:total]


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Updater:
    """Optimizer steps over one or more disjoint (parameters, optimizer) groups stepped together: each
    group's gradient clipped to ``max_grad_norm`` (0: off), then the optimizers, the LR schedules, and the
    gradients cleared. With a ``scaler`` (fp16) losses are scaled in :meth:`backward` and gradients
    unscaled before clipping; a step whose gradients overflowed is skipped by the scaler."""

    groups: list[tuple[list[torch.nn.Parameter], torch.optim.Optimizer]]
    max_grad_norm: float = 0.0
    schedulers: list = field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        for params, opt in self.groups:
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        for sched in self.schedulers:
            sched.step()
        for _, opt in self.groups:
            opt.zero_grad(set_to_none=True)


@dataclass
class LoopResult:
    history: dict[str, list[float]]
    """Each metric a step function returned, one value per step."""
    seconds: float
    steps: int

    def summary(self) -> dict[str, float]:
        """``{metric}_first``, ``{metric}_mean``, ``{metric}_last`` of every metric."""
        out = {f"{k}_first": v[0] for k, v in self.history.items() if v}
        out.update({f"{k}_mean": sum(v) / len(v) for k, v in self.history.items() if v})
        out.update({f"{k}_last": v[-1] for k, v in self.history.items() if v})
        return out


def run_loop(items: Iterable, step: Callable[[Any], dict[str, float]], models: Sequence, desc: str,
             total: int | None, show: Sequence[str] = ("loss",)) -> LoopResult:
    """THE training loop: ``step(item)`` for each item (one optimizer step each), with ``models`` in train
    mode (eval mode after), one progress bar showing the ``show`` metrics, and the history and wall time
    of every metric the step returns."""
    history: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    n = 0
    with devices.train_mode(*models), progress.bar(desc, total) as pb:
        for item in items:
            metrics = step(item)
            for k, v in metrics.items():
                history.setdefault(k, []).append(v)
            n += 1
            pb.advance(**{k: metrics[k] for k in show if k in metrics})
    return LoopResult(history, time.perf_counter() - t0, n)


def place(batch, device: torch.device):
    """A collated batch (a dict of tensors, or a dict of such dicts) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return {k: place(v, device) for k, v in batch.items()}


def make_updater(models: Sequence, groups: list[tuple[list, torch.optim.Optimizer]], max_grad_norm: float,
                 schedulers: Sequence = ()) -> Updater:
    """An :class:`Updater` with a grad scaler when any of ``models`` computes in fp16."""
    return Updater(groups, max_grad_norm, list(schedulers), devices.grad_scaler(models))


# --------------------------------------------------------------------------------------------------
# Supervised fine-tuning: a step = ``grad_accum`` micro-batches of ``loss_fn``


def sft(model, tok, examples: Sequence[Example], cfg: TrainConfig, seed: int, epochs: float | None = None,
        desc: str = "train") -> TrainStats:
    """Answer-only supervised fine-tuning of the trainable parameters of ``model`` on ``examples``."""
    data = tokenize_examples(tok, examples, cfg.max_length)
    return train_loop(model, data, answer_loss, cfg, seed, tok.pad_token_id, epochs=epochs, desc=desc)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``answer_ce`` of a ``collate_sft`` batch with the LM head run only where it counts: a pre-hook on the
    output embedding hands it the hidden states of the positions that predict a supervised token (the
    answers: a few of each row's tokens) instead of every position of the padded batch, so the vocabulary
    projection, its log-softmax and their backward shrink by the prompt share of the batch. The model's
    body runs as before (same shapes, same dropout draws); the loss equals ``answer_ce`` on full logits up
    to float rounding. Models without an output embedding module take the full path."""
    at = answer_logits(model, batch)
    if at is None:
        return answer_ce(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                         batch["labels"])
    logits, target, _ = at
    return torch.nn.functional.cross_entropy(logits.float(), target)


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The logits [N, V] of a ``collate_sft`` batch's N supervised positions only (``logits_at``), their target
    tokens [N] and the row [N] each belongs to; None for a model without an output embedding module."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target = labels[:, 1:]
    rows, cols = (target != IGNORE).nonzero(as_tuple=True)  # position t predicts token t + 1
    logits = logits_at(model, rows, cols, input_ids=ids, attention_mask=mask)
    return None if logits is None else (logits, target[rows, cols], rows)


def logits_at(model, rows: torch.Tensor, cols: torch.Tensor, **inputs) -> torch.Tensor | None:
    """``model(**inputs)``'s logits [N, V] at positions (rows[i], cols[i]) only: a forward pre-hook on the
    output embedding hands the LM head just those hidden states (the body runs as usual: same shapes, same
    dropout draws). None for a model without an output embedding module (compute full logits instead)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        return None
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0][rows, cols], *args[1:]))
    try:
        return model(**inputs).logits
    finally:
        handle.remove()


def train_loop(model, data: Sequence[SFTExample], loss_fn: Callable, cfg: TrainConfig, seed: int,
               pad_id: int, epochs: float | None = None, desc: str = "train",
               collate: Callable | None = None) -> TrainStats:
    """Optimise ``loss_fn(model, batch)`` over ``data``; ``collate(items, pad_id)`` builds a batch
    (default: ``collate_sft``, for multi-part items pass your own). The loss runs under autocast to the
    model's compute dtype; the batch is moved to the model's device."""
    collate = collate or collate_sft
    seed_everything(seed)
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters (add a LoRA adapter first)")
    batches = batch_order(len(data), cfg.batch_size, cfg.epochs if epochs is None else epochs, seed)
    steps = math.ceil(len(batches) / cfg.grad_accum)
    if cfg.max_steps > 0:
        steps = min(steps, cfg.max_steps)
        batches = batches[: steps * cfg.grad_accum]
    opt = make_optimizer(params, cfg.lr, cfg.weight_decay)
    upd = make_updater([model], [(params, opt)], cfg.max_grad_norm,
                       [make_scheduler(opt, steps, cfg.warmup_ratio, cfg.schedule)])
    device = devices.input_device(model)

    def step(group: list[list[int]]) -> dict[str, float]:
        total = 0.0
        for idx in group:
            batch = place(collate([data[i] for i in idx], pad_id), device)
            with devices.autocast(model):
                loss = loss_fn(model, batch) / len(group)
            upd.backward(loss)
            total += loss.item()
        upd.step()
        return {"loss": total}

    groups = (batches[s * cfg.grad_accum:(s + 1) * cfg.grad_accum] for s in range(steps))
    losses = run_loop(groups, step, [model], desc, steps).history.get("loss", [])
    return TrainStats(steps=steps, examples=len(data), mean_loss=sum(losses) / max(1, len(losses)),
                      last_loss=losses[-1] if losses else float("nan"))
