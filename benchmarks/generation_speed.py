"""Generation speed: batched early-stopping decode vs one prompt at a time vs the old run-to-max path.

    flock /tmp/heavy.lock env OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/generation_speed.py

SmolLM2-135M-Instruct writes a short explanation for N ARC-Easy questions (chat prompt, greedy,
``max_new_tokens`` 96, stop string "\\n\\n" and the model's EOS). Three paths:

* ``batched``   fedkt.generate: length-ordered queue, KV cache, shared prefix computed once, rows
  leave the batch when done and the next prompts of the queue take their slots (continuous batching)
* ``fixed``     the same with ``refill=False``: batches of ``batch_size`` prompts each run to their last row
  (the previous fedkt.generate; what sampled runs still do)
* ``single``    the same decode loop with batch_size=1 (what a simple per-prompt loop costs)
* ``run-to-max`` the previous implementation: ``model.generate`` per batch until every row hits EOS or
  ``max_new_tokens``, stop strings cut afterwards

Prints generated-token counts (useful tokens: up to and including EOS / the stop string), wall times,
useful tokens/s and each path's wall time over the batched one (the speed-up), and how many outputs
agree with the batched path's (greedy: all should, up to rare float ties between padded and unpadded
rows). The run-to-max path computes the same useful text plus everything past each row's stop.
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
        opts = "; ".join(f"{lab}. {txt}" for lab, txt in zip(r["choices"]["label"], r["choices"]["text"]))
        user = f"{r['question']} (Options: {opts})\nName the correct option and explain briefly why."
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
    ap.add_argument("--batch-size", type=int, default=16, help="for the batched and run-to-max paths")
    ap.add_argument("--also-batch-sizes", default="32", help="extra batched runs, comma-separated ('' for none)")
    ap.add_argument("--stop", default="\n\n")
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="rounds over all paths; the fastest of each is kept "
                                                          "(the machine is shared)")
    a = ap.parse_args()
    model, tok = load_model(a.model)
    prompts = arc_prompts(tok, Path(a.data), a.n)
    stop = [a.stop]
    generate_ex(model, tok, prompts[:a.batch_size], max_new_tokens=4, batch_size=a.batch_size)  # warm-up
    print(f"{a.model}: {len(prompts)} ARC-Easy chat prompts, max_new_tokens={a.max_new_tokens}, stop={stop!r}, "
          f"threads={torch.get_num_threads()}, best of {a.repeat} rounds")

    def batched(bs, refill=True):
        def run():
            e = generate_ex(model, tok, prompts, a.max_new_tokens, bs, stop=stop, refill=refill)
            return e.seconds, e.total_new_tokens, e.texts, f"{e.forward_calls} forwards", e
        return run

    def old_path():
        t = time.perf_counter()
        texts, slots = run_to_max(model, tok, prompts, a.max_new_tokens, a.batch_size, stop)
        return time.perf_counter() - t, None, texts, f"{slots} token slots computed", None

    paths = {f"batched bs={a.batch_size}": batched(a.batch_size),
             f"fixed bs={a.batch_size}": batched(a.batch_size, refill=False)}
    for bs in [int(x) for x in a.also_batch_sizes.split(",") if x.strip()]:
        paths[f"batched bs={bs}"] = batched(bs)
    if not a.skip_single:
        paths["one at a time"] = batched(1)
    paths[f"run-to-max bs={a.batch_size}"] = old_path
    best: dict[str, tuple] = {}
    for r in range(a.repeat):
        for name, run in paths.items():
            res = run()
            print(f"  round {r + 1}: {name:18s} {res[0]:7.1f} s", flush=True)
            if name not in best or res[0] < best[name][0]:
                best[name] = res
    g = best[f"batched bs={a.batch_size}"][4]
    rows = [(name, sec, ntok if ntok is not None else g.total_new_tokens, texts, note)
            for name, (sec, ntok, texts, note, _) in best.items()]

    useful = g.total_new_tokens
    print(f"useful tokens generated: {useful} (per prompt min {min(g.new_tokens)}, mean "
          f"{useful / len(prompts):.1f}, max {max(g.new_tokens)}; {sum(n == a.max_new_tokens for n in g.new_tokens)} "
          f"rows hit the limit); prompts {sum(len(x) for x in tok(prompts)['input_ids']) / len(prompts):.0f} tokens "
          f"on average, {g.shared_prefix_tokens} of them a shared prefix computed once")
    print(f"{'path':18s} {'wall s':>8s} {'tokens':>7s} {'tok/s':>7s} {'time / batched':>14s}  same text  notes")
    for name, sec, ntok, texts, note in rows:
        same = sum(x == y for x, y in zip(texts, g.texts))
        print(f"{name:18s} {sec:8.1f} {ntok:7d} {ntok / sec:7.1f} {sec / rows[0][1]:13.2f}x  {same:5d}/{len(prompts)}  "
              f"{note}")
    for t in g.texts[:2]:
        print("example:", repr(t[:300]))


if __name__ == "__main__":
    main()
