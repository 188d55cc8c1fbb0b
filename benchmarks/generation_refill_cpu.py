"""Continuous vs fixed batches vs one prompt at a time, in CPU seconds (for a machine shared with other jobs).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/generation_refill_cpu.py 48 16   # N prompts, batch

Same prompts as generation_speed.py (ARC-Easy chat prompts, greedy, max_new_tokens 96, stop "\\n\\n").
"""
from pathlib import Path
import sys, time, torch
sys.path.insert(0, str(Path(__file__).parent))

from generation_speed import arc_prompts
from fedkt.generate import generate_ex
from fedkt.models import load_model
n, bs = int(sys.argv[1]), int(sys.argv[2])
model, tok = load_model("builtin:smollm2-135m")
prompts = arc_prompts(tok, Path("/work/shared/assets/data/arc_easy/test.jsonl"), n)
generate_ex(model, tok, prompts[:4], max_new_tokens=4, batch_size=4)
res = {}
for name, kw in (("continuous", dict(batch_size=bs)), ("fixed", dict(batch_size=bs, refill=False)), ("one at a time", dict(batch_size=1))):
    c, w = time.process_time(), time.perf_counter()
    g = generate_ex(model, tok, prompts, 96, stop=["\n\n"], **kw)
    res[name] = (time.process_time() - c, time.perf_counter() - w, g)
    print(name, f"CPU {res[name][0]:.1f} s wall {res[name][1]:.1f} s forwards {g.forward_calls}", flush=True)
ref = res["continuous"][2]
print(f"n={n} bs={bs} threads={torch.get_num_threads()} useful tokens {ref.total_new_tokens} (max {max(ref.new_tokens)}, "
      f"{sum(x == 96 for x in ref.new_tokens)} at the limit)")
for name, (c, w, g) in res.items():
    print(f"{name:14s} CPU {c:7.1f} s  one-at-a-time/this {res['one at a time'][0] / c:5.2f}x  same text {sum(a == b for a, b in zip(g.texts, ref.texts))}/{n}")
