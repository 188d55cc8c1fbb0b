"""Where the quickstart's time goes: the run under cProfile, CPU time per stage.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/quickstart_profile.py            # the full quickstart
    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/quickstart_profile.py --reduced  # ~1/5 of its work

Wall time on a shared machine says little; this prints, per stage, the cumulative *CPU* time
(``time.process_time``, all threads) of the functions that make up the run: evaluation (multiple-choice
scoring, split into the model forwards and the rest), client and server training (forward, backward,
optimizer), mutual distillation, model loading/building, adapter get/set, checkpoints and the federation's
codec. ``--reduced`` scales the data, questions and distillation steps down (same code paths) for a quick
before/after comparison on a busy machine. ``--set KEY=VALUE`` passes further overrides.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

STAGES = {  # label -> (file suffix, function name) whose cumulative time is the stage's
    "evaluate (all)": ("fedkt/evaluate.py", "evaluate_tasks"),
    "  mc scoring": ("fedkt/evaluate.py", "loglikelihoods"),
    "  tokenise eval prompts": ("fedkt/data/collate.py", "encode_pairs"),
    "train_loop (SFT)": ("fedkt/train.py", "train_loop"),
    "  tokenise train": ("fedkt/train.py", "tokenize_examples"),
    "  optimizer.step": ("torch/optim/optimizer.py", "wrapper"),
    "  backward": ("torch/_tensor.py", "backward"),
    "mutual distillation": ("fedkt/algorithms/fedcollm.py", "mutual_distill"),
    "load models": ("fedkt/models.py", "load_lora_model"),
    "  build builtin": ("fedkt/builtin.py", "ensure_builtin"),
    "  build builtin (renamed)": ("fedkt/builtin_models.py", "ensure_builtin"),
    "adapter get": ("fedkt/models.py", "get_adapter_state"),
    "adapter set": ("fedkt/models.py", "set_adapter_state"),
    "save adapter (peft)": ("fedkt/models.py", "save_adapter"),
    "checkpoints": ("fedkt/rounds.py", "save"),
    "model forward (all)": ("torch/nn/modules/module.py", "_call_impl"),
}


def stage_times(stats: pstats.Stats) -> dict[str, float]:
    out = {k: 0.0 for k in STAGES}
    for (file, _, func), (_, _, _, cum, callers) in stats.stats.items():
        for label, (suffix, name) in STAGES.items():
            if func == name and file.endswith(suffix):
                # cumulative time of the outermost calls only: skip calls from the same function (recursion)
                own = sum(v[3] for (cf, _, cfn), v in callers.items() if not (cfn == name and cf.endswith(suffix)))
                out[label] += own if callers else cum
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "examples/quickstart.toml"))
    ap.add_argument("--reduced", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    try:  # module names before and after issue 21's renames
        from fedkt.registry import load_config
    except ImportError:
        from fedkt.config import load_config
    try:
        from fedkt.experiment import run_experiment
    except ImportError:
        from fedkt.runs import run_experiment

    sets = list(a.set)
    if a.reduced:
        sets += ["eval.limit=60", "data.max_train_examples=96", "fedcollm.kd_steps=6"]
    cfg = load_config(a.config, sets)
    prof = cProfile.Profile(time.process_time)
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        prof.enable()
        results = run_experiment(cfg, Path(tmp) / "run")
        prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = pstats.Stats(prof)
    print(f"{a.config} {' '.join(sets)}: wall {wall:.1f} s, CPU {cpu:.1f} s, threads {torch.get_num_threads()}")
    for m, r in results.methods.items() if hasattr(results, "methods") else []:
        print(f"  {m}: wall {getattr(r, 'wall_s', float('nan'))} s")
    for label, t in stage_times(st).items():
        print(f"{label:<26} {t:8.1f} s CPU  {100 * t / cpu:5.1f}%")
    st.sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    sys.exit(main())
