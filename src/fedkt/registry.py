"""The method registry: one place that says what a method is.

Each algorithm module registers itself once with a :class:`MethodSpec`: its name, report label, config
section (a dataclass that validates itself), whether it needs a server LLM, its client handlers and its
server procedure — either a plain function ``run(server) -> MethodResult`` (baselines) or a
:class:`~fedkt.rounds.RoundAlgorithm` driven round by round by the shared round driver. Config
validation, ``fedkt run``'s method list and help, and the report's labels and order all read this
registry; adding a method is one new module (plus its docs and tests) that calls :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from fedkt.clients import Handler
    from fedkt.results import MethodResult
    from fedkt.rounds import RoundAlgorithm
    from fedkt.server import ServerContext


@dataclass(frozen=True)
class MethodSpec:
    name: str
    """Config name (``methods = [NAME]``) and results.json key."""
    label: str
    """How reports name it (e.g. "FedCoLLM")."""
    summary: str
    """One line for ``fedkt run --help`` and the docs."""
    run: Callable[["ServerContext"], "MethodResult"] | None = None
    """Server procedure of a one-shot method."""
    algorithm: Callable[[], "RoundAlgorithm"] | None = None
    """Or: a factory of the per-round step the shared round driver runs (federated methods)."""
    handlers: dict[str, "Handler"] = field(default_factory=dict)
    """Client handlers by call name."""
    config: type | None = None
    """Dataclass of the method's own TOML section ``[NAME]`` (validates itself in ``__post_init__``)."""
    needs_llm: bool = False
    supports_secure_aggregation: bool = False
    """Whether the method's clients' adapters reach the server only as a mean under
    ``federation.secure_aggregation = true`` (true for a round built on :class:`~fedkt.fedavg_round.FedAvgRound`,
    which owns secure aggregation). Config validation refuses secure aggregation for a federated
    (``algorithm=``) method that does not declare it."""
    rank: int = 50
    """Position in report tables: baselines first, federated methods, then centralized."""
    report: Callable[[dict], str] | None = None
    """Optional report section of the method, rendered from its results.json entry ("" for none)."""

    def __post_init__(self):
        if (self.run is None) == (self.algorithm is None):
            raise ValueError(f"method {self.name!r}: give exactly one of run= or algorithm=")


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin() -> None:
    import fedkt.algorithms  # noqa: F401 - importing registers the built-in methods


def methods() -> dict[str, MethodSpec]:
    """All registered methods in report order."""
    _load_builtin()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].rank, kv[0])))


def get(name: str) -> MethodSpec:
    all_ = methods()
    if name not in all_:
        raise KeyError(f"{name!r} is not a method; allowed values: {', '.join(all_)}")
    return all_[name]


def label(name: str) -> str:
    spec = methods().get(name)
    return spec.label if spec else name


def config_sections() -> dict[str, type]:
    """Method name -> config dataclass, for methods that have a TOML section."""
    return {n: s.config for n, s in methods().items() if s.config is not None}


def default_section(name: str) -> Any:
    return config_sections()[name]()
