"""bf16-checked multiple-choice scoring: the predictions of full precision at the cost of bf16.

A question's prediction depends only on the *margin* between its best choice and the others (``acc``: of
the log-likelihoods, ``acc_norm``: of the log-likelihoods per character). A copy of an fp32 model whose
feed-forward blocks and linear layers multiply in bf16 (inputs cast to bf16, outputs back to fp32, so the
residual stream, the norms, attention scores and the LM head stay fp32: :func:`bf16_copy`) scores the
questions. A sample of 32 questions is scored by both, which measures how far bf16 moves a margin on this
model, data and machine; every question whose bf16 margin is below ``factor`` (4) times the largest shift seen there is
scored again in fp32. Where the bf16 margin clears that bar the bf16 argmax is the fp32 argmax unless
bf16 moved that question's margin more than 4x the worst case of the sample, so ``acc``, ``acc_norm``
and the per-question correctness equal full precision's; the log-likelihoods of the questions not
re-scored are bf16's (within a few tenths of a nat on SmolLM2-135M). Where more than a quarter of the
sample falls under the bar (choices too close for bf16 to decide: small models on choice texts, whose
per-character margins are small), the rest is scored in fp32 straight away, so the check costs little
more than fp32 scoring where it cannot help.

Worth it where bf16 is cheap: a GPU, or a CPU with AMX/AVX512-BF16 (there SmolLM2-135M scores lettered
questions ~1.9x faster this way than in fp32, checks included). On a CPU without bf16 hardware, or for a
model that does not compute in fp32, it is plain scoring in the model's own precision. Measured against lm-eval 0.4.13:
docs/evaluation.md.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fedkt.data.prompts import per_char
from fedkt.data.tasks import Example
from fedkt.devices import compute_dtype, cpu_has_native_bf16, input_device

log = logging.getLogger(__name__)

CALIBRATION = 32
"""Questions scored both ways to measure bf16's margin shift (evenly spaced over the set)."""
FACTOR = 4.0
"""A question is re-scored in full precision when a bf16 margin is below FACTOR x the largest shift seen."""
WORTH = 0.25
"""Above this share of the sample under the bar, the rest is scored in fp32 without a bf16 pass (with a bf16
pass at ~40% of fp32's cost, re-scoring more than a quarter again leaves little to gain)."""


@dataclass
class CheckStats:
    """What one checked scoring did: questions, calibration sample, re-scored questions, the bars."""
    n: int = 0
    calibration: int = 0
    rescored: int = 0
    shift: float = 0.0
    shift_norm: float = 0.0
    bar: float = 0.0
    bar_norm: float = 0.0
    close: int = 0
    """Calibration questions whose bf16 margin is under the bar."""
    checked: bool = False
    """False: scored in the model's own precision only (nothing to gain, no bf16 hardware, or too many close
    calls in the sample)."""


def margin(values: Sequence[float]) -> float:
    """Best value minus the runner-up (0 with a tie, infinity for a single value, NaN where a value is not
    finite)."""
    if any(not math.isfinite(v) for v in values):
        return math.nan
    if len(values) < 2:
        return math.inf
    top = sorted(values, reverse=True)
    return top[0] - top[1]


def shift(a: Sequence[float], b: Sequence[float]) -> float:
    """The largest change, between score vectors ``a`` and ``b``, of a difference of two choices' scores
    (how far any pairwise margin moved; NaN where a value is not finite)."""
    d = [x - y for x, y in zip(a, b)]
    if any(not math.isfinite(v) for v in d):
        return math.nan
    return max(d) - min(d) if d else 0.0


def worth_checking(model) -> bool:
    """Whether a bf16 copy would be faster than ``model``: it computes in fp32, on a GPU or on a CPU with
    bf16 hardware."""
    if compute_dtype(model) != torch.float32:
        return False
    dev = input_device(model)
    return dev.type == "cuda" or (dev.type == "cpu" and cpu_has_native_bf16())


def calibration_indices(n: int, k: int = CALIBRATION) -> list[int]:
    """``k`` evenly spaced question indices of ``n`` (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted({(i * n) // k for i in range(k)})


def _cast_in(_m, args, kwargs):
    return tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args), kwargs


def _cast_out(_m, _args, out):
    return out.float() if torch.is_tensor(out) and out.is_floating_point() else out


def _to_bf16(mod: torch.nn.Module) -> None:
    """Give ``mod`` (of the copy) bf16 parameters of its own, then cast its input to bf16 and output to fp32.
    New Parameters, not ``mod.to()``: the copy shares the model's fp32 tensors, which ``to()`` would convert
    in place under the model's feet."""
    for sub in mod.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.dtype == torch.float32:
                setattr(sub, name, torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))
    mod.register_forward_pre_hook(_cast_in, with_kwargs=True)
    mod.register_forward_hook(_cast_out)


def bf16_copy(model):
    """A copy of ``model`` that multiplies in bf16 and keeps the residual stream in fp32: every feed-forward
    block (a module whose class name ends in ``MLP``: LlamaMLP, Qwen2MLP, GPT2MLP, ...) runs wholly in bf16,
    every other ``nn.Linear`` but the output embedding (LM head) holds bf16 weights; each takes its input
    cast to bf16 and returns fp32. Embeddings, norms, residual adds, attention scores and the LM head stay
    fp32 (on SmolLM2-135M: half of pure bf16's margin shifts at ~80% of its speed, docs/evaluation.md).
    The copy shares every parameter it keeps in fp32 with ``model`` (no second copy of the embeddings,
    norms, head); its bf16 weights are new, about half the model's fp32 bytes. ``model`` is untouched."""
    fast = copy.deepcopy(model, {id(p): p for p in model.parameters()})
    head = fast.get_output_embeddings() if hasattr(fast, "get_output_embeddings") else None
    blocks = [m for m in fast.modules() if type(m).__name__.endswith("MLP")]
    inside = {id(m) for b in blocks for m in b.modules()}
    for b in blocks:
        _to_bf16(b)
    for mod in fast.modules():
        if type(mod) is torch.nn.Linear and mod is not head and id(mod) not in inside \
                and mod.weight.dtype == torch.float32:
            _to_bf16(mod)
    return fast


_warned = False


def _close(ex: Example, lls: Sequence[float], st: CheckStats) -> bool:
    """Whether bf16 scores ``lls`` leave the question too close to call: a margin (acc or acc_norm) under
    its bar, or a score that is not finite."""
    return not (margin(lls) >= st.bar and margin(per_char(ex, lls)) >= st.bar_norm)


def checked_choice_loglikelihoods(model, tok, examples: Sequence[Example], score: Callable,
                                  factor: float = FACTOR, calibration: int = CALIBRATION, worth: float = WORTH,
                                  stats: CheckStats | None = None, require_hardware: bool = True
                                  ) -> list[list[float]]:
    """Per question, its choices' log-likelihoods (as ``score(model, tok, examples, label)`` gives them, i.e.
    :func:`fedkt.evaluate.choice_loglikelihoods`), scored by :func:`bf16_copy`'s copy of ``model`` and
    checked as the module docstring says: the calibration sample and every question whose bf16 margin
    (``acc`` or ``acc_norm``) is below ``factor`` x the sample's largest shift carry full-precision scores.
    More than ``worth`` of the sample under the bar: the rest is scored in full precision, without a bf16
    pass. ``stats`` receives what was done. ``require_hardware=False`` runs the bf16 copy even on a CPU without
    bf16 hardware (slow; for tests)."""
    global _warned
    st = stats if stats is not None else CheckStats()
    st.n = len(examples)
    if factor < 1:
        raise ValueError(f"factor = {factor}: the bar must be at least the largest shift measured (factor >= 1)")
    fp32 = compute_dtype(model) == torch.float32
    eligible = fp32 and (not require_hardware or worth_checking(model))
    if not eligible or len(examples) <= calibration:
        if fp32 and not eligible and not _warned:
            _warned = True
            dev = input_device(model)
            where = "a CPU without bf16 hardware (no AMX or AVX512-BF16)" if dev.type == "cpu" else \
                f"a {dev.type} device (checked scoring runs on CUDA or a CPU with bf16 hardware)"
            warnings.warn(f"eval.precision = \"bf16-checked\" on {where}: scoring in fp32 instead (bf16 would be "
                          "no faster here)", stacklevel=3)
        return score(model, tok, examples, "")
    fast = bf16_copy(model)
    cal = calibration_indices(len(examples), calibration)
    in_cal = set(cal)
    rest = [i for i in range(len(examples)) if i not in in_cal]
    sample = [examples[i] for i in cal]
    low = dict(zip(cal, score(fast, tok, sample, "bf16 sample")))
    ref = dict(zip(cal, score(model, tok, sample, "fp32 sample")))
    st.calibration = len(cal)
    st.shift = max(shift(low[i], ref[i]) for i in cal)
    st.shift_norm = max(shift(per_char(examples[i], low[i]), per_char(examples[i], ref[i])) for i in cal)
    st.bar, st.bar_norm = factor * st.shift, factor * st.shift_norm
    st.close = sum(_close(examples[i], low[i], st) for i in cal)
    if st.close > worth * len(cal) or not (math.isfinite(st.bar) and math.isfinite(st.bar_norm)):
        del fast  # bf16 would decide too few questions: the rest in full precision
        ref.update(zip(rest, score(model, tok, [examples[i] for i in rest], "fp32")))
        log.info("bf16-checked scoring: %d of %d sample questions too close for bf16 (bar %.3g); %d questions "
                 "scored in fp32", st.close, st.calibration, st.bar, st.n)
        return [ref[i] for i in range(len(examples))]
    low.update(zip(rest, score(fast, tok, [examples[i] for i in rest], "bf16")))
    del fast
    again = [i for i in rest if _close(examples[i], low[i], st)]
    if again:
        ref.update(zip(again, score(model, tok, [examples[i] for i in again], "fp32 re-score")))
    st.rescored, st.checked = len(again), True
    log.info("bf16-checked scoring: %d questions, %d calibration, %d re-scored in fp32 (bars %.3g / %.3g "
             "per char, largest bf16 shifts %.3g / %.3g)", st.n, st.calibration, st.rescored, st.bar,
             st.bar_norm, st.shift, st.shift_norm)
    return [ref.get(i, low[i]) for i in range(len(examples))]
