"""DP-SGD for the LoRA adapter of any causal LM, through Opacus.

What it gives: sample-level (ε, δ)-differential privacy of the trained adapter with respect to the
client's training examples (add/remove one example), and therefore of everything computed from the
adapter alone (synthetic examples sampled from the model, evaluation, the adapter sent to a server):
post-processing never weakens DP. See ``docs/dp-sgd.md``.

The method (Abadi et al. 2016, as Opacus implements it):

* **Poisson sampling.** Each step includes every example independently with probability
  ``q = min(1, batch_size / n)``; batch sizes vary and a batch may be empty. An empty batch is still a
  step: it releases pure noise and is counted by the accountant (skipping it would break the analysis).
* **Per-sample gradients** of the trainable parameters only (the LoRA matrices; the frozen base model
  stays frozen and bit-for-bit unchanged). Opacus's hooks are attached to the peft model itself
  (``wrap_model=False``), not a ``GradSampleModule`` wrapper, so HF/peft ``forward(**kwargs)`` and
  attribute forwarding are untouched; after training the hooks and every attribute Opacus added are
  removed, and the model is the same plain peft model (``get_adapter_state`` works as before).
* **Per-sample loss.** Example i's loss is its own answer-only cross-entropy, the mean over *its*
  supervised tokens (``per_sample_answer_ce``), not a token mean over the batch: a batch-level token
  mean would weight example i by the other examples' answer lengths, so one example's clipped
  contribution would depend on the others and the sensitivity bound would no longer hold. Batches are
  right-padded; with a causal mask a real token never attends to a later pad, so padding contributes
  exactly zero to any gradient, and position ids (0..T-1 from the left) are the same as unpadded.
  Nothing here is model specific (no hard-coded GPT-2 position ids as in FATE-LLM's ``algo/dp``).
* **Clipping and noise.** Each per-sample gradient (all LoRA tensors flattened together) is scaled to
  L2 norm ≤ C (``max_grad_norm``); the clipped sum gets Gaussian noise N(0, σ²C²) per coordinate and is
  divided by the expected batch size q·n. The optimizer (AdamW by default, or SGD) only post-processes
  that noisy gradient.
* **Calibration.** σ is the smallest noise multiplier for which the accountant (RDP by default, or PRV)
  gives ε ≤ ``target_epsilon`` at δ after the planned number of steps (Opacus's
  ``get_noise_multiplier``, the function ``make_private_with_epsilon`` uses). We call it ourselves with
  the exact ``q`` and step count: ``make_private_with_epsilon`` derives ``q = 1/len(loader)`` from a
  loader and the steps from whole epochs (``int(epochs / q)``), and Opacus's own loader length
  round-trip ``int(1/(1/k))`` loses a step for k = 93, 99, 105, ... The engine's optimizer hook is
  re-attached with that same ``q``, so what is sampled is what is accounted.
* **ε spent** is the engine accountant's ``get_epsilon(δ)`` for the steps really taken, reported in
  :class:`DPStats`.
* **δ** is ``min(delta, 1/n²)``: δ must be well below 1/n (a mechanism that publishes one random
  example outright is (0, 1/n)-DP), and 1/n² keeps that margin for any client size.

Determinism: dropout uses the torch global RNG seeded from ``seed``; Poisson sampling and the noise use
their own ``torch.Generator`` seeded from ``seed`` and a purpose string, so a run is reproducible bit
for bit. ``secure_mode=True`` instead draws both from a cryptographically secure RNG and uses Opacus's
floating-point-attack-resistant noise (needs the ``torchcsprng`` package; not reproducible by design).
Use it for a deployment, not for experiments.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

from fedkt.data.collate import IGNORE, SFTExample, collate_sft
from fedkt.devices import compute_dtype, input_device
from fedkt.losses import shift
from fedkt.privacy.dp_accounting import calibrate_noise, effective_delta, epsilon_for, planned_steps, sample_rate
from fedkt.train import Updater, answer_logits, place, run_loop, seed_everything, trainable_parameters

__all__ = ["DPConfig", "DPStats", "batch_loss", "dp_train_loop", "effective_delta", "epsilon_for",
           "length_chunks", "per_sample_answer_ce", "per_sample_grads", "planned_steps", "sample_rate", "calibrate_noise"]

ACCOUNTANTS = ("rdp", "prv")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class DPConfig:
    """DP-SGD settings. The privacy unit is one training example of one client."""

    target_epsilon: float = 3.0
    """ε to reach after the planned steps; the noise multiplier is calibrated to it."""
    delta: float = 1e-5
    """δ of the guarantee; the effective δ is ``min(delta, 1/n²)`` for n training examples."""
    max_grad_norm: float = 1.0
    """Per-sample clipping bound C (L2 norm of all trainable gradients of one example)."""
    epochs: float = 3.0
    """Planned passes over the data: ``ceil(epochs · n / batch_size)`` steps (unless ``max_steps``)."""
    max_steps: int = 0
    """If > 0, the planned number of steps (overrides ``epochs``)."""
    batch_size: int = 16
    """Expected batch size of Poisson sampling: sample rate q = min(1, batch_size / n)."""
    max_physical_batch: int = 0
    """If > 0, a sampled batch is run through the model in chunks of at most this many examples
    (memory bound); the update is the same as one pass over the whole batch."""
    lr: float = 1e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    max_length: int = 256
    accountant: Literal["rdp", "prv"] = "rdp"
    noise_multiplier: float | None = None
    """Fix σ instead of calibrating it to ``target_epsilon`` (ablations, tests; σ = 0 gives ε = ∞)."""
    secure_mode: bool = False
    """Cryptographically secure sampling and noise (needs ``torchcsprng``; not reproducible)."""

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"DPConfig.{key}: {msg} (got {getattr(self, key)!r})")

        if not (isinstance(self.target_epsilon, (int, float)) and 0 < self.target_epsilon < math.inf):
            raise bad("target_epsilon", "must be a finite number > 0, e.g. 3.0")
        if not (0 < self.delta < 1):
            raise bad("delta", "must be in (0, 1), e.g. 1e-5")
        if not self.max_grad_norm > 0:
            raise bad("max_grad_norm", "the clipping bound must be > 0, e.g. 1.0")
        if not self.epochs > 0:
            raise bad("epochs", "must be > 0")
        if self.max_steps < 0:
            raise bad("max_steps", "must be >= 0 (0 = derive the steps from epochs)")
        if self.batch_size < 1:
            raise bad("batch_size", "the expected batch size must be >= 1")
        if self.max_physical_batch < 0:
            raise bad("max_physical_batch", "must be >= 0 (0 = no limit)")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.max_length < 2:
            raise bad("max_length", "must be >= 2 tokens")
        if self.accountant not in ACCOUNTANTS:
            raise bad("accountant", f"must be one of {', '.join(ACCOUNTANTS)}")
        if self.noise_multiplier is not None and not (0 <= self.noise_multiplier < math.inf):
            raise bad("noise_multiplier", "must be a finite number >= 0, or None to calibrate it")


@dataclass
class DPStats:
    """What one DP training call did. The privacy figures are public; ``mean_loss``, ``last_loss``,
    ``empty_batches`` and ``mean_batch_size`` are computed from private data without noise and should
    stay on the client (or be treated as non-private diagnostics)."""

    steps: int
    planned_steps: int
    examples: int
    epsilon_spent: float
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    expected_batch_size: float
    max_grad_norm: float
    accountant: str
    empty_batches: int
    mean_batch_size: float
    mean_loss: float
    last_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Pieces (public so tests and other algorithms can use them)


def per_sample_answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Answer-only cross-entropy of each row: the mean over that row's supervised tokens, shape [B].

    Row i alone equals ``fedkt.losses.answer_ce(logits[i:i+1], labels[i:i+1])``.
    """
    lg, lb = shift(logits, labels)
    tok = F.cross_entropy(lg.reshape(-1, lg.size(-1)).float(), lb.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(lb.shape)
    count = (lb != IGNORE).sum(1).clamp_min(1)
    return tok.sum(1) / count


CHUNK_OVERHEAD = 64
"""Padded positions one more physical batch is assumed to cost (fixed per-forward costs), for ``length_chunks``."""


def length_chunks(lengths: Sequence[int], max_size: int, overhead: int = CHUNK_OVERHEAD) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into consecutive runs [a, b) of at most ``max_size`` that minimise the
    padded positions (each run padded to its longest) plus ``overhead`` per run (dynamic programming)."""
    n = len(lengths)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for b in range(1, n + 1):
        for a in range(max(0, b - max_size), b):
            c = best[a] + (b - a) * lengths[b - 1] + overhead
            if c < best[b]:
                best[b], cut[b] = c, a
    out, b = [], n
    while b > 0:
        out.append((cut[b], b))
        b = cut[b]
    return out[::-1]


def batch_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample losses [B] of a right-padded batch from ``collate_sft``: ``per_sample_answer_ce`` with the
    LM head run only at the positions that predict a supervised token (``fedkt.train.logits_at``, as plain
    training does), not at the prompt and padding positions; equal to the full-logits loss up to float
    rounding. Each row's loss still depends on that row alone (the gather never mixes rows)."""
    at = answer_logits(model, batch)
    if at is None:
        return per_sample_answer_ce(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    logits, target, rows = at
    tok = F.cross_entropy(logits.float(), target, reduction="none")
    b = batch["input_ids"].shape[0]
    total = torch.zeros(b, dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    return total / torch.bincount(rows, minlength=b).clamp_min(1).to(tok.dtype)


_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad")


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Silence warnings that are expected here: Opacus's secure-RNG notice (``secure_mode`` is
    documented above) and torch's notice that a full backward hook fires on a module whose input needs
    no gradient (the first LoRA layer reads the frozen embeddings)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _strip(model) -> None:
    """Remove whatever per-sample state Opacus left on modules and parameters."""
    for m in model.modules():
        for a in _OPACUS_MODULE_ATTRS:
            if hasattr(m, a):
                delattr(m, a)
    for p in model.parameters():
        for a in ("grad_sample", "_current_grad_sample", "_forward_counter", "summed_grad"):
            if hasattr(p, a):
                delattr(p, a)
        p.grad = None


def per_sample_grads(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample gradients [B, ...] of every trainable parameter for one batch, computed by the same
    Opacus hooks and loss that :func:`dp_train_loop` uses (no clipping, no noise). Leaves no hook behind."""
    from opacus.grad_sample import GradSampleHooks

    was_training = model.training
    with _quiet_opacus():
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
        try:
            model.train()
            batch_loss(model, batch).mean().backward()
            return {name: p.grad_sample.detach().clone() for name, p in model.named_parameters()
                    if p.requires_grad}
        finally:
            hooks.cleanup()
            _strip(model)
            model.train(was_training)


def _sub_seed(seed: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:8], "big") >> 1


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return (torch.tensor(i),)


def _empty_step(upd: Updater, params: Sequence[torch.nn.Parameter]) -> None:
    """A step for an empty Poisson batch: zero per-sample gradients, so the optimizer releases noise
    only and the accountant counts the step."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    upd.step()


# --------------------------------------------------------------------------------------------------
# Training


def _secure_noise(opt, rng) -> None:
    """Replace the DP optimizer's noise by CSPRNG noise (``fedkt.privacy.randomness.SecureRandom``): the
    same N(0, σ²C²) per coordinate, drawn from os.urandom instead of a torch generator."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise():
        std = opt.noise_multiplier * opt.max_grad_norm
        for p in opt.params:
            _check_processed_flag(p.summed_grad)
            ref = p.summed_grad
            noise = rng.normal(ref.shape, std, ref.dtype).to(ref.device) if std else torch.zeros_like(ref)
            p.grad = (ref + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    opt.add_noise = add_noise


def _secure_poisson(n: int, q: float, steps: int, rng) -> Iterator[list[int]]:
    """Poisson sampling from the CSPRNG: each example joins each step's batch with probability q."""
    for _ in range(steps):
        yield torch.nonzero(rng.rand(n) < q).flatten().tolist()


def dp_train_loop(model, data: Sequence[SFTExample], cfg: DPConfig, seed: int, pad_id: int,
                  desc: str = "dp-sgd", rng=None) -> DPStats:
    """``rng`` (``fedkt.privacy.randomness``): None (simulation: noise and sampling from generators seeded
    from ``seed``, bit-identical to before), a ``PinnedRandom`` (64-bit seeds from the client's secret) or
    a ``SecureRandom`` (noise and Poisson sampling from the OS CSPRNG)."""
    from opacus import PrivacyEngine
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    n = len(data)
    if n == 0:
        raise ValueError("DP-SGD needs at least one training example")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters (add a LoRA adapter first)")
    if compute_dtype(model) == torch.float16:
        raise ValueError("DP-SGD does not run in fp16 (Opacus's per-sample gradients cannot be loss-scaled): "
                         "set model.dtype = \"bf16\" or \"fp32\"")
    q = sample_rate(n, cfg.batch_size)
    steps = planned_steps(n, cfg)
    delta = effective_delta(cfg.delta, n)
    sigma = (cfg.noise_multiplier if cfg.noise_multiplier is not None
             else calibrate_noise(cfg.target_epsilon, delta, q, steps, cfg.accountant))

    seed_everything(seed)
    if cfg.optimizer == "sgd":
        base_opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        base_opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    with _quiet_opacus():
        try:
            engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=cfg.secure_mode)
        except ImportError as e:
            raise ImportError(f"DPConfig.secure_mode = true needs torchcsprng ({e}); set secure_mode = "
                              f"false for experiments") from None
        csprng = rng is not None and hasattr(rng, "rand") and not cfg.secure_mode
        if cfg.secure_mode or csprng:
            noise_gen = None
            sample_gen = engine.secure_rng if cfg.secure_mode else None
        elif rng is not None:  # a pinned secret: 64-bit seeds
            noise_gen, sample_gen = rng.generator("dp-noise"), rng.generator("dp-poisson")
        else:
            noise_gen = torch.Generator().manual_seed(_sub_seed(seed, "dp-noise"))
            sample_gen = torch.Generator().manual_seed(_sub_seed(seed, "dp-poisson"))
        loader = torch.utils.data.DataLoader(_Indices(n), batch_size=min(n, cfg.batch_size))
        model.train()  # Opacus validates that the model is in training mode
        hooks = None
        try:
            hooks, opt, _ = engine.make_private(
                module=model, optimizer=base_opt, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=cfg.max_grad_norm, poisson_sampling=False, noise_generator=noise_gen,
                loss_reduction="mean", clipping="flat", grad_sample_mode="hooks", wrap_model=False)
            # Our own Poisson sampler at the exact q; the optimizer averages over q·n and the accountant
            # counts each step at that same q (make_private derived both from len(loader) instead).
            opt.expected_batch_size = q * n
            opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=q))
            if csprng:
                _secure_noise(opt, rng)
                sampler = _secure_poisson(n, q, steps, rng)
            else:
                sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=sample_gen,
                                                        steps=steps)
            # Opacus clips per sample and adds the noise: the loop's updater only steps the DP optimizer.
            # No autocast: per-sample gradients stay in the adapter's fp32 (bf16 base weights still compute in bf16).
            upd, chunk, device = Updater([(params, opt)]), cfg.max_physical_batch or n, input_device(model)

            def step(idx: list[int]) -> dict[str, float]:
                if not idx:
                    _empty_step(upd, params)
                    return {"empty": 1.0, "batch": 0.0}
                total = 0.0
                # physical batches of similar lengths (less padding); per-sample gradients do not depend on
                # which examples share a forward, so the clipped sum and the noise are those of one batch
                idx = sorted(idx, key=lambda i: len(data[i].input_ids))
                parts = length_chunks([len(data[i].input_ids) for i in idx], chunk)
                parts = [idx[a:b] for a, b in parts]
                for j, part in enumerate(parts):
                    loss = batch_loss(model, place(collate_sft([data[i] for i in part], pad_id), device))
                    upd.backward(loss.mean())
                    total += loss.detach().sum().item()
                    opt.signal_skip_step(do_skip=j < len(parts) - 1)
                    upd.step()
                return {"loss": total / len(idx), "empty": 0.0, "batch": float(len(idx))}

            hist = run_loop(sampler, step, [model], desc, steps).history
        finally:
            if hooks is not None:
                hooks.cleanup()
            elif hasattr(model, "autograd_grad_sample_hooks"):  # make_private failed half way
                for h in model.autograd_grad_sample_hooks:
                    h.remove()
                del model.autograd_grad_sample_hooks
            _strip(model)
            model.eval()
        eps = math.inf if sigma == 0 else float(engine.get_epsilon(delta))
    losses, taken = hist.get("loss", []), len(hist.get("batch", []))
    empty, sampled = int(sum(hist.get("empty", []))), int(sum(hist.get("batch", [])))
    return DPStats(steps=taken, planned_steps=steps, examples=n, epsilon_spent=eps,
                   target_epsilon=cfg.target_epsilon, delta=delta, noise_multiplier=float(sigma),
                   sample_rate=q, expected_batch_size=q * n, max_grad_norm=cfg.max_grad_norm,
                   accountant=cfg.accountant, empty_batches=empty, mean_batch_size=sampled / max(1, taken),
                   mean_loss=sum(losses) / len(losses) if losses else float("nan"),
                   last_loss=losses[-1] if losses else float("nan"))
