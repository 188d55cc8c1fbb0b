"""Losses: answer-only cross-entropy and knowledge distillation (temperature, optional top-k)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedkt.data.collate import IGNORE


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits at position t with the token at t+1."""
    return logits[:, :-1, :], labels[:, 1:]


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the supervised (non -100) tokens."""
    lg, lb = shift(logits, labels)
    return F.cross_entropy(lg.reshape(-1, lg.size(-1)).float(), lb.reshape(-1), ignore_index=IGNORE)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
          temperature: float = 1.0, top_k: int = 0, direction: str = "forward",
          reduction: str = "mean") -> torch.Tensor:
    """KL between teacher and student at temperature T, times T², over the positions where ``mask`` is true.

    ``direction="forward"`` is KL(teacher ‖ student) = Σ p_t (log p_t − log p_s), the usual distillation
    loss (Hinton et al.; PyTorch's ``kl_div(log p_s, p_t)``; FATE-LLM's FedCoLLM trainer): mass-covering,
    the student is pushed to put probability wherever the teacher does. ``"reverse"`` is
    KL(student ‖ teacher) = Σ p_s (log p_s − log p_t): mode-seeking.

    ``reduction="mean"`` averages the per-position KL over the selected positions (λ then weighs a
    per-token KL against the per-token CE); ``"sum"`` adds it up over every selected position of the
    batch (FATE-LLM's ``kl_loss.sum()``: λ's weight grows with the number of selected tokens).

    ``teacher_logits`` is treated as a constant (detached): its gradient never flows. With ``top_k > 0``
    both distributions are renormalised over the teacher's top-k vocabulary entries at each position
    (the FATE-LLM option for large vocabularies); with k = vocabulary size this equals the full KL.
    Logits are [..., V]; ``mask`` has the leading shape. With T = 1 the T² factor is 1: plain KL.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    if top_k:
        t, idx = t.topk(min(top_k, t.size(-1)), dim=-1)
        s = s.gather(-1, idx)
    log_p_t = F.log_softmax(t, dim=-1)
    log_p_s = F.log_softmax(s, dim=-1)
    if direction == "forward":
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    else:
        kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    m = mask.to(kl.dtype)
    if reduction == "sum":
        return (kl * m).sum() * temperature**2
    return (kl * m).sum() / m.sum().clamp_min(1.0) * temperature**2
