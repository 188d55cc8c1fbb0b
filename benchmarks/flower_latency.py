"""Round-trip latency of one federation call: LocalFederation vs FlowerFederation in process (no Ray).

    /work/venvs/flower/bin/python benchmarks/flower_latency.py --clients 2 --repeats 10

Needs the ``flower`` extra. For each payload size, broadcasts a float32 tensor to every client with an
echo handler and prints milliseconds per call (median over ``repeats``) for both runtimes, and the
bytes Flower's objects carry per message next to fedkt's metered bytes. The deployment latency
(SuperLink + SuperNodes as processes) is printed by tests/test_flower_processes.py.
"""

import argparse
import statistics
import time

import torch

from fedkt.clients import ClientContext
from fedkt.federation import Message, codec
from fedkt.federation import flower_codec
from fedkt.federation.flower import FlowerFederation
from fedkt.federation.flower_protocol import flower_wire_bytes
from fedkt.federation.local import LocalFederation


def echo(ctx, msg):
    return Message(tensors=msg.tensors, meta={"cid": ctx.cid})


def per_call(fed, msg, repeats):
    fed.broadcast("echo", msg)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fed.broadcast("echo", msg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sizes", default="256,262144,4194304", help="float32 elements per payload")
    a = ap.parse_args()
    cids = [f"c{i}" for i in range(a.clients)]
    local = LocalFederation([ClientContext(c) for c in cids], {"echo": echo})
    fl = FlowerFederation.in_process(cids, {"echo": echo})
    try:
        print(f"{'payload':>10} {'local ms':>9} {'flower ms':>10} {'fedkt bytes':>12} {'flower bytes':>13}")
        for n in map(int, a.sizes.split(",")):
            msg = Message(tensors={"w": torch.randn(n, generator=torch.Generator().manual_seed(0))})
            lm, fm = per_call(local, msg, a.repeats), per_call(fl, msg, a.repeats)
            print(f"{n * 4 / 1024:>8.0f}KB {lm:>9.1f} {fm:>10.1f} {len(codec.encode(msg)):>12} "
                  f"{flower_wire_bytes(flower_codec.encode(msg)):>13}")
    finally:
        fl.close()


if __name__ == "__main__":
    main()
