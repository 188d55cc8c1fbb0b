"""FedCoLLM's SLM side, round by round: before and after the server's distillation, against FedAvg.

Runs a config (default: the quickstart) for the methods given (default FedCoLLM and FedAvg) with every
round evaluated, and records what a plain run does not:

* the SLM's test accuracy on the FedAvg aggregate θᵗ'⁰ *before* the server's distillation, beside the
  distilled θᵗ⁺¹ the clients get next (``--before``; one more SLM evaluation per round);
* every distillation step's losses (CE and KL of each model), from the loop's history;
* per-question correctness of every evaluation (question id -> right/wrong), so the final SLMs of two
  methods compare as a paired difference (``fedkt.paired.compare``: 95% paired-bootstrap CI, McNemar p);
* with ``fedcollm.select = "best"``: the validation scores of every candidate and the step each model kept.

Writes ``diagnose.json`` (all of it) into the run directory and prints the per-round table and the paired
differences. Several run directories (seeds) pool with ``--pool DIR DIR ...`` (``fedkt.paired.pool``).

  /work/wt/heavy python benchmarks/fedcollm_diagnose.py --out /tmp/fc-diag-s0 --before \\
      --set federation.rounds=3 --set model.threads=1
  python benchmarks/fedcollm_diagnose.py --pool /tmp/fc-diag-s0 /tmp/fc-diag-s1 --a fedcollm --b fedavg
  python benchmarks/fedcollm_diagnose.py --pairs /tmp/fc-sel-s0 /tmp/fc-diag-s0 --a fedcollm --b fedavg
  python benchmarks/fedcollm_diagnose.py --tiny --out /tmp/fc-diag-tiny --before    # driver check, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import fedkt.evaluate as fe  # noqa: E402
from fedkt.algorithms import fedcollm as fc  # noqa: E402
from fedkt.experiment import run_experiment  # noqa: E402
from fedkt.paired import pool  # noqa: E402
from fedkt.registry import load_config  # noqa: E402

PER_Q: dict[str, dict[str, bool]] = {}
"""desc of an evaluation ("fedcollm r2 slm arc_easy") -> {question id: correct}."""
KD_HISTORY: list[dict[str, list[float]]] = []


def install_hooks(before: bool) -> None:
    score = fe.score_multiple_choice

    def recording_score(model, tok, examples, batch_size=32, desc="eval", per_question=None):
        per_q = fe.choice_loglikelihoods(model, tok, examples, batch_size, desc)
        preds = [fe.predictions(ex, lls) for ex, lls in zip(examples, per_q)]
        acc = [p[0] == ex.answer for p, ex in zip(preds, examples)]
        acc_norm = [p[1] == ex.answer for p, ex in zip(preds, examples)]
        PER_Q[desc] = {ex.id: r for ex, r in zip(examples, acc)}
        if per_question is not None:  # fedkt's own per-question record (where evaluate keeps one)
            from fedkt.run_results import bits

            per_question.update(acc=bits(acc), acc_norm=bits(acc_norm))
        n = len(examples)
        return {"acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n, "n": n}

    assert score is not None
    fe.score_multiple_choice = recording_score

    loop = fc.run_loop

    def recording_loop(items, step, models, desc, total, show=("loss",)):
        res = loop(items, step, models, desc, total, show)
        if "server distill" in desc:
            KD_HISTORY.append({"desc": desc, **res.history})
        return res

    fc.run_loop = recording_loop

    if before:
        after = fc.FedCoLLM.after_aggregate

        def after_aggregate(self, server, fed, state, theta, rnd, out):
            out.entry["slm_before_kd"] = server.evaluate("slm", theta, f"fedcollm r{rnd} before-kd")
            return after(self, server, fed, state, theta, rnd, out)

        fc.FedCoLLM.after_aggregate = after_aggregate


def tiny_sets(out: Path) -> list[str]:
    from benchlib import tiny_fedcollm_sets

    return tiny_fedcollm_sets(out, 16, 48, 2, 4)


def per_question(d: dict, method: str, role: str, rnd: int, task: str, tag: str = "") -> dict[str, bool] | None:
    return d["per_question"].get(f"{method} r{rnd}{tag} {role} {task}")


def table(d: dict) -> list[str]:
    res, rounds, tasks = d["results"]["methods"], d["rounds"], d["tasks"]
    lines = []
    for task in tasks:
        lines.append(f"\n{task}: acc % per round (SLM before KD = the FedAvg aggregate θᵗ'⁰, after = θᵗ⁺¹)")
        lines.append("| method | role | " + " | ".join(f"r{r}" for r in range(1, rounds + 1)) + " |")
        lines.append("|---|---|" + "---|" * rounds)
        for m, r in res.items():
            for role in ("slm", "llm"):
                cells = [e.get(role, {}).get(task, {}).get("acc") for e in r.get("per_round", [])]
                if any(c is not None for c in cells):
                    lines.append(f"| {m} | {role} | " + " | ".join("–" if c is None else f"{100 * c:.1f}"
                                                                   for c in cells) + " |")
            before = [e.get("slm_before_kd", {}).get(task, {}).get("acc") for e in r.get("per_round", [])]
            if any(c is not None for c in before):
                lines.append(f"| {m} | slm before KD | " + " | ".join("–" if c is None else f"{100 * c:.1f}"
                                                                      for c in before) + " |")
    for m, r in res.items():
        for e in r.get("per_round", []):
            s = e.get("distill")
            if s:
                keys = ("ce_g", "kl_g", "ce_f", "kl_f")
                lines.append(f"{m} r{e['round']} distill: " + ", ".join(
                    f"{k} {s[k + '_first']:.3f}->{s[k + '_last']:.3f}" for k in keys if k + "_first" in s)
                    + "".join(f"; {k} {s[k]}" for k in sorted(s) if k.startswith(("val_", "selected_"))))
    return lines


def paired_lines(pairs: list[tuple[Path, Path]], a: str, b: str, role: str, rnd: int = 0) -> list[str]:
    """Method ``a`` of each pair's first run against method ``b`` of its second (the same run, or one with the
    same seed and data), on the questions both scored, after round ``rnd`` (0: the last); pooled over pairs."""
    lines = []
    loaded = [(json.loads((pa / "diagnose.json").read_text()), json.loads((pb / "diagnose.json").read_text()))
              for pa, pb in pairs]
    for task in loaded[0][0]["tasks"]:
        runs = []
        for da, db in loaded:
            qa = per_question(da, a, role, rnd or da["rounds"], task)
            qb = per_question(db, b, role, rnd or db["rounds"], task)
            if qa is None or qb is None:
                continue
            if set(qa) != set(qb):
                raise SystemExit(f"{task}: the two runs scored different questions; pair runs of the same seed")
            ids = sorted(qa)
            runs.append(([qa[i] for i in ids], [qb[i] for i in ids]))
        if not runs:
            continue
        pd = pool(runs)
        lines.append(f"{role} {task} {a} − {b} (round {rnd or 'last'}, {len(runs)} run(s), {pd.n} questions): "
                     f"{100 * pd.diff:+.1f} points, 95% CI [{100 * pd.ci_low:+.1f}, {100 * pd.ci_high:+.1f}], "
                     f"McNemar p = {pd.p_mcnemar:.3f} ({pd.a_only} vs {pd.b_only} discordant)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/quickstart.toml")
    ap.add_argument("--out")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override, as `fedkt run --set`")
    ap.add_argument("--methods", default="fedcollm,fedavg")
    ap.add_argument("--before", action="store_true", help="also evaluate the SLM aggregate before distillation")
    ap.add_argument("--last-only", action="store_true", help="evaluate the last round only (eval.every_round=false)")
    ap.add_argument("--tiny", action="store_true", help="tiny random models, seconds: checks the driver only")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--pool", nargs="+", type=Path, help="print paired differences pooled over these runs")
    ap.add_argument("--pairs", nargs="+", type=Path,
                    help="A_RUN B_RUN [A_RUN B_RUN ...]: method --a of each A_RUN against --b of its B_RUN, pooled")
    ap.add_argument("--round", type=int, default=0, help="round to compare (0: the last)")
    ap.add_argument("--a", default="fedcollm")
    ap.add_argument("--b", default="fedavg")
    a = ap.parse_args()
    if a.pool or a.pairs:
        if a.pairs and len(a.pairs) % 2:
            raise SystemExit("--pairs takes run directories two by two")
        pairs = [(p, p) for p in a.pool or []] + list(zip((a.pairs or [])[::2], (a.pairs or [])[1::2]))
        for role in ("slm", "llm"):
            print("\n".join(paired_lines(pairs, a.a, a.b, role, a.round)))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = json.dumps(a.methods.split(","))
    sets = [*(tiny_sets(out) if a.tiny else []), *a.sets, f"methods={methods}",
            f"eval.every_round={'false' if a.last_only else 'true'}"]
    cfg = load_config(None if a.tiny else a.config, sets)
    install_hooks(a.before)
    results = run_experiment(cfg, out / "run", resume=a.resume)
    d: dict[str, Any] = {"sets": sets, "rounds": cfg.federation.rounds, "tasks": list(cfg.data.tasks),
                         "results": results, "per_question": PER_Q, "kd_history": KD_HISTORY}
    (out / "diagnose.json").write_text(json.dumps(d, indent=1))
    print("\n".join(table(d)))
    for role in ("slm", "llm"):
        print("\n".join(paired_lines([(out, out)], a.a, a.b, role)))


if __name__ == "__main__":
    main()
