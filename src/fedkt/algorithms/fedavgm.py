"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown 2019, arXiv 1909.06335). Clients do what FedAvg's
do; the server takes Δᵗ = θᵗ − mean(θₖ) as a pseudo-gradient: vᵗ = β·vᵗ⁻¹ + Δᵗ, θᵗ⁺¹ = θᵗ − η·vᵗ (β = 0, η = 1:
FedAvg). v is round state, checkpointed with θ; only the mean is used, so secure aggregation needs no code here."""

from dataclasses import dataclass

from fedkt.algorithms.fedavg import HANDLERS
from fedkt.config import check
from fedkt.fedavg_round import FedAvgRound, zeros_like
from fedkt.privacy.policy import guard
from fedkt.registry import MethodSpec, register


@dataclass
class FedAvgMConfig:
    """The ``[fedavgm]`` section."""

    momentum: float = 0.9
    """β: server momentum, in [0, 1)."""
    server_lr: float = 1.0
    """η: server learning rate (> 0)."""

    def __post_init__(self):
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        check(self.server_lr > 0, f"server_lr must be > 0, got {self.server_lr}")


class FedAvgM(FedAvgRound):
    def initial_state(self, server):
        return {"slm": server.slm.init_adapter, "momentum": zeros_like(server.slm.init_adapter)}

    def after_aggregate(self, server, fed, state, mean, rnd, out):
        cfg, theta = server.cfg.section(FedAvgMConfig), state["slm"]
        v = {k: cfg.momentum * state["momentum"][k] + (theta[k] - mean[k]) for k in mean}
        out.state.update(slm={k: theta[k] - cfg.server_lr * v[k] for k in mean}, momentum=v)


register(MethodSpec(name="fedavgm", label="FedAvgM", rank=22, algorithm=FedAvgM, handlers=guard("fedavgm", HANDLERS),
                    config=FedAvgMConfig, supports_secure_aggregation=True, summary="FedAvg with server momentum"))
