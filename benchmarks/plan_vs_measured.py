"""``fedkt plan``'s memory estimate against a measured run: peak RSS of one FedCoLLM round in a fresh process.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/plan_vs_measured.py [--config examples/quickstart.toml]

The run is the config reduced to one short FedCoLLM round (``REDUCE`` below: fewer examples, 2 distillation
steps, a few eval questions; the batch size and the models are the config's, and every training example
passes through a batch, so the peak batch is reached). The child process records its RSS after importing
fedkt's stack (the runtime, which the plan does not model) and its peak RSS (``ru_maxrss``) at the end.
Printed: the plan's in-process estimate against the measured peak minus the runtime, and both with the
runtime added; the ratio measured / plan; the child's CPU seconds (user + system) and its minor page faults
(what returning freed memory to the OS costs). ``--variants`` picks the allocator rows (``VARIANTS`` below;
default: all).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REDUCE = ["methods=[\"fedcollm\"]", "federation.rounds=1", "data.max_train_examples=80", "partition.aux_size=16",
          "fedcollm.kd_steps=2", "eval.limit=8", "eval.every_round=true"]


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(config: str, overrides: list[str]) -> None:
    from fedkt import progress
    from fedkt.registry import load_config
    from fedkt.experiment import run_experiment
    import peft  # noqa: F401  (the runtime: imported before the baseline is read)
    import transformers  # noqa: F401

    cfg = load_config(config, overrides)
    base = rss_now()
    t0 = time.perf_counter()
    progress.disable()
    with tempfile.TemporaryDirectory() as tmp:
        run_experiment(cfg, Path(tmp) / "run")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"runtime_rss": base, "peak_rss": ru.ru_maxrss * 1024, "wall_s": round(time.perf_counter() - t0, 1),
                      "cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "sys_s": round(ru.ru_stime, 1),
                      "minflt": ru.ru_minflt}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="examples/quickstart.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    overrides = REDUCE + a.overrides
    if a.child:
        return child(a.config, overrides)
    from fedkt.registry import load_config
    from fedkt.plan import Options, human, plan

    cfg = load_config(a.config, overrides)
    p = plan(cfg, Options.from_config(cfg), a.config)
    est = p["processes"]["simulation_peak_bytes"]
    print(f"config {a.config} reduced: {' '.join(overrides)}")
    print(f"sequence length {p['options']['seq_len']} (aux {p['options']['aux_seq_len']}; answer "
          f"{p['options']['answer_len']}; "
          f"{p['options']['seq_len_source']}), clients {p['data']['clients']}, aux {p['data']['aux']}\n")
    print("| allocator | plan: models + activations | measured: peak RSS − runtime RSS | measured / plan | "
          "plan + runtime | measured peak RSS | measured / plan | run | CPU (sys) | minor faults |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for key in a.variants.split(","):
        label, extra = VARIANTS[key]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **extra}
        out = subprocess.run([sys.executable, __file__, "--child", "--config", a.config,
                              *[x for o in a.overrides for x in ("--set", o)]],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        m = json.loads(out.stdout.strip().splitlines()[-1])
        models, whole = m["peak_rss"] - m["runtime_rss"], est + m["runtime_rss"]
        print(f"| {label} | {human(est)} | {human(models)} | {models / est:.2f} | {human(whole)} | "
              f"{human(m['peak_rss'])} | {m['peak_rss'] / whole:.2f} | {m['wall_s']} s | {m['cpu_s']} s "
              f"({m['sys_s']} s) | {m['minflt'] / 1e6:.2f}M |")


VARIANTS = {"default": ("glibc default", {}),
            "mmap": ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"})}
"""glibc's default raises its mmap threshold as large blocks are freed, so freed activations stay in the heap
(RSS) and tensors of other sizes are placed beside them; a fixed threshold returns every block >= 128 KiB to
the OS when freed, so the peak RSS follows the live tensors (what the plan estimates), at the price of a page
fault per page of every large tensor."""


if __name__ == "__main__":
    main()
