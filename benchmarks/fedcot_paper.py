"""FedCoT paper-style comparison: zero-shot and standalone (labels only) against FedCoT at several ε and the
empty-rationale ablation, on one data split; prints one table (acc, acc_norm per task) and wall time per
stage. Each variant is its own run directory under --out (resumable with --resume).

  python benchmarks/fedcot_paper.py --out runs/fedcot-paper                   # the ε grid {1, 3, 6, 10, ∞} + ablation
  python benchmarks/fedcot_paper.py --out runs/fc-135 --set model.slm=\"builtin:smollm2-135m\" --epsilons 3,10,inf
  # extra FedCoT variants (label=override;override...), e.g. the truncation policy and the adaptive mechanism:
  python benchmarks/fedcot_paper.py --out runs/fc --epsilons inf --no-baselines \
      --variant 'drop=fedcot.epsilon=inf;fedcot.truncated="drop"' --variant 'aem10=fedcot.epsilon=10;fedcot.mechanism="adaptive"'
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from fedkt import progress
from fedkt.registry import load_config
from fedkt.experiment import run_experiment

TASKS = {"arc_easy": "ARC-E", "openbookqa": "OBQA", "arc_challenge": "ARC-C"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/fedcot.toml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--epsilons", default="1,3,6,10,inf", help="ε per token of the FedCoT variants ('' = none)")
    ap.add_argument("--variant", action="append", default=[],
                    help="an extra FedCoT run: LABEL=KEY=VALUE;KEY=VALUE... (config overrides)")
    ap.add_argument("--no-baselines", action="store_true", help="skip zero-shot and standalone")
    ap.add_argument("--ablation-epsilon", default="inf", help="ε of the empty-rationale ablation ('' = skip)")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    variants = [] if a.no_baselines else [("baselines", ["methods=[\"zero_shot\", \"standalone\"]"])]
    if a.ablation_epsilon:  # first: the reference the grid is read against
        variants.append((f"fedcot eps={a.ablation_epsilon}, empty rationales",
                         ['methods=["fedcot"]', f"fedcot.epsilon={a.ablation_epsilon}", "fedcot.empty_rationales=true"]))
    for e in reversed([e for e in a.epsilons.split(",") if e]):  # ∞ first, then the most useful finite ε
        variants.append((f"fedcot eps={e}", ['methods=["fedcot"]', f"fedcot.epsilon={e}"]))
    for v in a.variant:
        label, _, sets = v.partition("=")
        variants.append((f"fedcot {label}", ['methods=["fedcot"]', *[x for x in sets.split(";") if x]]))
    if not a.quiet:
        progress.enable()
    rows = []
    try:
        for i, (label, sets) in enumerate(variants):
            cfg = load_config(a.config, [*a.sets, *sets])
            t0 = time.perf_counter()
            res = run_experiment(cfg, out / f"v{i}", resume=a.resume)
            progress.log(f"{label}: {time.perf_counter() - t0:.0f} s")
            for m, r in res["methods"].items():
                rows.append((label if m == "fedcot" else m, r))
            print_table(rows)  # after every variant: a partial table survives a cut-off run
    finally:
        progress.disable()


def print_table(rows) -> None:
    tasks = [t for t in TASKS if t in rows[0][1]["slm"]]
    print("| method | " + " | ".join(TASKS[t] for t in tasks) + " | avg acc | wall s | stages (s) |")
    print("|---" * (len(tasks) + 4) + "|")
    for label, r in rows:
        s = r["slm"]
        cells = [f"{100 * s[t]['acc']:.1f} ({100 * s[t]['acc_norm']:.1f})" for t in tasks]
        avg = 100 * sum(s[t]["acc"] for t in tasks) / len(tasks)
        stages = ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in (r.get("timings") or {}).items())
        print(f"| {label} | " + " | ".join(cells) + f" | {avg:.1f} | {r.get('wall_s', 0):.0f} | {stages} |")
    n = {TASKS[t]: rows[0][1]["slm"][t]["n"] for t in tasks}
    print(f"\nquestions per task: {n}; acc (acc_norm) in %.")
    for label, r in rows:
        pr = (r.get("per_round") or [{}])[0]
        if pr.get("generation"):
            print(f"{label}: rationales {pr['generation']}")
        if pr.get("privacy"):
            eps = {c: p["prompt_epsilon_mean"] for c, p in pr["privacy"].items()}
            mode = {c: p.get("randomness") for c, p in pr["privacy"].items()}  # changed_fraction stays on the client
            print(f"{label}: mean ε per prompt {json.dumps({c: (None if math.isinf(v) else round(v)) for c, v in eps.items()})}, "
                  f"randomness {mode}", flush=True)


if __name__ == "__main__":
    main()
