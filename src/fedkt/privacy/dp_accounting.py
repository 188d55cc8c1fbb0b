"""DP-SGD accounting: the effective δ, Poisson sample rate, planned steps, noise calibration and ε spent
(Opacus's accountants). Used by ``fedkt.privacy.dp_sgd``; see docs/dp-sgd.md."""

from __future__ import annotations

import functools
import math
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedkt.privacy.dp_sgd import DPConfig


def effective_delta(delta: float, n: int) -> float:
    """``min(delta, 1/n²)``."""
    return min(delta, 1.0 / (n * n))


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling probability giving an expected batch of ``batch_size`` (capped at 1)."""
    return min(1.0, batch_size / n)


def planned_steps(n: int, cfg: DPConfig) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(round(cfg.epochs * n / min(n, cfg.batch_size), 9)))


@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, delta: float, q: float, steps: int, accountant: str = "rdp") -> float:
    """Smallest σ (to Opacus's bisection tolerance 0.01 in ε) with ε(σ, q, steps, δ) ≤ target. A pure
    function of its arguments, cached (the bisection takes seconds; clients of one size share it)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # the bisection probes σ far from the answer, where RDP
            warnings.filterwarnings("ignore", message="Optimal order is the")  # warns about its alphas
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                              steps=steps, accountant=accountant))
    except ValueError as e:
        raise ValueError(f"cannot reach ε = {target_epsilon} at δ = {delta:.3g} with sample rate {q:.4g} "
                         f"over {steps} steps ({e}); raise target_epsilon, train fewer steps or use a "
                         f"smaller batch_size") from None


def epsilon_for(noise_multiplier: float, q: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε after ``steps`` steps of the subsampled Gaussian mechanism, by a fresh Opacus accountant."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, q, steps)]
    return float(acc.get_epsilon(delta=delta))
