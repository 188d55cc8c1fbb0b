"""Cost of a DP-SGD step against a plain training step on the same batch and model.

    flock /tmp/heavy.lock env OMP_NUM_THREADS=2 python benchmarks/dp_sgd_cost.py

Both paths train the same LoRA adapter (r=8 on q/k/v/o) on the same fixed batch of 8 examples of
exactly 128 tokens (ARC-Easy questions concatenated; the answer is supervised), with AdamW:

* plain: ``fedkt.train.train_loop`` (answer-only CE, backward, clip the batch gradient, step);
* DP-SGD: ``fedkt.privacy.dp_sgd.dp_train_loop`` with sample rate 1 (every step sees the same 8
  examples; σ fixed so no calibration is timed): Opacus per-sample gradients, per-sample clipping,
  Gaussian noise, step.

Each path runs one warm-up step, then ``--steps`` steps ``--repeats`` times, alternating (plain, DP,
plain, DP, ...); ms/step is the best repeat (the machine is shared: the minimum is the least disturbed),
all repeats are printed, and the ratio is measured in this one run. Models: SmolLM2-135M
(``builtin:smollm2-135m``) and a tiny 2-layer Llama (hidden 64) with the same tokenizer.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedkt.config import LoraSettings, TrainConfig
from fedkt.data.collate import make_sft_example
from fedkt.data.prompts import context, continuation
from fedkt.data.tasks import load_task
from fedkt.losses import answer_ce
from fedkt.models import add_lora, load_model
from fedkt.privacy.dp_sgd import DPConfig, dp_train_loop
from fedkt.train import train_loop

LORA = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def make_batch(tok, n: int, length: int):
    exs = load_task("arc_easy", "train")
    out = []
    for i in range(n):
        prompt = "\n\n".join(context(e) + continuation(e.target) for e in exs[i * 6:(i + 1) * 6 - 1])
        last = exs[(i + 1) * 6 - 1]
        s = make_sft_example(tok, prompt + "\n\n" + context(last), continuation(last.target), length)
        if len(s.input_ids) != length:
            raise RuntimeError(f"example {i} has {len(s.input_ids)} tokens, wanted {length}")
        out.append(s)
    return out


def tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def bench(name: str, model, tok, data, steps: int, repeats: int) -> None:
    model = add_lora(model, LORA, seed=0)
    pad = tok.pad_token_id
    n = len(data)

    def plain(k: int) -> float:
        # one batch per epoch here, so epochs = k gives k steps
        cfg = TrainConfig(lr=1e-4, batch_size=n, epochs=k, max_steps=k, warmup_ratio=0.0, max_grad_norm=1.0)
        t = time.perf_counter()
        stats = train_loop(model, data, lambda m, b: answer_ce(m(input_ids=b["input_ids"],
                                                         attention_mask=b["attention_mask"]).logits, b["labels"]),
                   cfg, seed=0, pad_id=pad)
        assert stats.steps == k, stats
        return time.perf_counter() - t

    def dp(k: int) -> float:
        cfg = DPConfig(lr=1e-4, batch_size=n, max_steps=k, noise_multiplier=1.0, max_grad_norm=1.0)
        t = time.perf_counter()
        stats = dp_train_loop(model, data, cfg, seed=0, pad_id=pad)
        assert stats.steps == k and stats.mean_batch_size == n
        return time.perf_counter() - t

    plain(1), dp(1)  # warm-up
    per_step: dict[str, list[float]] = {"plain": [], "dp": []}
    for _ in range(repeats):
        per_step["plain"].append(1000 * plain(steps) / steps)
        per_step["dp"].append(1000 * dp(steps) / steps)
    best = {k: min(v) for k, v in per_step.items()}
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{name}: batch {n} x {len(data[0].input_ids)} tokens, LoRA r=8 q/k/v/o ({lora:,} params), "
          f"{repeats} x {steps} steps each, threads={torch.get_num_threads()}")
    for k, label in (("plain", "plain step "), ("dp", "DP-SGD step")):
        runs = ", ".join(f"{x:.0f}" for x in per_step[k])
        print(f"  {label} : {best[k]:8.1f} ms/step (best of {repeats} repeats: {runs})")
    print(f"  DP / plain  : {best['dp'] / best['plain']:8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per repeat (real model)")
    ap.add_argument("--tiny-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model, tok = load_model(a.model)
    data = make_batch(tok, a.batch, a.tokens)
    bench(f"tiny Llama (2 layers, hidden 64, vocab {len(tok)})", tiny_llama(tok), tok, data, a.tiny_steps, a.repeats)
    bench(a.model, model, tok, data, a.steps, a.repeats)


if __name__ == "__main__":
    main()
