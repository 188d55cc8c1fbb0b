"""The method registry: one place that says what a method is.

Each algorithm module registers itself once with a :class:`MethodSpec`: its name, report label, config
section (a dataclass that validates itself), whether it needs a server LLM, its client handlers and its
server procedure — either a plain function ``run(server) -> MethodResult`` (baselines) or a
:class:`~fedkt.rounds.RoundAlgorithm` driven round by round by the shared round driver. Config
validation, ``fedkt run``'s method list and help, and the report's labels and order all read this
registry; adding a method is one new module (plus its docs and tests) that calls :func:`register`.

The registry is filled on first use by importing the method modules: the built-in ones (``fedkt.algorithms``)
and those other packages declare under the entry-point group ``fedkt.methods`` (``[project.entry-points.
"fedkt.methods"] mymethod = "mypkg.mymethod"``). Config loading gets the methods from here
(:func:`load_config` feeds them to ``fedkt.config.load_experiment``); ``fedkt.config`` never imports the
registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fedkt.config import ExperimentConfig, experiment_from_dict, load_experiment

if TYPE_CHECKING:
    from fedkt.clients import Handler
    from fedkt.run_results import MethodResult
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


BUILTIN_METHODS = "fedkt.algorithms"
"""The package whose import registers the built-in methods."""
ENTRY_POINT_GROUP = "fedkt.methods"
_loaded = False


def _load_methods() -> None:
    """Import the built-in method modules and the entry points of group ``fedkt.methods`` (once); each
    registers itself. By name, as plugins are: the algorithms import this module, not the reverse."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(BUILTIN_METHODS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def methods() -> dict[str, MethodSpec]:
    """All registered methods in report order."""
    _load_methods()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].rank, kv[0])))


def get(name: str) -> MethodSpec:
    all_ = methods()
    if name not in all_:
        raise KeyError(f"{name!r} is not a method; allowed values: {', '.join(all_)}")
    return all_[name]


def label(name: str) -> str:
    spec = methods().get(name)
    return spec.label if spec else name


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment in TOML file ``path`` with ``--set`` ``overrides``, knowing every registered method
    (``fedkt.config.load_experiment`` fed with :func:`methods`)."""
    return load_experiment(path, overrides, methods())


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """The experiment in a parsed TOML document (e.g. the one a Flower ServerApp receives)."""
    return experiment_from_dict(data, methods())
