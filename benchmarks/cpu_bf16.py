"""bf16 vs fp32 on this CPU: a matmul of the SLM's MLP shape and the 135M LLM's forward over a batch, both
precisions back to back in one process (CPU seconds of the calling threads, so other jobs disturb it less).
Tells whether ``model.dtype = "bf16"`` pays on this machine: with AMX or AVX512-BF16 (``fedkt.devices.
cpu_has_native_bf16``) bf16 is several times faster; without them torch emulates it and it is slower.

  OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/cpu_bf16.py [--model builtin:smollm2-135m]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedkt import devices


def _cpu_time(fn, repeats: int) -> float:
    fn()
    t = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ATen capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {devices.cpu_has_native_bf16()}")
    print("| what | fp32 | bf16 | bf16 speed-up |\n|---|---|---|---|")
    res = {}
    for dt in (torch.float32, torch.bfloat16):
        x, w = torch.randn(2048, 576, dtype=dt), torch.randn(576, 1536, dtype=dt)
        s = _cpu_time(lambda: x @ w, 20)
        res.setdefault("matmul 2048x576 @ 576x1536 (GFLOP/s)", []).append(2 * 2048 * 576 * 1536 / s / 1e9)
    from fedkt.models import load_model

    for dt in ("fp32", "bf16"):
        model, _ = load_model(a.model, dtype=dt)
        ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq))
        with torch.no_grad():
            s = _cpu_time(lambda: model.model(ids), 3)
        res.setdefault(f"{a.model} forward, {a.batch} x {a.seq} tokens (tokens/s)", []).append(a.batch * a.seq / s)
        del model
    for k, (f, b) in res.items():
        print(f"| {k} | {f:,.0f} | {b:,.0f} | {b / f:.2f}x |")


if __name__ == "__main__":
    main()
