"""Client sampling at scale: wall per round and peak RSS of FedAvg with K simulated clients, k per round.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/client_sampling.py     # (K, k) = (10, all), (64, 10), (128, 10), (128, all)
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/client_sampling.py --runs 128:10,10:0

Each (K, k) runs in a fresh subprocess (peaks do not carry over): a ``fedkt.simulation.Simulation`` with K
clients (``--per-client`` examples each, ``train.max_steps=1``) on a random 4-layer × 256 Llama (the
*tiny* base of ``benchmarks/memory_per_client.py``), ``--rounds`` FedAvg rounds with
``federation.clients_per_round = k`` through ``fedkt.experiment.run_method`` (evaluation a no-op). It reports the
wall of each round (``FedAvgRound.round``), the clients each round called, and peak RSS
(``ru_maxrss``). Claim under test: wall per round follows the *sampled* clients (K = 128, k = 10 ≈ K = 10,
k = all), and an idle client costs memory only for its context and data, not an adapter.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import bench_config, make_tiny_model  # noqa: E402

MB = 1024 * 1024


def child(a) -> None:
    import fedkt.server
    from fedkt.fedavg_round import FedAvgRound
    from fedkt.experiment import run_method
    from fedkt.simulation import Simulation

    out = Path(tempfile.mkdtemp(prefix=f"fedkt-sampling-k{a.k}-"))
    cfg = bench_config(a.slm, ["fedavg"], a.k, a.per_client, extra=[
        "train.max_steps=1", f"train.batch_size={a.per_client}", "train.max_length=64",
        f"federation.rounds={a.rounds}", f"federation.clients_per_round={a.per_round}"])
    t0 = time.perf_counter()
    sim = Simulation(cfg, out)
    server = sim.server()
    fedkt.server.ServerContext.evaluate = lambda self, role, state, desc: {}
    setup_s = time.perf_counter() - t0
    walls: list[float] = []
    orig = FedAvgRound.round

    def timed(self, *args):
        t = time.perf_counter()
        try:
            return orig(self, *args)
        finally:
            walls.append(time.perf_counter() - t)

    FedAvgRound.round = timed
    res = run_method(server, "fedavg")
    called = [len(r["clients"]) for r in res.comm["per_round"]]
    print(json.dumps({"k": a.k, "per_round": a.per_round, "setup_s": setup_s, "round_s": walls, "called": called,
                      "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="10:0,64:10,128:10,128:0", help="K:k pairs (k = 0: all K clients every round)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--per-round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--slm", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    slm = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="fedkt-sampling-")), "base", layers=4, hidden=256, seed=1))
    rows = []
    for pair in a.runs.split(","):
        k, per_round = (int(x) for x in pair.split(":"))
        cmd = [sys.executable, __file__, "--child", "--k", str(k), "--per-round", str(per_round), "--slm", slm,
               "--rounds", str(a.rounds), "--per-client", str(a.per_client)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"K={k} k={per_round} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"tiny Llama 4x256, FedAvg, {a.rounds} rounds, {a.per_client} examples/client, max_steps=1; MB = 2^20 bytes")
    print(f"{'K':>4s} {'per round':>9s} {'called/round':>12s} {'round s (each)':>24s} {'mean':>6s} {'setup s':>7s} "
          f"{'peak RSS MB':>11s}")
    for r in rows:
        print(f"{r['k']:4d} {r['per_round'] or r['k']:9d} {str(r['called']):>12s} "
              f"{' '.join(f'{x:.2f}' for x in r['round_s']):>24s} {statistics.fmean(r['round_s']):6.2f} "
              f"{r['setup_s']:7.2f} {r['peak'] / MB:11.1f}")
    def active(r):
        return r["per_round"] or r["k"]

    for hi in (r for r in rows if r["per_round"]):
        same = [r for r in rows if active(r) == active(hi) and r["k"] < hi["k"]]
        if same:
            lo = min(same, key=lambda r: r["k"])
            print(f"K = {hi['k']}, {active(hi)} per round vs K = {lo['k']}, {active(lo)} per round: wall per round "
                  f"{statistics.fmean(hi['round_s']) / statistics.fmean(lo['round_s']):.2f}x, peak RSS per extra "
                  f"(idle) client {(hi['peak'] - lo['peak']) / (hi['k'] - lo['k']) / MB:+.4f} MB")
    for r in rows:
        if not r["per_round"] and r["k"] > 10:
            base = min((x for x in rows if not x["per_round"]), key=lambda x: x["k"])
            if base is not r:
                print(f"every client every round, K {base['k']} -> {r['k']}: peak RSS per extra (active) client "
                      f"{(r['peak'] - base['peak']) / (r['k'] - base['k']) / MB:+.4f} MB, wall per round "
                      f"{statistics.fmean(r['round_s']) / statistics.fmean(base['round_s']):.2f}x")

if __name__ == "__main__":
    main()
