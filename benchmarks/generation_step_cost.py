"""What one decode step costs by batch rows on this CPU (SmolLM2-135M, fp32), and the LM head alone.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/generation_step_cost.py step   # model decode step by rows
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/generation_step_cost.py head   # 49,152 x 576 head by rows

``step``: a forward of M rows, one new token each, over a KV cache of 140 columns (best of 4, CPU seconds):
the whole model and its body without the LM head. ``head``: ``F.linear`` of M rows with a random
49,152 x 576 matrix (SmolLM2's tied head), also padded to a multiple of 16 rows, ``W @ x.T`` and ``x @ W.T``
with a contiguous transpose; ``*`` marks a result not bitwise equal to plain ``F.linear``. Used by
docs/generation.md to explain why more slots make each row-step cheaper and why MKL is slow below 16 rows.
"""
import copy
import sys
import time

import torch

F = torch.nn.functional


def step() -> None:
    from fedkt.models import load_model

    model, _ = load_model("builtin:smollm2-135m")
    model.eval()
    T = 140
    torch.manual_seed(0)
    with torch.no_grad():
        for M in [1, 4, 8, 12, 15, 16, 17, 24, 32, 48, 64]:
            ids = torch.randint(100, 20000, (M, T))
            base = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
            best = bestb = 1e9
            for _ in range(4):
                kw = dict(input_ids=torch.randint(100, 20000, (M, 1)), attention_mask=torch.ones(M, T + 1, dtype=torch.long),
                          position_ids=torch.full((M, 1), T), use_cache=True)
                c = time.process_time()
                model(past_key_values=copy.deepcopy(base), logits_to_keep=1, **kw)
                best = min(best, time.process_time() - c)
                c = time.process_time()
                model.model(past_key_values=copy.deepcopy(base), **kw)
                bestb = min(bestb, time.process_time() - c)
            print(f"M={M:3d} step {best*1e3:6.1f} ms  body {bestb*1e3:6.1f} ms  per row {best*1e3/M:6.1f} ms", flush=True)


def head() -> None:
    torch.manual_seed(0)
    W = torch.randn(49152, 576) * 0.05
    Wt = W.t().contiguous()

    def t(f, reps=6):
        f()
        best = 1e9
        for _ in range(reps):
            c = time.process_time()
            f()
            best = min(best, time.process_time() - c)
        return best * 1e3

    variants = {"linear": lambda x: F.linear(x, W),
                "pad16": lambda x: F.linear(F.pad(x, (0, 0, 0, (-x.shape[0]) % 16)), W)[: x.shape[0]],
                "W@xT": lambda x: torch.mm(W, x.t()).t(), "x@Wt": lambda x: x @ Wt}
    for M in [1, 2, 4, 7, 8, 9, 12, 13, 15, 16, 17, 20, 24, 31, 32, 40, 48, 64]:
        x = torch.randn(M, 576)
        ref = F.linear(x, W)
        print(f"M={M:3d}  " + "  ".join(f"{k} {t(lambda: f(x)):6.1f}{'' if torch.equal(f(x), ref) else '*'}"
                                        for k, f in variants.items()), flush=True)


if __name__ == "__main__":
    {"step": step, "head": head}[sys.argv[1] if len(sys.argv) > 1 else "step"]()
