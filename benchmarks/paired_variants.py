"""Paired differences between *runs* (variants of one method, each its own run directory, e.g. what
benchmarks/fedcot_paper.py writes), pooled over seeds: ``fedkt report`` pairs methods inside a run; this
pairs method M of variant directory X with method N of variant directory Y, seed by seed, on the same
question ids, and pools the seeds (fedkt.paired.pool: 95% paired bootstrap stratified by seed and task,
McNemar's exact p, or the clustered test where a side is a share of clients).

  python benchmarks/paired_variants.py --seed-dir /tmp/fc/s0 --seed-dir /tmp/fc/s1 --seed-dir /tmp/fc/s2 \\
      --compare 'fedcot ε=inf' 'fedcot ε=inf, empty rationales' --compare 'fedcot ε=10' 'fedcot ε=inf'

Each seed directory holds variant run directories (v0, v1, ...); a variant is labelled by its methods and,
for FedCoT, ε, mechanism and the empty-rationale ablation read from its config.toml. Without --compare it
prints every variant against zero-shot and standalone, and every FedCoT variant against the others.
"""

from __future__ import annotations

import argparse
import itertools
import tomllib
from pathlib import Path

from fedkt.paired import pool
from fedkt.report import read_results
from fedkt.report_paired import _align, cell, per_question


def labels(run_dir: Path) -> dict[str, str]:
    """label -> method for one variant run directory."""
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    out = {}
    for m in cfg.get("methods", []):
        if m == "fedcollm":
            fc = cfg.get("fedcollm", {})
            lab = "fedcollm"
            if fc.get("select", "last") != "last":
                lab += f", select={fc['select']}"
            if fc.get("aux_schedule", "whole") != "whole":
                lab += f", {fc['aux_schedule']} Dᵃ"
            out[lab] = m
            continue
        if m != "fedcot":
            out[m.replace("_", "-")] = m
            continue
        fc = cfg.get("fedcot", {})
        eps = fc.get("epsilon", 3.0)
        lab = f"fedcot ε={'inf' if eps == float('inf') else f'{eps:g}'}"
        if fc.get("mechanism", "exponential") != "exponential":
            lab += f", {fc['mechanism']}"
        if fc.get("truncated", "keep_unterminated") != "keep_unterminated":
            lab += f", truncated={fc['truncated']}"
        if fc.get("empty_rationales"):
            lab += ", empty rationales"
        out[lab] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed-dir", action="append", required=True)
    ap.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"), default=[])
    ap.add_argument("--role", default="slm")
    ap.add_argument("--per-task", action="store_true", help="also a row per task for each pair")
    ap.add_argument("--round", type=int, default=None,
                    help="pair round N's evaluations (both sides; needs eval.every_round) instead of the final ones")
    a = ap.parse_args()
    seeds = []  # per seed: label -> (results, method)
    for d in a.seed_dir:
        found = {}
        for v in sorted(p for p in Path(d).iterdir() if (p / "results.json").is_file()):
            res = read_results(v)
            for lab, m in labels(v).items():
                if m in res.methods:
                    found[lab] = (res, m)
        seeds.append(found)
    common = [lab for lab in seeds[0] if all(lab in s for s in seeds)]
    print(f"{len(seeds)} seeds; variants in every seed: {', '.join(common)}\n")
    tasks = sorted({t for s in seeds for lab in common for t in s[lab][0].methods[s[lab][1]].metrics.get(a.role, {})})
    head = "".join(f" {t} (mean) |" for t in tasks) if a.per_task else ""
    print(f"| variant | acc % per seed |{head} mean |\n|---|---|{'---|' * (len(tasks) if a.per_task else 0)}---|")
    for lab in common:
        accs, by_task = [], {t: [] for t in tasks}
        for s in seeds:
            res, m = s[lab]
            r = res.methods[m].metrics.get(a.role, {})
            accs.append(sum(t["acc"] for t in r.values()) / max(1, len(r)))
            for t, v in r.items():
                by_task[t].append(v["acc"])
        cols = "".join(f" {100 * sum(v) / len(v):.1f} |" if v else " – |" for v in by_task.values()) if a.per_task else ""
        print(f"| {lab} | {' / '.join(f'{100 * x:.1f}' for x in accs)} |{cols} {100 * sum(accs) / len(accs):.2f} |")
    base = ("zero-shot", "standalone")
    pairs = a.compare or ([(x, b) for x in common for b in base if b in common and x != b
                           and not (x in base and base.index(x) < base.index(b))]
                          + [p for p in itertools.combinations([c for c in common if c.startswith("fedcot")], 2)])
    print(f"\n{'Round ' + str(a.round) if a.round else 'Final'} evaluations paired.")
    print("\n| A − B | pooled over seeds and tasks: diff [95% CI] p | questions | A only / B only |\n|---|---|---|---|")
    for x, y in pairs:
        strata: dict[str, list] = {}
        for s in seeds:
            (ra, ma), (rb, mb) = s[x], s[y]
            qa, qb = per_question(ra, ma, a.role, a.round), per_question(rb, mb, a.role, a.round)
            if not qa or not qb:
                continue
            for t in qa:
                if t in qb:
                    pair = _align(qa[t], qb[t])
                    if pair[0]:
                        strata.setdefault(t, []).append(pair)
        rows = [("", sum(strata.values(), []))]
        if a.per_task and len(strata) > 1:
            rows += [(f" ({t})", strata[t]) for t in strata]
        for suffix, st in rows:
            d = pool(st, n_boot=4000) if st else None
            extra = f"{d.n} | {d.a_only} / {d.b_only}" if d else "– | –"
            print(f"| {x} − {y}{suffix} | {cell(d)} | {extra} |")


if __name__ == "__main__":
    main()
