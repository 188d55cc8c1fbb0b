"""``fedkt plan``'s memory estimate against a measured run: peak RSS of one FedCoLLM round in a fresh process.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/plan_vs_measured.py [--config examples/quickstart.toml]

The run is the config reduced to one short FedCoLLM round (``REDUCE`` below: fewer examples, 2 distillation
steps, a few eval questions; the batch size and the models are the config's, and every training example
passes through a batch, so the peak batch is reached). The child process records its RSS after importing
fedkt's stack (the runtime, which the plan does not model) and its peak RSS (``ru_maxrss``) at the end.
Printed: the plan's in-process estimate against the measured peak minus the runtime, and both with the
runtime added; the ratio measured / plan; the child's CPU seconds (user + system), its minor page faults and
the seconds spent in ``fedkt.memory_release.release()`` (the cost of returning freed memory at phase
boundaries). ``--variants`` picks the rows (``VARIANTS`` below; default: all).
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


def child(config: str, overrides: list[str], release: bool) -> None:
    from fedkt import memory_release, progress
    from fedkt.registry import load_config
    from fedkt.experiment import run_experiment
    import peft  # noqa: F401  (the runtime: imported before the baseline is read)
    import transformers  # noqa: F401

    cfg = load_config(config, overrides)
    memory_release.enabled = release
    spent = [0.0]
    inner = memory_release.release

    def timed() -> bool:
        t = time.perf_counter()
        try:
            return inner()
        finally:
            spent[0] += time.perf_counter() - t

    memory_release.release = timed  # every caller looks it up on the module at call time
    base = rss_now()
    t0 = time.perf_counter()
    progress.disable()
    with tempfile.TemporaryDirectory() as tmp:
        run_experiment(cfg, Path(tmp) / "run")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"runtime_rss": base, "peak_rss": ru.ru_maxrss * 1024, "wall_s": round(time.perf_counter() - t0, 1),
                      "cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "sys_s": round(ru.ru_stime, 1),
                      "minflt": ru.ru_minflt, "releases": memory_release.calls, "release_s": round(spent[0], 3)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="examples/quickstart.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-release", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    overrides = REDUCE + a.overrides
    if a.child:
        return child(a.config, overrides, not a.no_release)
    from fedkt.registry import load_config
    from fedkt.plan import Options, human, plan

    cfg = load_config(a.config, overrides)
    p = plan(cfg, Options.from_config(cfg), a.config)
    est = p["processes"]["simulation_peak_bytes"]
    print(f"config {a.config} reduced: {' '.join(overrides)}")
    print(f"sequence length {p['options']['seq_len']} (aux {p['options']['aux_seq_len']}; "
          f"{p['options']['seq_len_source']}), clients {p['data']['clients']}, aux {p['data']['aux']}\n")
    print("| allocator | plan: models + activations | measured: peak RSS − runtime RSS | measured / plan | "
          "plan + runtime | measured peak RSS | measured / plan | run | CPU (sys) | minor faults | releases |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for key in a.variants.split(","):
        label, extra, release = VARIANTS[key]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **extra}
        out = subprocess.run([sys.executable, __file__, "--child", "--config", a.config,
                              *[x for o in a.overrides for x in ("--set", o)],
                              *([] if release else ["--no-release"])],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        m = json.loads(out.stdout.strip().splitlines()[-1])
        models, whole = m["peak_rss"] - m["runtime_rss"], est + m["runtime_rss"]
        print(f"| {label} | {human(est)} | {human(models)} | {models / est:.2f} | {human(whole)} | "
              f"{human(m['peak_rss'])} | {m['peak_rss'] / whole:.2f} | {m['wall_s']} s | {m['cpu_s']} s "
              f"({m['sys_s']} s) | {m['minflt'] / 1e6:.2f}M | {m['releases']} in {m['release_s']} s |")


VARIANTS = {"default": ("glibc default (fedkt releases at phase boundaries)", {}, True),
            "norelease": ("glibc default, no release (fedkt before)", {}, False),
            "mmap": ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"}, True)}
"""glibc's default raises its mmap threshold as large blocks are freed, so a phase's freed activations stay in
the heap (RSS) and, unless returned (``fedkt.memory_release``: ``malloc_trim`` at phase boundaries), the next
phase allocates beside them; a fixed threshold returns every block >= 128 KiB to the OS when freed, so the
peak RSS follows the live tensors (what the plan estimates)."""


if __name__ == "__main__":
    main()
