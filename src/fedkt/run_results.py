"""Typed results: what a method returns, what a run collects, what ``report.py`` reads.

``results.json`` is :meth:`RunResults.to_dict` (schema in docs/results.md); roles (``"slm"``, ``"llm"``)
appear as top-level keys of a method's entry, as the papers' tables have one row per method and role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("slm", "llm")
Metrics = dict[str, dict[str, float]]
"""task -> {"acc", "acc_norm", "n", ...}"""


@dataclass
class MethodResult:
    metrics: dict[str, Metrics] = field(default_factory=dict)
    """role ("slm", "llm") -> final metrics per task."""
    per_round: list[dict[str, Any]] | None = None
    """Federated methods: one entry per round ({"round", role metrics when evaluated, algorithm extras})."""
    per_client: dict[str, Metrics] | None = None
    comm: dict[str, Any] | None = None
    """The byte ledger's summary (``ByteLedger.summary()``)."""
    timings: dict[str, float] | None = None
    """Seconds per phase (client_train_s, aggregate_s, distill_s, eval_s, ...)."""
    failures: list[dict[str, Any]] | None = None
    wall_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Method-specific results (e.g. privacy budgets, stage counts), kept as they are."""

    _FIELDS = ("per_client", "comm", "per_round", "timings", "failures", "wall_s")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {r: self.metrics[r] for r in ROLES if r in self.metrics}
        for name in self._FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodResult":
        known = set(ROLES) | set(cls._FIELDS)
        return cls(metrics={r: d[r] for r in ROLES if d.get(r)},
                   **{k: d.get(k) for k in cls._FIELDS},
                   extra={k: v for k, v in d.items() if k not in known})


@dataclass
class RunResults:
    name: str
    fedkt_version: str
    methods: dict[str, MethodResult] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    """{"clients": [examples per client], "aux": n, "eval": {task: n}}"""
    models: dict[str, dict[str, Any]] | None = None
    """role -> LoadedModel.describe()"""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "fedkt_version": self.fedkt_version,
                               "methods": {m: r.to_dict() for m, r in self.methods.items()}}
        if self.data is not None:
            out["data"] = self.data
        if self.models is not None:
            out["models"] = self.models
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResults":
        return cls(name=d.get("name", "fedkt run"), fedkt_version=d.get("fedkt_version", ""),
                   methods={m: MethodResult.from_dict(r) for m, r in d.get("methods", {}).items()},
                   data=d.get("data"), models=d.get("models"))
