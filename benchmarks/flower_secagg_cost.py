"""SecAgg+ cost vs plain aggregation, same tiny experiment: 3 clients reply a LoRA-sized update, the server
gets the weighted mean. Figures per aggregation (median of --repeats): LocalFederation (plain mean),
Flower in process plain (`call` + mean on the server) and Flower in process SecAgg+ (`aggregate`), with the
bytes metered per aggregation (plain: fedkt codec bytes; SecAgg+: Flower wire bytes of all four stages)
and the max abs error of the SecAgg+ mean vs the exact one.

    PYTHONPATH=src flock /tmp/heavy.lock env OMP_NUM_THREADS=2 /work/venvs/flower/bin/python \\
        benchmarks/flower_secagg_cost.py

Deployment figures (real SuperLink/SuperNodes, TLS) come from tests/test_flower_deployment.py's print.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from fedkt.clients import ClientContext
from fedkt.federation import Message, weighted_mean
from fedkt.federation.local import LocalFederation


def make_handler(numel: int):
    def fit(ctx, msg):
        i = int(ctx.cid[1:])
        g = torch.Generator().manual_seed(i)
        return Message(tensors={"lora_A": torch.randn(numel // 2, generator=g) * 0.02,
                                "lora_B": torch.randn(numel - numel // 2, generator=g) * 0.02},
                       meta={"num_examples": 100 * (i + 1)})
    return fit


def timed(fn, repeats):
    out, ts = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000", help="floats per client update")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from fedkt.federation.flower import FlowerFederation
    from fedkt.federation.flower_secagg import error_bound

    logging.getLogger("flwr").setLevel(logging.WARNING)
    clients = ["c0", "c1", "c2"]
    print("| floats/client | local plain | Flower plain | Flower SecAgg+ | SecAgg+/plain (Flower) | plain bytes | "
          "SecAgg+ bytes | max err (bound) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for numel in [int(s) for s in args.sizes.split(",")]:
        handlers = {"fit": make_handler(numel)}
        pay = {c: Message(meta={}) for c in clients}
        local = LocalFederation([ClientContext(c) for c in clients], handlers)
        _, t_local = timed(lambda: local.aggregate("fit", pay), args.repeats)
        with FlowerFederation.in_process(clients, handlers) as fed:
            def plain():
                r = fed.call("fit", pay)
                return weighted_mean([m.tensors for m in r.values()], [m.meta["num_examples"] for m in r.values()])
            exact, t_plain = timed(plain, args.repeats)
            n0 = len(fed.ledger.entries)
            plain_bytes = sum(e.bytes for e in fed.ledger.entries[:n0 // args.repeats])
            agg, t_sec = timed(lambda: fed.aggregate("fit", pay), args.repeats)
            sec_entries = fed.ledger.entries[n0:]
            sec_bytes = sum(e.bytes for e in sec_entries[:len(sec_entries) // args.repeats])
            err = max((agg.tensors[k] - exact[k]).abs().max().item() for k in exact)
        bound = error_bound([100, 200, 300], fed.secagg)
        print(f"| {numel:,} | {t_local * 1e3:.1f} ms | {t_plain * 1e3:.0f} ms | {t_sec * 1e3:.0f} ms | "
              f"{t_sec / t_plain:.1f}x | {plain_bytes:,} | {sec_bytes:,} | {err:.1e} ({bound:.1e}) |", flush=True)


if __name__ == "__main__":
    main()
