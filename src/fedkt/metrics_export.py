"""Per-round metrics where people watch them: every ``metrics.jsonl`` row, as the server writes it, mirrored
to TensorBoard and/or MLflow through their own libraries (``[metrics] tensorboard / mlflow``; optional
extras). ``metrics.jsonl`` stays the source: a sink that fails is reported once and dropped, the run and
its metrics.jsonl go on.

A row ``{"method": "fedavg", "round": 2, "role": "slm", "round_s": 8.1, "metrics": {"arc_easy": {"acc":
0.51, ...}}}`` becomes, at step 2 (0 for rows without a round) and the row's own time, the scalars
``slm/round_s`` and ``slm/arc_easy/acc`` ... of method ``fedavg`` (the ``metrics`` level is left out; a
client's row gets its client id after the role: ``slm/client0/arc_easy/acc``). Methods are kept apart as
TensorBoard runs (``RUN/tensorboard/METHOD/``) and MLflow runs, so one chart shows every method's
``slm/arc_easy/acc``.
Only numbers are exported (no booleans, lists or strings).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fedkt import progress

ROW_KEYS = ("time", "method", "role", "round", "client")
"""Keys of a row that say where its numbers belong; they are not exported as scalars."""


def _flatten(prefix: list[str], value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(prefix + [str(k)], v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out["/".join(prefix)] = float(value)


def row_scalars(row: dict[str, Any]) -> tuple[str, int, float | None, dict[str, float]]:
    """(method, step, wall time, {tag: value}) of one metrics.jsonl row."""
    head = [str(row["role"])] if row.get("role") is not None else []
    cid = row.get("client")
    if cid is not None:
        head.append(cid if isinstance(cid, str) else f"client{cid}")
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in ROW_KEYS:
            continue
        _flatten(head if key == "metrics" else head + [key], value, out)
    step = row.get("round")
    return str(row.get("method", "run")), int(step) if isinstance(step, int) else 0, row.get("time"), out


class TensorBoardSink:
    """One ``SummaryWriter`` per method under ``root``; flushed after every row (live)."""

    name = "TensorBoard"

    def __init__(self, root: Path):
        # deferred: torch.utils.tensorboard needs the optional tensorboard package ([tensorboard] extra)
        from torch.utils.tensorboard import SummaryWriter

        self.root, self._make, self._writers = root, SummaryWriter, {}

    def write(self, method: str, step: int, wall: float | None, scalars: dict[str, float]) -> None:
        if method not in self._writers:
            self._writers[method] = self._make(log_dir=str(self.root / method))
        w = self._writers[method]
        for tag, v in scalars.items():
            w.add_scalar(tag, v, step, walltime=wall)
        w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()


def _params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, bool)) or v is None else str(v)
    return out


class MLflowSink:
    """One MLflow run per method in a local file store (no server), through ``MlflowClient``: the config as
    params when a run is created, every row's scalars by ``log_batch`` (written at once: live). The method ->
    run id map is kept in ``RUN/mlflow_runs.json`` so that ``--resume`` continues the same runs."""

    name = "MLflow"

    def __init__(self, store: Path, experiment: str, run_dir: Path, params: dict[str, str]):
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless this is set; fedkt wants
        # a serverless local store (docs/results.md)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # deferred: mlflow is an optional extra ([mlflow], mlflow-skinny)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        store.mkdir(parents=True, exist_ok=True)
        self.client, self._metric, self._param = MlflowClient(tracking_uri=store.resolve().as_uri()), Metric, Param
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_dir, self.params = run_dir, params
        self._ids_file = run_dir / "mlflow_runs.json"
        self.run_ids: dict[str, str] = json.loads(self._ids_file.read_text()) if self._ids_file.is_file() else {}
        self._open: set[str] = set()

    def _run(self, method: str) -> str:
        if method in self._open:
            return self.run_ids[method]
        if method in self.run_ids:  # a resumed run
            self.client.update_run(self.run_ids[method], status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=f"{self.run_dir.name}/{method}",
                                         tags={"fedkt.method": method, "fedkt.run_dir": str(self.run_dir)})
            rid = run.info.run_id
            items = [self._param(k, v[:6000]) for k, v in self.params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(rid, params=items[i:i + 100])
            self.run_ids[method] = rid
            self._ids_file.write_text(json.dumps(self.run_ids, indent=1))
        self._open.add(method)
        return self.run_ids[method]

    def write(self, method: str, step: int, wall: float | None, scalars: dict[str, float]) -> None:
        rid = self._run(method)
        ms = int((wall if wall is not None else 0.0) * 1000)
        items = [self._metric(k, v, ms, step) for k, v in scalars.items() if math.isfinite(v)]
        for i in range(0, len(items), 1000):  # at most 1000 metrics per batch
            self.client.log_batch(rid, metrics=items[i:i + 1000])

    def close(self) -> None:
        for method in sorted(self._open):
            self.client.set_terminated(self.run_ids[method])
        self._open.clear()


class MetricsExporter:
    """The configured sinks of a run; :meth:`export` mirrors one metrics.jsonl row to each."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)

    @classmethod
    def for_run(cls, cfg, out: Path) -> "MetricsExporter":
        """The sinks ``cfg.metrics`` asks for (none: an exporter that does nothing)."""
        m, sinks = cfg.metrics, []
        if m.tensorboard:
            sinks.append(TensorBoardSink(out / "tensorboard"))
        if m.mlflow:
            store = Path(m.mlflow_dir.removeprefix("file://")) if m.mlflow_dir else out / "mlruns"
            sinks.append(MLflowSink(store, m.mlflow_experiment or cfg.name, out, _params(cfg.to_dict())))
        return cls(sinks)

    def export(self, row: dict[str, Any]) -> None:
        if not self.sinks:
            return
        method, step, wall, scalars = row_scalars(row)
        if not scalars:
            return
        for sink in list(self.sinks):
            try:
                sink.write(method, step, wall, scalars)
            except Exception as e:  # an exporter must not stop a run: metrics.jsonl is the source
                progress.log(f"[yellow]metrics export to {sink.name} failed ({type(e).__name__}: {e}); it is off "
                             "for the rest of the run, metrics.jsonl goes on")
                self.sinks.remove(sink)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # closing is best effort, as exporting
                progress.log(f"[yellow]closing the {sink.name} export failed ({type(e).__name__}: {e})")
