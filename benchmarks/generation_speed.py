"""Generation speed: batched early-stopping decode vs one prompt at a time vs the old run-to-max path.

    flock /tmp/heavy.lock env OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/generation_speed.py

SmolLM2-135M-Instruct writes a short explanation for N ARC-Easy questions (chat prompt, greedy,
``max_new_tokens`` 96, stop string "\\n\\n" and the model's EOS). Three paths:

* ``batched``   fedkt.generate: length-bucketed batches, KV cache, rows leave the batch when done
* ``single``    the same decode loop with batch_size=1 (what a simple per-prompt loop costs)
* ``run-to-max`` the previous implementation: ``model.generate`` per batch until every row hits EOS or
  ``max_new_tokens``, stop strings cut afterwards

Prints generated-token counts (useful tokens: up to and including EOS / the stop string), wall times,
useful tokens/s and the ratios, and how many outputs the paths agree on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedkt.generate import chat_prompt, cut_at_stop, generate_ex
from fedkt.models import load_model

SYSTEM = "You are a concise science tutor."


def arc_prompts(tok, path: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    out = []
    for r in rows:
        opts = "\n".join(f"{lab}. {txt}" for lab, txt in zip(r["choices"]["label"], r["choices"]["text"]))
        user = f"{r['question']}\n{opts}\nWhich option is correct? Explain why in one or two short sentences."
        out.append(chat_prompt(tok, SYSTEM, user))
    return out


@torch.no_grad()
def run_to_max(model, tok, prompts, max_new_tokens, batch_size, stop):
    """The previous fedkt.generate (greedy): model.generate per batch, stop strings trimmed afterwards."""
    old_side = tok.padding_side
    tok.padding_side = "left"
    outs, steps = [], 0
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tok(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                      add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, do_sample=False, temperature=None, top_p=None,
                                 top_k=None)
            new = out[:, enc["input_ids"].shape[1]:]
            steps += new.shape[1] * new.shape[0]
            outs += [cut_at_stop(t, stop) for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = old_side
    return outs, steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--data", default="/work/shared/assets/data/arc_easy/test.jsonl")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--stop", default="\n\n")
    ap.add_argument("--skip-single", action="store_true")
    a = ap.parse_args()
    model, tok = load_model(a.model)
    prompts = arc_prompts(tok, Path(a.data), a.n)
    stop = [a.stop]
    generate_ex(model, tok, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up
    print(f"{a.model}: {len(prompts)} ARC-Easy chat prompts, max_new_tokens={a.max_new_tokens}, stop={stop!r}, "
          f"batch_size={a.batch_size}, threads={torch.get_num_threads()}")

    rows = []
    g = generate_ex(model, tok, prompts, a.max_new_tokens, a.batch_size, stop=stop)
    rows.append(("batched (fedkt)", g.seconds, g.total_new_tokens, g.texts,
                 f"{g.forward_calls} forwards, {sum(g.per_batch_steps)} decode steps"))
    if not a.skip_single:
        s = generate_ex(model, tok, prompts, a.max_new_tokens, 1, stop=stop)
        rows.append(("one at a time", s.seconds, s.total_new_tokens, s.texts, f"{s.forward_calls} forwards"))
    t = time.perf_counter()
    old, slots = run_to_max(model, tok, prompts, a.max_new_tokens, a.batch_size, stop)
    rows.append(("run-to-max (old)", time.perf_counter() - t, g.total_new_tokens, old,
                 f"{slots} token slots computed"))

    useful = g.total_new_tokens
    print(f"useful tokens generated: {useful} (per prompt min {min(g.new_tokens)}, mean "
          f"{useful / len(prompts):.1f}, max {max(g.new_tokens)}; {sum(n == a.max_new_tokens for n in g.new_tokens)} "
          f"rows hit the limit)")
    print(f"{'path':18s} {'wall s':>8s} {'tokens':>7s} {'tok/s':>7s} {'vs batched':>10s}  same text  notes")
    for name, sec, ntok, texts, note in rows:
        same = sum(x == y for x, y in zip(texts, g.texts))
        print(f"{name:18s} {sec:8.1f} {ntok:7d} {ntok / sec:7.1f} {sec / g.seconds:9.2f}x  {same:3d}/{len(prompts)}  "
              f"{note}")
    print("example:", repr(g.texts[0][:200]))


if __name__ == "__main__":
    main()
