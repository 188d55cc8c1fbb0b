"""Federated algorithms and baselines. Each module holds a server procedure and the client handlers it
calls; ``METHODS`` maps a config method name to its server procedure ``run(env) -> result dict``."""

from fedkt.algorithms import baselines, fedavg, fedcollm

METHODS = {
    "zero_shot": baselines.zero_shot,
    "standalone": baselines.standalone,
    "centralized": baselines.centralized,
    "fedavg": fedavg.run,
    "fedcollm": fedcollm.run,
}
