"""The shared round driver: what every federated method's rounds have in common.

A federated method supplies a :class:`RoundAlgorithm` (like Flower's ``Strategy``: a small interface the
loop calls) whose :meth:`~RoundAlgorithm.round` does exactly what one round of its paper's algorithm box
says. :func:`run_rounds` owns everything else: opening the federation, resume from the newest
checkpoint, timings, the evaluation cadence (``eval.every_round``), metrics.jsonl, per-round checkpoints
and saving the final adapters, and it returns a typed :class:`~fedkt.run_results.MethodResult`.

Checkpoints hold every role's adapter, the per-round results, timings and the federation's bookkeeping
(byte ledger, failures). An algorithm whose rounds carry more state than its adapters (an optimizer
that crosses rounds, an accountant) returns it in its adapters' place or keeps it client-side.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from fedkt import progress
from fedkt.run_results import MethodResult

if TYPE_CHECKING:
    from fedkt.federation.base import Federation
    from fedkt.registry import MethodSpec
    from fedkt.server import ServerContext

Adapter = dict[str, torch.Tensor]


@dataclass
class RoundOutcome:
    state: dict[str, Adapter]
    """Every role's adapter after the round (``{"slm": θ}``, ``{"slm": θ, "llm": ω}``)."""
    entry: dict[str, Any] = field(default_factory=dict)
    """Extras for this round's entry in ``per_round`` (e.g. ``{"distill": stats}``)."""
    logs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra metrics.jsonl fields per role; a role with extras is logged every round."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase, added to the method's totals."""


class RoundAlgorithm(ABC):
    """One federated method's per-round server step."""

    roles: tuple[str, ...] = ("slm",)
    """The server models whose adapters the method carries from round to round (evaluated, saved)."""
    phases: tuple[str, ...] = ()
    """Timing keys the method reports (``eval_s`` is added by the driver)."""

    def setup(self, server: "ServerContext", fed: "Federation") -> None:
        """Checks before round 1 (e.g. a shared vocabulary); runs on resume too."""

    def initial_state(self, server: "ServerContext") -> dict[str, Adapter]:
        """Round 1's adapters: each role's fresh one."""
        return {role: server.model(role).init_adapter for role in self.roles}

    @abstractmethod
    def round(self, server: "ServerContext", fed: "Federation", state: dict[str, Adapter], rnd: int) -> RoundOutcome:
        """Round ``rnd`` (1-based) from ``state``; returns the new state."""


def run_rounds(server: "ServerContext", spec: "MethodSpec") -> MethodResult:
    """Run ``spec``'s algorithm for ``federation.rounds`` rounds, resuming from its last checkpoint."""
    algo = spec.algorithm()
    cfg, name = server.cfg, spec.name
    ckpt = Checkpoints(server.out, name)
    with server.federation(spec) as fed:
        algo.setup(server, fed)
        state = algo.initial_state(server)
        per_round: list[dict[str, Any]] = []
        timings = {k: 0.0 for k in (*algo.phases, "eval_s")}
        start = 1
        resumed = ckpt.latest()
        if resumed:
            last, state, saved = resumed
            per_round, timings = saved["per_round"], saved["timings"]
            fed.load_state_dict(saved.get("federation", {"ledger": saved.get("ledger", [])}))
            start = last + 1
            progress.log(f"{name}: resuming after round {last}")
        for rnd in range(start, cfg.federation.rounds + 1):
            t_round = time.perf_counter()
            out = algo.round(server, fed, state, rnd)
            wall = {"round_s": round(time.perf_counter() - t_round, 3)}
            state = out.state
            for k, v in out.timings.items():
                timings[k] = timings.get(k, 0.0) + v
            entry: dict[str, Any] = {"round": rnd, **out.entry, **fed.take_notes()}
            if cfg.eval.every_round or rnd == cfg.federation.rounds:
                t0 = time.perf_counter()
                for role in algo.roles:
                    if role not in entry:  # else the clients evaluated (FedCoT's paper mode: no server model)
                        entry[role], correct = server.evaluate_questions(role, state[role], f"{name} r{rnd}")
                        if correct is not None:
                            entry.setdefault("correct", {})[role] = correct
                timings["eval_s"] += time.perf_counter() - t0
                wall["eval_s"] = round(time.perf_counter() - t0, 3)
            for role in algo.roles:
                if role in entry or role in out.logs:
                    metrics = {"metrics": entry[role]} if role in entry else {}
                    server.log_metrics(method=name, round=rnd, role=role, **wall, **out.logs.get(role, {}), **metrics)
            per_round.append(entry)
            ckpt.save(rnd, state, {"per_round": per_round, "timings": timings, "federation": fed.state_dict()})
        for role in algo.roles:
            server.save_adapter(role, state[role], name)
        final = {role: next((e[role] for e in reversed(per_round) if role in e), {}) for role in algo.roles}
        # per-question correctness of the final evaluation (server side per role, or the clients' own)
        last = next((e for e in reversed(per_round) if any(role in e for role in algo.roles)), {})
        return MethodResult(metrics=final, per_round=per_round, comm=fed.ledger.summary(), timings=timings,
                            failures=list(fed.failures), correct=last.get("correct"),
                            per_client_correct=last.get("per_client_correct"))


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class Checkpoints:
    """Per-round checkpoints of one method: ``checkpoints/METHOD/round_NNN/`` holding tensors
    (``NAME.safetensors``) and ``state.json``, written last so a directory with it is complete."""

    def __init__(self, out: Path, method: str):
        self.root = out / "checkpoints" / method

    def save(self, round: int, tensors: dict[str, Adapter], state: dict[str, Any]) -> None:

        d = self.root / f"round_{round:03d}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for name, sd in tensors.items():
            save_file({k: v.contiguous() for k, v in sd.items()}, str(d / f"{name}.safetensors"))
        write_json_atomic(d / "state.json", {"round": round, **state})

    def latest(self) -> tuple[int, dict[str, Adapter], dict[str, Any]] | None:

        done = sorted(p for p in self.root.glob("round_*") if (p / "state.json").is_file())
        if not done:
            return None
        d = done[-1]
        state = json.loads((d / "state.json").read_text())
        tensors = {p.stem: load_file(str(p)) for p in d.glob("*.safetensors")}
        return state["round"], tensors, state
