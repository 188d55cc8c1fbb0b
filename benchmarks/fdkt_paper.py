"""FDKT paper-style comparison, and the cost of a DP-SGD step on FDKT's training batch.

Paper-style (Li et al. 2024, Table 2 layout): zero-shot and local-only training (``standalone``) against
FDKT at several ε, on one data split; prints accuracy per task, ε spent per client, the counts through
every stage (generated, parsed, kept, augmented, final) and wall time per stage. Each variant is its
own run directory under --out (resumable with --resume; the synthetic set is saved after synthesis).

  python benchmarks/fdkt_paper.py --out runs/fdkt-paper
  python benchmarks/fdkt_paper.py --out runs/fdkt-135 --epsilons 3 --set model.slm=\\"builtin:smollm2-135m\\"

Step cost (``--ratio``): a plain LoRA training step against a DP-SGD step (Opacus per-sample gradients,
clipping, noise) on the *same* batch: 8 of FDKT's DP-training examples ("write a question" prefix +
an ARC-Easy question in the synthetic template), same model, same LoRA, AdamW, alternating repeats,
best repeat per path (``benchmarks/dp_sgd_cost.py`` does the timing):

  flock /tmp/heavy.lock env OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/fdkt_paper.py --ratio
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

TASKS = {"arc_easy": "ARC-E", "openbookqa": "OBQA", "arc_challenge": "ARC-C"}


def ratio(model_spec: str, batch: int, steps: int, tiny_steps: int, repeats: int, skip_real: bool) -> None:
    from dp_sgd_cost import bench, tiny_llama  # benchmarks/ is on sys.path when run as a script

    from fedkt.algorithms.fdkt import generation_text
    from fedkt.data.collate import make_sft_example
    from fedkt.data.tasks import load_task
    from fedkt.models import load_model

    model, tok = load_model(model_spec)
    exs = [e for e in load_task("arc_easy", "train") if len(e.choices) == 4][:batch]
    data = [make_sft_example(tok, *generation_text(e), 256) for e in exs]
    lens = [len(d.input_ids) for d in data]
    print(f"FDKT DP-training batch: {batch} examples, {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f})")
    bench(f"tiny Llama (2 layers, hidden 64, vocab {len(tok)})", tiny_llama(tok), tok, data, tiny_steps, repeats)
    if not skip_real:
        bench(model_spec, model, tok, data, steps, repeats)


def fmt_eps(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.2f}"


def paper(a) -> None:
    from fedkt import progress
    from fedkt.registry import load_config
    from fedkt.experiment import run_experiment

    out = Path(a.out)
    variants = [("local-only", ['methods=["zero_shot", "standalone"]'])]
    for e in a.epsilons.split(","):
        variants.append((f"FDKT ε={e}", ['methods=["fdkt"]', f"fdkt.epsilon={e}"]))
    if not a.quiet:
        progress.enable()
    rows, recs = [], []
    try:
        for i, (label, sets) in enumerate(variants):
            cfg = load_config(a.config, [*a.sets, *sets])
            t0 = time.perf_counter()
            res = run_experiment(cfg, out / f"v{i}", resume=a.resume)
            progress.log(f"{label}: {time.perf_counter() - t0:.0f} s")
            for m, r in res["methods"].items():
                rows.append((label if m == "fdkt" else m, r))
                if m == "fdkt":
                    recs.append((label, r))
    finally:
        progress.disable()
    tasks = [t for t in TASKS if t in rows[0][1]["slm"]]
    print("| method | " + " | ".join(TASKS[t] for t in tasks) + " | avg acc | wall s |")
    print("|---" * (len(tasks) + 3) + "|")
    for label, r in rows:
        s = r["slm"]
        cells = [f"{100 * s[t]['acc']:.1f} ({100 * s[t]['acc_norm']:.1f})" for t in tasks]
        avg = 100 * sum(s[t]["acc"] for t in tasks) / len(tasks)
        print(f"| {label} | " + " | ".join(cells) + f" | {avg:.1f} | {r.get('wall_s', 0):.0f} |")
    print("\n| variant | ε spent per client | generated | parsed | kept | augmented valid | final | stages (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in recs:
        rec = r["fdkt"]
        st = rec["stages"]
        eps = ", ".join(fmt_eps(p["epsilon_spent"]) for p in rec["privacy"].values())
        tm = ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in r["timings"].items())
        print(f"| {label} | {eps} | {st['generated']} | {st['parsed']} | {st['kept']} | {st['augmented_valid']} | "
              f"{st['final']} | {tm} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", action="store_true", help="only the DP-SGD vs plain step cost")
    ap.add_argument("--config", default="examples/fdkt.toml")
    ap.add_argument("--out", default="runs/fdkt-paper")
    ap.add_argument("--epsilons", default="1,3,8,inf")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--model", default="builtin:smollm2-135m", help="--ratio: the real model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tiny-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny-only", action="store_true")
    a = ap.parse_args()
    if a.ratio:
        ratio(a.model, a.batch, a.steps, a.tiny_steps, a.repeats, a.tiny_only)
    else:
        paper(a)


if __name__ == "__main__":
    main()
