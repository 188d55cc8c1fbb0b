"""One small training loop: AdamW, warmup + schedule, gradient accumulation, clipping, seeds, progress.

Only parameters with ``requires_grad`` train (for a peft model: the LoRA adapter).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fedkt import progress
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
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target = labels[:, 1:]
    rows, cols = (target != IGNORE).nonzero(as_tuple=True)  # position t predicts token t + 1
    logits = logits_at(model, rows, cols, input_ids=ids, attention_mask=mask)
    if logits is None:
        return answer_ce(model(input_ids=ids, attention_mask=mask).logits, labels)
    return torch.nn.functional.cross_entropy(logits.float(), target[rows, cols])


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
    (default: ``collate_sft``, for multi-part items pass your own)."""
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
    sched = make_scheduler(opt, steps, cfg.warmup_ratio, cfg.schedule)
    model.train()
    losses: list[float] = []
    with progress.bar(desc, steps) as pb:
        for s in range(steps):
            group = batches[s * cfg.grad_accum:(s + 1) * cfg.grad_accum]
            total = 0.0
            for idx in group:
                batch = collate([data[i] for i in idx], pad_id)
                loss = loss_fn(model, batch) / len(group)
                loss.backward()
                total += loss.item()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
            pb.advance(loss=total)
    model.eval()
    return TrainStats(steps=steps, examples=len(data), mean_loss=sum(losses) / max(1, len(losses)),
                      last_loss=losses[-1] if losses else float("nan"))
