"""Multiple-choice scoring speed: one row per (question, choice) vs the two shared-context paths.

    flock /tmp/heavy.lock env OMP_NUM_THREADS=2 python benchmarks/eval_speed.py \\
        --model builtin:smollm2-135m --data-dir ../shared/assets/data --n 200

Rows: ``per-choice`` runs every (context, choice) on its own (the work lm-evaluation-harness does, less
its full-vocabulary log-softmax at every position), ``cache`` runs each context once and fans its KV
cache out to the choices, ``packed`` (the default) puts a question's context and all its choices in one
row with a block mask. Prints questions/s, speed-ups over per-choice and the largest score difference
(float rounding only, ~1e-5). For the comparison with the harness itself see lm_eval_agreement.py.
"""

import argparse
import time

import torch

from fedkt.data.prompts import context, continuations
from fedkt.data.tasks import load_task
from fedkt.evaluate import loglikelihoods
from fedkt.models import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--n", type=int, default=200, help="first N test questions")
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    model, tok = load_model(a.model)
    exs = load_task(a.task, "test", a.data_dir)[:a.n]
    reqs = [(context(e), c) for e in exs for c in continuations(e)]
    loglikelihoods(model, tok, reqs[:16], a.batch_size)  # warm-up
    runs = {"per-choice": dict(share_context=False, method="cache"), "cache": dict(method="cache"),
            "packed": dict(method="packed")}
    res = {}
    for name, kw in runs.items():
        t = time.perf_counter()
        scores = loglikelihoods(model, tok, reqs, a.batch_size, **kw)
        res[name] = (torch.tensor(scores), time.perf_counter() - t)
    print(f"{a.model} {a.task} n={len(exs)} ({len(reqs)} choices), threads={torch.get_num_threads()}")
    base_s, base_t = res["per-choice"]
    for name, (s, t) in res.items():
        diff = (s - base_s).abs().max().item()
        print(f"{name:<11}: {t:7.1f} s  {len(exs) / t:6.2f} questions/s  {base_t / t:5.2f}x  "
              f"max |score diff| {diff:.1e}")


if __name__ == "__main__":
    main()
