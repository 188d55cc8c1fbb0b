"""Memory per simulated client: peak RSS of one FedAvg round with K in-process clients.

    PYTHONPATH=src python benchmarks/memory_per_client.py --model tiny --ks 1,8,32,128
    PYTHONPATH=src python benchmarks/memory_per_client.py --model 135m --ks 1,4,16

Each K runs in a fresh subprocess (so peaks do not carry over): a ``fedkt.simulation.Simulation`` with K
clients (``per-client`` examples each, ``train.max_steps=1``), one FedAvg round through
``fedkt.experiment.run_method`` (evaluation replaced by a no-op), then ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.
Simulated clients share one frozen base model (``ClientFactory``), so peak RSS should grow by about one
adapter (plus, at most, its AdamW state: 3x adapter bytes) per client, not by a model copy.

To say *what* holds the memory, the child also snapshots, when ``fedavg.aggregate`` is entered (the
moment every client's reply is alive), every live tensor storage that is not a parameter or buffer of a
loaded model, grouped by size, and the number of distinct base models loaded.

``--model tiny`` is a random 4-layer, 256-wide Llama (adapter ~0.22 MB, base ~9.9 MB: large enough that
per-client growth is measurable above allocator noise); ``--model 135m`` is ``builtin:smollm2-135m`` with
the default LoRA (r=8 on q/k/v/o).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import bench_config, make_tiny_model  # noqa: E402

MB = 1024 * 1024


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def live_tensors(exclude: set[int]) -> Counter:
    """Bytes of live tensor storages not in ``exclude`` (data pointers), counted once per storage,
    grouped by storage size."""
    import torch

    seen: set[int] = set()
    sizes: Counter = Counter()
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            try:
                st = o.untyped_storage()
            except Exception:  # noqa: BLE001 - meta/sparse tensors hold no host memory here
                continue
            ptr = st.data_ptr()
            if ptr in exclude or ptr in seen or st.nbytes() == 0:
                continue
            seen.add(ptr)
            sizes[st.nbytes()] += 1
    return sizes


def child(a) -> None:
    import torch

    import fedkt.algorithms.fedavg as fedavg
    import fedkt.server
    from fedkt.models import adapter_nbytes
    from fedkt.experiment import run_method
    from fedkt.simulation import Simulation

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(tempfile.mkdtemp(prefix=f"fedkt-mem-k{a.k}-"))
    cfg = bench_config(a.slm, ["fedavg"], a.k, a.per_client, extra=[
        "train.max_steps=1", f"train.batch_size={a.per_client}", f"train.max_length={a.max_length}",
        "federation.rounds=1"])
    sim = Simulation(cfg, out)
    server = sim.server()
    fedkt.server.ServerContext.evaluate = lambda self, role, state, desc: {}
    rss_import = current_rss()
    server.model("slm")
    sim.factory.load(sim.client_spec(0, "fedavg"))
    rss_models = current_rss()

    snap: dict = {}
    orig = fedavg.aggregate

    def aggregate(states, weights):
        models = list(server.loaded_models().values()) + list(sim.factory._models.values())
        exclude = {t.untyped_storage().data_ptr() for m in models
                   for t in [*m.model.parameters(), *m.model.buffers()]}
        exclude |= {t.untyped_storage().data_ptr() for m in models for t in m.init_adapter.values()}
        sizes = live_tensors(exclude)
        rss = current_rss()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back: what is left is really held
        trimmed = current_rss()
        snap.update(rss=rss, rss_trimmed=trimmed, py_objects=len(gc.get_objects()), states=len(states),
                    state_bytes=sum(t.untyped_storage().nbytes() for s in states for t in s.values()),
                    live_bytes=sum(k * v for k, v in sizes.items()), live_storages=sum(sizes.values()),
                    top_sizes=[[k, v] for k, v in sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:4]])
        return orig(states, weights)

    fedavg.aggregate = aggregate
    run_method(server, "fedavg")
    m = server.slm
    print(json.dumps({
        "k": a.k, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_import": rss_import,
        "rss_models": rss_models, "adapter_bytes": adapter_nbytes(m.init_adapter), "model_bytes": m.base_nbytes,
        "base_models_loaded": len(sim.factory._models), "examples": sum(len(c) for c in sim.clients_data),
        "at_aggregate": snap}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "135m"], default="tiny")
    ap.add_argument("--ks", default="")
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--slm", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)

    ks = [int(k) for k in (a.ks or ("1,8,32,128" if a.model == "tiny" else "1,4,16")).split(",")]
    if a.model == "tiny":
        slm = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="fedkt-mem-")), "base", layers=4, hidden=256, seed=1))
    else:
        slm = "builtin:smollm2-135m"
    rows = []
    for k in ks:
        cmd = [sys.executable, __file__, "--child", "--k", str(k), "--slm", slm, "--per-client", str(a.per_client),
               "--max-length", str(a.max_length)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"K={k} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    ad, mb = rows[0]["adapter_bytes"], rows[0]["model_bytes"]
    print(f"{a.model} base ({slm}): model {mb / MB:.2f} MB, LoRA adapter {ad / MB:.3f} MB "
          f"(adapter + AdamW state = 3x = {3 * ad / MB:.3f} MB); FedAvg, 1 round, max_steps=1, "
          f"{a.per_client} examples/client, max_length {a.max_length}; MB = 2^20 bytes")
    print("RSS@agg: resident when fedavg.aggregate is entered (all replies alive); trimmed: the same after "
          "malloc_trim(0); live: non-model tensor storages then")
    print(f"{'K':>4s} {'peak RSS':>9s} {'after load':>10s} {'RSS@agg':>8s} {'trimmed':>8s} {'live':>7s} "
          f"{'replies':>8s} {'py objs':>8s} {'bases':>5s}")
    for r in rows:
        s = r["at_aggregate"]
        print(f"{r['k']:4d} {r['peak'] / MB:9.1f} {r['rss_models'] / MB:10.1f} {s['rss'] / MB:8.1f} "
              f"{s['rss_trimmed'] / MB:8.1f} {s['live_bytes'] / MB:7.2f} {s['state_bytes'] / MB:8.2f} "
              f"{s['py_objects']:8d} {r['base_models_loaded']:5d}")
    if len(rows) > 1:
        import numpy as np

        k = np.array([r["k"] for r in rows], dtype=float)
        print(f"growth per client (least-squares slope over K = {', '.join(str(r['k']) for r in rows)}):")
        for label, get in (("peak RSS", lambda r: r["peak"]), ("RSS at aggregation", lambda r: r["at_aggregate"]["rss"]),
                           ("RSS at aggregation after malloc_trim", lambda r: r["at_aggregate"]["rss_trimmed"]),
                           ("live non-model tensors", lambda r: r["at_aggregate"]["live_bytes"])):
            slope = np.polyfit(k, np.array([get(r) for r in rows], dtype=float), 1)[0]
            print(f"  {label:38s} {slope / MB:8.3f} MB/client = {slope / ad:6.2f} adapters = "
                  f"{slope / (3 * ad):5.2f} x (adapter+AdamW) = {slope / mb:6.3f} model copies")
        objs = np.polyfit(k, np.array([r["at_aggregate"]["py_objects"] for r in rows], dtype=float), 1)[0]
        print(f"  {'gc-tracked Python objects':38s} {objs:8.0f} per client")
    last = rows[-1]["at_aggregate"]
    print(f"largest live non-model tensor groups at aggregation, K={rows[-1]['k']} (storage bytes x count): "
          + ", ".join(f"{b / 1024:.1f} KiB x {n}" for b, n in last["top_sizes"]))


if __name__ == "__main__":
    main()
