"""FedCoLLM ablation: the paper's choices, one at a time, against the config's own settings.

Runs FedCoLLM once per variant on the config given: the config as it is ("default"), then each option of
``fedkt.algorithms.fedcollm.PAPER_CHOICES`` changed alone (to the paper's value, or for ``kl_direction``,
whose default already is the paper's, to the other direction), then all the paper's choices together.
A variant that equals the config's own setting is reported once, as "default". Prints one table: SLM and
LLM acc per task, their averages, the change of each average from "default", the run's wall time and its
server-distillation time. Every run is its own directory under --out (resumable with --resume).

* ``--per-task`` runs every variant once per task of ``data.tasks`` (the paper's per-dataset runs: each
  task's clients, auxiliary set and evaluation alone) instead of once on the pooled tasks.
* ``--seeds 0,1,2`` runs every variant per seed and reports mean ± sd over the seeds.
* ``--tiny`` builds two tiny random same-tokenizer models and a small config (bundled ARC-Easy): a
  seconds-long end-to-end check of the driver, not a measurement.

  python benchmarks/fedcollm_ablation.py --config examples/fedcollm.toml --out runs/fc-ablation \\
      --set 'model.slm="builtin:smollm2-135m"' --per-task --seeds 0,1,2
  python benchmarks/fedcollm_ablation.py --tiny --out /tmp/fc-ablation-tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from fedkt import progress  # noqa: E402
from fedkt.algorithms.fedcollm import FedCoLLMConfig  # noqa: E402
from fedkt.algorithms.fedcollm import PAPER_CHOICES  # noqa: E402
from fedkt.registry import load_config  # noqa: E402
from fedkt.experiment import run_experiment  # noqa: E402

LABELS = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "openbookqa": "OBQA", "commonsense_qa": "CSQA",
          "gsm8k": "GSM8K"}
OTHER = {"kl_direction": {"forward": "reverse", "reverse": "forward"}}


def toml_value(v: Any) -> str:
    return json.dumps(v)


def variants(base: dict[str, Any], control: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, [fedcollm] overrides): default, one option at a time, all the paper's choices, [λ = 0]."""
    out: list[tuple[str, dict[str, Any]]] = [("default", {})]
    for key, paper in PAPER_CHOICES.items():
        value = OTHER[key][base[key]] if key in OTHER and base[key] == paper else paper
        if value != base[key]:
            out.append((f"{key}={value}", {key: value}))
    paper_all = {k: v for k, v in PAPER_CHOICES.items() if v != base[k]}
    if len(paper_all) > 1:
        out.append(("paper: all of " + ", ".join(paper_all), paper_all))
    if control:
        out.append(("control: kd_lambda=0", {"kd_lambda": 0.0}))
    return out


def tiny_sets(out: Path) -> list[str]:
    from benchlib import tiny_fedcollm_sets

    return tiny_fedcollm_sets(out, 8, 40, 1, 2)


def fmt(xs: list[float]) -> str:
    if not xs:
        return "–"
    m = 100 * statistics.fmean(xs)
    return f"{m:.1f}" if len(xs) == 1 else f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/fedcollm.toml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override, as `fedkt run --set`")
    ap.add_argument("--per-task", action="store_true", help="one run per task (the paper's per-dataset runs)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: the config's seed)")
    ap.add_argument("--only", default="", help="comma-separated variant labels (or label prefixes) to run")
    ap.add_argument("--control", action="store_true", help="add a kd_lambda=0 row (no distillation)")
    ap.add_argument("--tiny", action="store_true", help="tiny random models, seconds: checks the driver only")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    config = None if a.tiny else a.config
    sets = [*(tiny_sets(out) if a.tiny else []), *a.sets, 'methods=["fedcollm"]']
    base_cfg = load_config(config, sets)
    base = vars(base_cfg.section(FedCoLLMConfig))
    tasks = list(base_cfg.data.tasks)
    groups = [[t] for t in tasks] if a.per_task else [tasks]
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [base_cfg.seed]
    todo = variants(base, a.control)
    if a.only:
        keep = [x.strip() for x in a.only.split(",")]
        todo = [v for v in todo if v[0] == "default" or any(v[0].startswith(k) for k in keep)]
    if not a.quiet:
        progress.enable()
    rows = []
    try:
        for i, (label, over) in enumerate(todo):
            acc: dict[str, dict[str, list[float]]] = {"slm": {}, "llm": {}}
            wall, distill, n = [], [], {}
            for seed in seeds:
                w = d = 0.0
                for group in groups:
                    extra = [f"fedcollm.{k}={toml_value(v)}" for k, v in over.items()]
                    extra += [f"seed={seed}", f"data.tasks={json.dumps(group)}",
                              f"data.eval_tasks={json.dumps(group)}"]
                    cfg = load_config(config, [*sets, *extra])
                    run_dir = out / f"v{i}" / f"seed{seed}" / ("+".join(group) if a.per_task else "pooled")
                    t0 = time.perf_counter()
                    res = run_experiment(cfg, run_dir, resume=a.resume)["methods"]["fedcollm"]
                    progress.log(f"{label} seed {seed} {'+'.join(group)}: {time.perf_counter() - t0:.1f} s")
                    w += res.get("wall_s") or 0.0
                    d += (res.get("timings") or {}).get("distill_s", 0.0)
                    for role in ("slm", "llm"):
                        for t in group:
                            acc[role].setdefault(t, []).append(res[role][t]["acc"])
                            n[t] = res[role][t]["n"]
                wall.append(w)
                distill.append(d)
            rows.append((label, over, acc, wall, distill, n))
    finally:
        progress.disable()

    def avg(acc_role: dict[str, list[float]]) -> list[float]:
        return [statistics.fmean(acc_role[t][s] for t in tasks) for s in range(len(seeds))]

    ref = {role: statistics.fmean(avg(rows[0][2][role])) for role in ("slm", "llm")}
    heads = [f"SLM {LABELS.get(t, t)}" for t in tasks] + ["SLM avg", "ΔSLM"]
    heads += [f"LLM {LABELS.get(t, t)}" for t in tasks] + ["LLM avg", "ΔLLM", "wall s", "distill s"]
    print("\n| variant | " + " | ".join(heads) + " |")
    print("|---" * (len(heads) + 1) + "|")
    for label, over, acc, wall, distill, n in rows:
        cells = []
        for role in ("slm", "llm"):
            cells += [fmt(acc[role][t]) for t in tasks]
            av = avg(acc[role])
            cells += [fmt(av), f"{100 * (statistics.fmean(av) - ref[role]):+.1f}"]
        cells += [f"{statistics.fmean(wall):.1f}", f"{statistics.fmean(distill):.1f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    mode = "one run per task" if a.per_task else "tasks pooled in one run"
    print(f"\nacc in % ({mode}; seeds {seeds}{', mean ± sd' if len(seeds) > 1 else ''}); questions per task: "
          f"{ {LABELS.get(t, t): k for t, k in rows[0][5].items()} }; wall s and distill s per variant "
          f"{'(summed over its task runs)' if a.per_task else ''}".rstrip() + ".")
    keys = ("kd_steps", "kd_lambda", "top_k", *PAPER_CHOICES)
    print("default [fedcollm]: " + ", ".join(f"{k}={base[k]}" for k in keys))


if __name__ == "__main__":
    main()
