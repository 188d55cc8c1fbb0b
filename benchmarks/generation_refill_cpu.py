"""Continuous vs fixed batches vs one prompt at a time, in CPU seconds (for a machine shared with other jobs).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/generation_refill_cpu.py 48 16        # N prompts, batch
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/generation_refill_cpu.py 48 16,32,48  # several batches

Same prompts as generation_speed.py (ARC-Easy chat prompts, greedy, max_new_tokens 96, stop "\\n\\n"). Paths, back
to back in this process: ``generate_ex`` with continuous batching at each batch size, fixed batches
(``refill=False``) at the first, and ``batch_size=1`` (one prompt at a time). "same text" compares with the
one-at-a-time texts.
"""
from pathlib import Path
import sys, time, torch
sys.path.insert(0, str(Path(__file__).parent))

from generation_speed import arc_prompts
from fedkt.generate import generate_ex
from fedkt.models import load_model
n, sizes = int(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")]
model, tok = load_model("builtin:smollm2-135m")
prompts = arc_prompts(tok, Path("/work/shared/assets/data/arc_easy/test.jsonl"), n)
generate_ex(model, tok, prompts[:4], max_new_tokens=4, batch_size=4)
res = {}
paths = [(f"continuous {bs}", dict(batch_size=bs)) for bs in sizes]
paths += [(f"fixed {sizes[0]}", dict(batch_size=sizes[0], refill=False)), ("one at a time", dict(batch_size=1))]
for name, kw in paths:
    c, w = time.process_time(), time.perf_counter()
    g = generate_ex(model, tok, prompts, 96, stop=["\n\n"], **kw)
    res[name] = (time.process_time() - c, time.perf_counter() - w, g)
    print(name, f"CPU {res[name][0]:.1f} s wall {res[name][1]:.1f} s forwards {g.forward_calls}", flush=True)
ref = res["one at a time"][2]
print(f"n={n} threads={torch.get_num_threads()} useful tokens {ref.total_new_tokens} (max {max(ref.new_tokens)}, "
      f"{sum(x == 96 for x in ref.new_tokens)} at the limit)")
for name, (c, w, g) in res.items():
    print(f"{name:16s} CPU {c:7.1f} s  forwards {g.forward_calls:5d}  one-at-a-time/this {res['one at a time'][0] / c:5.2f}x  "
          f"same text {sum(a == b for a, b in zip(g.texts, ref.texts))}/{n}")
