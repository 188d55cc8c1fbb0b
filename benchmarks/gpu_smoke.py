"""One round of each method on whatever accelerator is present: tokens/s and peak memory per method.

    PYTHONPATH=src python benchmarks/gpu_smoke.py                      # tiny random pair built in code
    PYTHONPATH=src python benchmarks/gpu_smoke.py --slm builtin:smollm2-135m --llm DIR --dtype bf16

The device is ``--device`` (default "auto": cuda, else mps, else the cpu, with a line saying that no
accelerator was found). Tokens are every token the loaded models processed (training, distillation,
scoring, generation: the non-padding input positions of every top-level forward, one per row for a
cached generation step), divided by the method's wall time. Peak memory is ``torch.cuda.max_memory_allocated`` on cuda (reset per method), the driver's
allocated memory on mps, else the process's peak RSS (monotone over the run). This script has not yet run
on a GPU (see docs/devices.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import make_tiny_pair  # noqa: E402

from fedkt import models  # noqa: E402
from fedkt.registry import load_config  # noqa: E402
from fedkt.devices import resolve_device  # noqa: E402
from fedkt.registry import methods as registered  # noqa: E402
from fedkt.experiment import run_experiment  # noqa: E402


class TokenCounter:
    """Counts the tokens every loaded model's top-level forward processes."""

    def __init__(self):
        self.tokens = 0
        self._load = models.load_model

    def install(self):
        def load(*a, **kw):
            model, tok = self._load(*a, **kw)
            model.register_forward_pre_hook(self._count, with_kwargs=True)
            return model, tok

        models.load_model = load

    def _count(self, mod, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        if mask is not None and mask.dim() == 2 and not mask.is_floating_point():
            self.tokens += int(mask[:, -ids.shape[1]:].sum())  # the new positions (a cached step: 1 per row)
        else:  # no mask, or a packed 4-D additive mask (evaluation): every position counts
            self.tokens += ids.numel()


def peak_memory(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return "cuda max_memory_allocated", torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return "mps driver_allocated", torch.mps.driver_allocated_memory() / 2**20
    return "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slm", default="", help="SLM spec (default: a tiny random Llama built in code)")
    ap.add_argument("--llm", default="", help="LLM spec, same tokenizer as the SLM (default: tiny random)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--methods", default=",".join(registered()))
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--per-client", type=int, default=16)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--json", default="", help="also write the table as JSON here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    if device.type == "cpu":
        print("gpu_smoke: no accelerator found (torch.cuda.is_available() and torch.backends.mps.is_available() "
              "are False): running on the CPU; these are CPU numbers")
    elif device.type == "cuda":
        print(f"gpu_smoke: {torch.cuda.get_device_name(device)} ({device}), torch {torch.__version__}, "
              f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    else:
        print(f"gpu_smoke: {device}, torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="fedkt-gpu-smoke-"))
    pair = {} if args.slm and args.llm else make_tiny_pair(tmp / "models")
    slm, llm = args.slm or str(pair["slm"]), args.llm or str(pair["llm"])
    counter = TokenCounter()
    counter.install()
    rows = []
    for method in args.methods.split(","):
        sets = [f'model.slm="{slm}"', f'model.llm="{llm}"', f'model.device="{args.device}"',
                f'model.dtype="{args.dtype}"', f'methods=["{method}"]', "federation.rounds=1",
                f"partition.num_clients={args.clients}", "partition.aux_size=16",
                f"data.max_train_examples={args.clients * args.per_client + 16}", f"eval.limit={args.questions}",
                "train.batch_size=4", "train.max_length=128", "fedcollm.kd_steps=4", "fedcollm.batch_size=4",
                "fdkt.samples_per_client=4", "fdkt.sample_tokens=32", "fdkt.augment_tokens=32",
                "fedcot.rationale_tokens=16", "fedcot.decode_tokens=16", "fedcot.kit_neighbors=8"]
        cfg = load_config(None, sets)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counter.tokens = 0
        t0 = time.perf_counter()
        try:
            run_experiment(cfg, tmp / "runs" / method)
            error = ""
        except Exception as e:  # report and go on: a smoke test shows every method's state
            traceback.print_exc()
            error = f"{type(e).__name__}: {e}"
        wall = time.perf_counter() - t0
        what, mib = peak_memory(device)
        rows.append({"method": method, "wall_s": round(wall, 2), "tokens": counter.tokens,
                     "tokens_per_s": round(counter.tokens / wall, 1), "peak_mib": round(mib, 1),
                     "memory": what, "error": error})
        print(f"{method:12s} {wall:8.1f} s {counter.tokens:9d} tokens {counter.tokens / wall:10.1f} tok/s "
              f"{what} {mib:9.1f} MiB {error}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "dtype": args.dtype, "rows": rows}, indent=1))
    sys.exit(1 if any(r["error"] for r in rows) else 0)


if __name__ == "__main__":
    main()
