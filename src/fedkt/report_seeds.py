"""Several runs of one experiment under different seeds -> one table of mean ± sd per method, role and task.

``fedkt report RUN_0 RUN_1 RUN_2 [--out seeds.md]``. Each run directory holds the ``results.json`` and
``config.toml`` that ``fedkt run`` wrote. The runs must score the same tasks and have different seeds;
configs that differ in anything but the seed are named under the table (they are not refused: a thread
count, say, does not change what is measured). A method that ran under fewer seeds than the others shows
its count. The sd is the sample standard deviation (n − 1) of the per-seed accuracies; a task's questions
are a seeded subsample, so it includes the evaluation's sampling error, not only training's. Below the
tables: each method's paired difference to its baselines pooled over the seeds (:mod:`fedkt.report_paired`;
each run's two methods are paired on that run's question ids, whatever questions the other runs scored).
"""

from __future__ import annotations

import statistics
import tomllib
from pathlib import Path
from typing import Any

from fedkt.report import TASK_NAMES, _name, _ordered, read_results
from fedkt.report_paired import section as paired_section
from fedkt.run_results import RunResults


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_run(run_dir: str | Path) -> tuple[RunResults, dict[str, Any]]:
    """(results, flattened config) of one run directory."""
    results = read_results(run_dir)
    c = Path(run_dir) / "config.toml"
    if not c.is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.toml (is it a fedkt run directory?)")
    return results, _flat(tomllib.loads(c.read_text()))


def _cell(xs: list[float], n_runs: int) -> str:
    if not xs:
        return "–"
    m = 100 * statistics.fmean(xs)
    s = f"{m:.1f}" if len(xs) == 1 else f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}"
    return s if len(xs) == n_runs else f"{s} (n={len(xs)})"


def seed_table(runs: list[RunResults], role: str, tasks: list[str]) -> str:
    """Markdown rows "method | task mean ± sd ... | average over tasks mean ± sd" for one role."""
    order = [m for m, _ in _ordered(runs[0])]
    order += [m for r in runs[1:] for m in r.methods if m not in order]
    lines = []
    for m in order:
        per_run = [r.methods[m].metrics[role] for r in runs if m in r.methods and role in r.methods[m].metrics]
        if not per_run:
            continue
        cells = [_cell([x[t]["acc"] for x in per_run], len(runs)) for t in tasks]
        avg = [statistics.fmean(x[t]["acc"] for t in tasks) for x in per_run]
        lines.append(f"| {_name(m)} | " + " | ".join(cells) + f" | {_cell(avg, len(runs))} |")
    if not lines:
        return ""
    head = "| Method | " + " | ".join(TASK_NAMES.get(t, t) for t in tasks) + " | Avg |"
    return "\n".join([head, "|---" * (len(tasks) + 2) + "|", *lines])


def seeds_summary(run_dirs: list[str | Path]) -> str:
    if len(run_dirs) < 2:
        raise ValueError("a seeds summary needs at least two run directories")
    loaded = [load_run(d) for d in run_dirs]
    runs, cfgs = [r for r, _ in loaded], [c for _, c in loaded]
    seeds = [c.get("seed") for c in cfgs]
    for i, s in enumerate(seeds):
        if s in seeds[:i]:
            raise ValueError(f"{run_dirs[i]} and {run_dirs[seeds.index(s)]} both ran seed {s}: one seed would "
                             "count twice")
    scored = [list((r.data or {}).get("eval") or {}) for r in runs]
    tasks = scored[0]
    for d, t in zip(run_dirs, scored):
        if t != tasks:
            raise ValueError(f"{d} scores tasks {t}, {run_dirs[0]} scores {tasks}: only runs of the same tasks "
                             "can be summarised")
    differ = sorted({k for c in cfgs[1:] for k in set(c) | set(cfgs[0])
                     if k != "seed" and c.get(k) != cfgs[0].get(k)})
    parts = [f"# {runs[0].name}: {len(runs)} seeds ({', '.join(str(s) for s in seeds)})", ""]
    for role, title in (("llm", "Server LLM"), ("slm", "Client SLMs")):
        table = seed_table(runs, role, tasks)
        if table:
            parts += [f"## {title}", "", table, ""]
    n = ", ".join(f"{TASK_NAMES.get(t, t)} {runs[0].data['eval'][t]}" for t in tasks)
    parts.append(f"acc in %, mean ± sd over the seeds (sample sd); each seed scores its own seeded subsample of "
                 f"the test split, or all of it where the split has no more questions (questions per task: {n}).")
    parts.append("Configs differ only in the seed." if not differ
                 else "Configs also differ in: " + ", ".join(differ) + ".")
    parts += ["", paired_section(runs, tasks)]
    return "\n".join(parts).rstrip("\n") + "\n"

