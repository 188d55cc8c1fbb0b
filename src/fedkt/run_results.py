"""Typed results: what a method returns, what a run collects, what ``report.py`` reads.

``results.json`` is :meth:`RunResults.to_dict` (schema in docs/results.md); roles (``"slm"``, ``"llm"``)
appear as top-level keys of a method's entry, as the papers' tables have one row per method and role.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

ROLES = ("slm", "llm")
Metrics = dict[str, dict[str, float]]
"""task -> {"acc", "acc_norm", "n", ...}"""
Correct = dict[str, dict[str, str]]
"""task -> {"ids": fingerprint of the question ids, "acc": bit-string, "acc_norm": bit-string (multiple choice)}:
per-question correctness in the order of the run's ``questions[task]`` (docs/results.md)."""


# ------------------------------------------------------------------------- per-question correctness
def question_ids(examples: Iterable[Any]) -> list[str]:
    """The ids of a task's evaluation questions in scoring order: each example's ``id`` (the dataset's row
    id; rows without one get ``<file stem>-<line>`` when loaded, see fedkt.data.tasks), made unique by a
    ``#k`` suffix on its k-th repeat (k = 2, 3, ...) so a dataset with a repeated id still pairs."""
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        i = str(ex.id)
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}#{seen[i]}")
    return out


def ids_fingerprint(ids: Sequence[str]) -> str:
    """16 hex digits of sha256 over the ids joined by newlines: a client's per-question reply names the
    question list it scored without resending it."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def bits(flags: Iterable[bool]) -> str:
    """[True, False, True] -> "101"."""
    return "".join("1" if f else "0" for f in flags)


def unbits(s: str) -> list[bool]:
    """"101" -> [True, False, True]; anything but 0/1 is refused."""
    if set(s) - {"0", "1"}:
        raise ValueError(f"a per-question correctness string holds only 0 and 1, got {s[:20]!r}")
    return [c == "1" for c in s]


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
    correct: dict[str, Correct] | None = None
    """role -> per-question correctness of the final evaluation, where the server evaluated (per round: the
    entry's ``correct``)."""
    per_client_correct: dict[str, Correct] | None = None
    """client -> per-question correctness of its own SLM, where the clients evaluated (standalone, FDKT)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Method-specific results (e.g. privacy budgets, stage counts), kept as they are."""

    _FIELDS = ("per_client", "comm", "per_round", "timings", "failures", "wall_s", "correct", "per_client_correct")

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
    """{"clients": [examples per client], "aux": n, "eval": {task: n}, "format": {task: eval.format}}"""
    models: dict[str, dict[str, Any]] | None = None
    """role -> LoadedModel.describe()"""
    questions: dict[str, list[str]] | None = None
    """task -> the ids of the questions scored, in order (what every ``correct`` bit-string indexes)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "fedkt_version": self.fedkt_version,
                               "methods": {m: r.to_dict() for m, r in self.methods.items()}}
        if self.data is not None:
            out["data"] = self.data
        if self.models is not None:
            out["models"] = self.models
        if self.questions is not None:
            out["questions"] = self.questions
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResults":
        return cls(name=d.get("name", "fedkt run"), fedkt_version=d.get("fedkt_version", ""),
                   methods={m: MethodResult.from_dict(r) for m, r in d.get("methods", {}).items()},
                   data=d.get("data"), models=d.get("models"), questions=d.get("questions"))
