"""FDKT vs local-only as a *paired* comparison: per-question correctness of every client's final SLM.

``run`` mode runs one experiment (any config + --set overrides) and records, next to results.json, which
questions each client's SLM got right (``perq.json``: {"<method> <client> <task>": {question id: [acc,
acc_norm]}}), by wrapping ``fedkt.evaluate.score_multiple_choice`` in this process (same scores; the
scorer's own numbers stay in results.json). ``compare`` mode pools the clients' paired differences of two
such files (method A of one run vs method B of another, same split, seed and questions) with
``fedkt.paired.pool``: difference, 95% paired-bootstrap CI, McNemar's p.

  python benchmarks/fdkt_paired.py run --out /tmp/x/before examples/fdkt.toml --set 'methods=["standalone","fdkt"]'
  python benchmarks/fdkt_paired.py compare /tmp/x/after/perq.json fdkt /tmp/x/before/perq.json standalone
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run(a) -> None:
    import fedkt.evaluate as E
    from fedkt import progress
    from fedkt.experiment import run_experiment
    from fedkt.registry import load_config

    perq: dict[str, dict[str, list[int]]] = {}
    orig = E.score_multiple_choice

    def recording(model, tok, examples, batch_size=32, desc="eval", per_question=None):
        pq: dict = {}
        out = orig(model, tok, examples, batch_size, desc, pq)  # bit-strings in the examples' order
        perq[desc] = {ex.id: [int(pq["acc"][i]), int(pq["acc_norm"][i])] for i, ex in enumerate(examples)}
        if per_question is not None:
            per_question.update(pq)
        return out

    E.score_multiple_choice = recording
    cfg = load_config(a.config, a.sets)
    out = Path(a.out)
    progress.enable()
    t0 = time.perf_counter()
    try:
        res = run_experiment(cfg, out, resume=a.resume)
    finally:
        E.score_multiple_choice = orig
        progress.disable()
    (out / "perq.json").write_text(json.dumps(perq, indent=0))
    wall = time.perf_counter() - t0
    for m, r in res["methods"].items():
        print(m, json.dumps(r["slm"]), f"timings={json.dumps(r.get('timings', {}))}")
        if m == "fdkt":
            st = r["fdkt"]["stages"]
            print("fdkt stages:", json.dumps({k: v for k, v in st.items() if k != "per_client"}))
    print(f"wall {wall:.0f} s")


def per_client(perq: dict, method: str) -> dict[tuple[str, str], dict[str, list[int]]]:
    """{(client, task): {qid: [acc, acc_norm]}} of one method (keys "<method> <client> <task>")."""
    out = {}
    for k, v in perq.items():
        parts = k.split()
        if len(parts) == 3 and parts[0] == method:
            out[(parts[1], parts[2])] = v
    return out


def compare(a) -> None:
    from fedkt.paired import pool

    A = per_client(json.loads(Path(a.a).read_text()), a.method_a)
    B = per_client(json.loads(Path(a.b).read_text()), a.method_b)
    if A.keys() != B.keys() or not A:
        raise SystemExit(f"different (client, task) sets: {sorted(A)} vs {sorted(B)}")
    for j, metric in enumerate(("acc", "acc_norm")):
        for task in sorted({t for _, t in A}):
            runs = []
            for (c, t) in sorted(A):
                if t != task:
                    continue
                if A[(c, t)].keys() != B[(c, t)].keys():
                    raise SystemExit(f"{c} {t}: different questions")
                ids = sorted(A[(c, t)])
                runs.append(([A[(c, t)][i][j] for i in ids], [B[(c, t)][i][j] for i in ids]))
            d = pool(runs)
            print(f"{task} {metric}: {a.method_a} − {a.method_b} = {100 * d.diff:+.2f} points, 95% CI "
                  f"[{100 * d.ci_low:+.2f}, {100 * d.ci_high:+.2f}], McNemar p = {d.p_mcnemar:.3f} "
                  f"(n = {d.n} client-questions over {d.runs} clients; {d.a_only} only A right, {d.b_only} only B)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run")
    r.add_argument("config", nargs="?")
    r.add_argument("--out", required=True)
    r.add_argument("--set", dest="sets", action="append", default=[])
    r.add_argument("--resume", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("method_a")
    c.add_argument("b")
    c.add_argument("method_b")
    a = p.parse_args()
    run(a) if a.mode == "run" else compare(a)


if __name__ == "__main__":
    main()
