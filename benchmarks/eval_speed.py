"""Multiple-choice scoring speed: shared-context KV reuse vs one row per (question, choice).

    python benchmarks/eval_speed.py --model builtin:smollm2-135m --n 200

Prints questions/s for both paths, their ratio, and the largest score difference (should be ~1e-5).
"""

import argparse
import time

import torch

from fedkt.data.partition import subsample
from fedkt.data.prompts import context, continuation
from fedkt.data.tasks import load_task
from fedkt.evaluate import loglikelihoods
from fedkt.models import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    model, tok = load_model(a.model)
    exs = subsample(load_task(a.task, "test", a.data_dir), a.n, 0)
    reqs = [(context(e), continuation(c)) for e in exs for c in e.choices]
    res = {}
    for share in (False, True):
        t = time.perf_counter()
        res[share] = (loglikelihoods(model, tok, reqs, a.batch_size, share_context=share), time.perf_counter() - t)
    diff = (torch.tensor(res[True][0]) - torch.tensor(res[False][0])).abs().max().item()
    print(f"{a.model} {a.task} n={len(exs)} ({len(reqs)} choices), threads={torch.get_num_threads()}")
    print(f"one row per choice : {res[False][1]:7.1f} s  {len(exs) / res[False][1]:6.2f} questions/s")
    print(f"shared context     : {res[True][1]:7.1f} s  {len(exs) / res[True][1]:6.2f} questions/s")
    print(f"speed-up {res[False][1] / res[True][1]:.2f}x, max |score difference| {diff:.2e}")


if __name__ == "__main__":
    main()
