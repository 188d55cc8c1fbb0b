"""A run: a directory holding the resolved config, metrics.jsonl, results.json, adapters, checkpoints
and report.md. Methods run in the order the config lists them; results.json and report.md are rewritten
after each method, so nothing finished is lost if a later one fails. ``resume=True`` skips finished
methods and continues federated ones from their last round checkpoint."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

from fedkt import __version__, progress, registry
from fedkt.config import ConfigError, ExperimentConfig, dump_toml
from fedkt.report import write_report
from fedkt.rounds import run_rounds, write_json_atomic
from fedkt.run_results import MethodResult, RunResults
from fedkt.server import ServerContext
from fedkt.simulation import Simulation


def new_run_dir(cfg: ExperimentConfig, out: str | Path | None = None) -> Path:
    if out:
        return Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def set_threads(cfg: ExperimentConfig) -> None:
    """``model.threads`` (0: torch's default) for this process's torch."""
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)


def run_method(server: ServerContext, name: str) -> MethodResult:
    """Run one registered method on ``server``: its round algorithm through the round driver, or its
    one-shot procedure."""
    spec = registry.get(name)
    t0 = time.perf_counter()
    result = run_rounds(server, spec) if spec.algorithm is not None else spec.run(server)
    result.wall_s = round(time.perf_counter() - t0, 2)
    return result


def _with_defaults(cfg_path: Path) -> str | None:
    """The saved config re-read with today's schema: settings added to fedkt since the run started take their
    defaults, so a run directory written by an older version resumes when nothing it set has changed."""
    try:
        return dump_toml(registry.load_config(cfg_path))
    except (ConfigError, OSError):
        return None


def run_experiment(cfg: ExperimentConfig, out: Path, resume: bool = False,
                   make_server: Callable[[ExperimentConfig, Path], tuple[ServerContext, dict]] | None = None
                   ) -> dict[str, Any]:
    """Run ``cfg``'s methods (in simulation, or on the runtime ``make_server(cfg, out)`` returns the server
    context and data summary of); returns the content of results.json."""
    set_threads(cfg)
    out.mkdir(parents=True, exist_ok=True)
    cfg_text = dump_toml(cfg)
    results_path = out / "results.json"
    saved = None
    if resume:
        cfg_path = out / "config.toml"
        if cfg_path.is_file() and cfg_path.read_text() != cfg_text and _with_defaults(cfg_path) != cfg_text:
            raise ConfigError(f"--resume: the config differs from the one {out} was started with "
                              f"({cfg_path}); resume with the same config or start a new run directory")
        saved = RunResults.from_dict(json.loads(results_path.read_text())) if results_path.is_file() else None
    elif results_path.is_file() or (out / "checkpoints").is_dir():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    (out / "config.toml").write_text(cfg_text)
    results = saved or RunResults(name=cfg.name, fedkt_version=__version__)

    if make_server is None:
        sim = Simulation(cfg, out)
        server, results.data = sim.server(), sim.data_summary()
    else:
        server, results.data = make_server(cfg, out)
    results.questions = server.questions()
    for method in cfg.methods:
        if method in results.methods:
            progress.log(f"{method}: already done, skipped (resume)")
            continue
        progress.log(f"[bold]== {method}[/]")
        results.methods[method] = run_method(server, method)
        results.models = {role: m.describe() for role, m in server.loaded_models().items()}
        write_json_atomic(results_path, results.to_dict())
        write_report(results, out)
    server.close_exports()  # (a run that fails leaves its MLflow runs RUNNING: they did not finish)
    return results.to_dict()
