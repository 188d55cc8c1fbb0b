"""Federated algorithms and baselines. Each module holds a server procedure (or round step) and the
client handlers it calls, and registers itself with :func:`fedkt.registry.register`; importing this
package registers the built-in methods."""

from fedkt.algorithms import baselines, fedavg, fedcollm, fedcot, fedprox  # noqa: F401
from fedkt.algorithms import fedavgm  # noqa: F401
from fedkt.algorithms import fdkt  # noqa: F401
