"""A run: a directory holding the resolved config, metrics.jsonl, results.json, adapters, checkpoints
and report.md. Methods run in the order the config lists them; results.json and report.md are rewritten
after each method, so nothing finished is lost if a later one fails. ``resume=True`` skips finished
methods and continues federated ones from their last round checkpoint."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fedkt import __version__, progress
from fedkt.config import ConfigError, ExperimentConfig, dump_toml
from fedkt.experiment import Env, write_json_atomic
from fedkt.models import adapter_nbytes, count_parameters, model_nbytes


def new_run_dir(cfg: ExperimentConfig, out: str | Path | None = None) -> Path:
    if out:
        return Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def _model_meta(env: Env) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for role in ("slm", "llm"):
        loaded = env._slm if role == "slm" else env._llm
        if loaded is None:
            continue
        model, _, init = loaded
        # the base model's own weights: peft injects the LoRA tensors into it, so take them out again
        adapter = adapter_nbytes(init)
        adapter_params = sum(v.numel() for v in init.values())
        base = model.get_base_model()
        full = model_nbytes(base) - adapter
        meta[role] = {"spec": getattr(env.cfg.model, role), "params": count_parameters(base) - adapter_params,
                      "model_bytes": full, "adapter_params": adapter_params,
                      "adapter_bytes": adapter, "adapter_fraction": adapter / full}
    return meta


def run_experiment(cfg: ExperimentConfig, out: Path, resume: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cfg_text = dump_toml(cfg)
    results_path = out / "results.json"
    if resume:
        saved = out / "config.toml"
        if saved.is_file() and saved.read_text() != cfg_text:
            raise ConfigError(f"--resume: the config differs from the one {out} was started with "
                              f"({saved}); resume with the same config or start a new run directory")
        results = json.loads(results_path.read_text()) if results_path.is_file() else None
    else:
        if results_path.is_file() or (out / "checkpoints").is_dir():
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        results = None
    (out / "config.toml").write_text(cfg_text)
    results = results or {"name": cfg.name, "fedkt_version": __version__, "methods": {}}
    from fedkt.algorithms import METHODS
    from fedkt.report import write_report

    env = Env.build(cfg, out)
    results["data"] = {"clients": [len(c) for c in env.clients_data], "aux": len(env.aux),
                       "eval": {t: len(e) for t, e in env.eval_sets.items()}}
    for method in cfg.methods:
        if method in results["methods"]:
            progress.log(f"{method}: already done, skipped (resume)")
            continue
        progress.log(f"[bold]== {method}[/]")
        t0 = time.perf_counter()
        res = METHODS[method](env)
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        results["methods"][method] = res
        results["models"] = _model_meta(env)
        write_json_atomic(results_path, results)
        write_report(results, out)
    return results
