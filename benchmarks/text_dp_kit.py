"""Text-DP kit on the real SmolLM2-135M tokenizer + input embeddings (49,152 x 576).

Prints: kit build time and peak RSS growth, neighbour-search recall against exact float32 search, kit
size, reload time (with the model check), perturbation throughput on ARC-Easy questions, example
perturbations, and the audit table. Run under the heavy lock:

    flock /tmp/heavy.lock env OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/text_dp_kit.py [--n 200]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import torch


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def arc_prompts(path: Path, n: int) -> list[str]:
    out = []
    for line in path.open():
        r = json.loads(line)
        ch = " ".join(f"{lab}. {t}" for lab, t in zip(r["choices"]["label"], r["choices"]["text"]))
        out.append(f"Question: {r['question']}\nChoices: {ch}")
        if len(out) == n:
            break
    return out


def exact_recall(emb: torch.Tensor, kit, rows: torch.Tensor) -> float:
    """Fraction of the exact float32 top-N (within class) that the kit's lists hold, on sample rows."""
    found = total = 0
    for t in rows.tolist():
        grp = torch.nonzero(kit.covered & (kit.token_class == kit.token_class[t])).flatten()
        d = (emb[grp] - emb[t]).pow(2).sum(1)
        exact = set(grp[torch.topk(d, kit.n_neighbors, largest=False).indices].tolist())
        found += len(exact & set(kit.neighbors[t].tolist()))
        total += kit.n_neighbors
    return found / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="ARC-Easy questions")
    ap.add_argument("--neighbors", type=int, default=64)
    ap.add_argument("--utility", default="rank", choices=("rank", "distance"))
    ap.add_argument("--data", default="/work/shared/assets/data/arc_easy/test.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from safetensors import safe_open
    from transformers import AutoTokenizer

    from fedkt.builtin_models import cache_dir
    from fedkt.privacy import EmbeddingKit, perturb, perturb_batch, render_audit_table, text_dp_audit

    model_dir = cache_dir() / "smollm2-135m"
    if not (model_dir / "model.safetensors").is_file():
        raise SystemExit(f"{model_dir} is missing: run `fedkt models --fetch smollm2-135m` first")
    tok = AutoTokenizer.from_pretrained(model_dir)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:  # = model.get_input_embeddings().weight
        emb = f.get_tensor("model.embed_tokens.weight")
    print(f"embeddings {tuple(emb.shape)}, tokenizer {len(tok)} tokens")

    reset_peak_rss()
    base = rss_mb("VmRSS")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    kit = EmbeddingKit.build(emb, tok, n_neighbors=args.neighbors, utility=args.utility)
    build_s = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    peak = rss_mb("VmHWM") - base
    m = kit.meta
    print(f"kit build: {build_s:.1f} s wall, {cpu_s:.1f} s CPU ({torch.get_num_threads()} threads), "
          f"peak RSS growth {peak:.0f} MB, kit tensors {kit.nbytes / 2**20:.1f} MB "
          f"(N={kit.n_neighbors}, utility={m['utility']}); covered {m['n_covered']} of {m['vocab_size']}; class sizes "
          f"(continuation, word-start) {m['class_sizes']}")
    rows = torch.nonzero(kit.covered).flatten()
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:256]]
    print(f"neighbour-search recall vs exact float32 top-{kit.n_neighbors} (256 random tokens): "
          f"{100 * exact_recall(emb, kit, rows):.2f}%")

    with tempfile.TemporaryDirectory() as tmp:
        kit.save(Path(tmp) / "kit")
        size = sum(p.stat().st_size for p in (Path(tmp) / "kit").iterdir())
        load_s = check_s = math.inf
        for _ in range(3):  # best of 3: the machine is shared
            t0 = time.perf_counter()
            EmbeddingKit.load(Path(tmp) / "kit")
            load_s = min(load_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            kit = EmbeddingKit.load(Path(tmp) / "kit", tok=tok, embeddings=emb)
            check_s = min(check_s, time.perf_counter() - t0)
    print(f"kit on disk {size / 2**20:.1f} MB; reload {1000 * load_s:.0f} ms, reload + model check "
          f"{1000 * check_s:.0f} ms")

    prompts = arc_prompts(Path(args.data), args.n)
    n_tok = sum(len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"])
    perturb_batch(prompts[:4], kit, tok, 6.0, seed=0)
    dt = math.inf
    for i in range(5):  # best of 5: the machine is shared
        t0 = time.perf_counter()
        perturb_batch(prompts, kit, tok, 6.0, seed=i)
        dt = min(dt, time.perf_counter() - t0)
    print(f"perturb_batch: {len(prompts)} ARC-Easy prompts, {n_tok} tokens in {1000 * dt:.0f} ms = "
          f"{n_tok / dt:,.0f} tokens/s (tokenise + sample + decode)")

    print("\nexample (first prompt):")
    print(f"  original : {prompts[0]!r}")
    for eps in (6.0, 10.0, 15.0):
        r = perturb(prompts[0], kit, tok, eps, seed=1)
        print(f"  eps={eps:<4g}: {r.text!r}  ({r.n_changed}/{r.n_tokens} changed)")

    t0 = time.perf_counter()
    rows = text_dp_audit(prompts, kit, tok, epsilons=(1, 3, 6, 10, 15, 20, 30, math.inf), seed=0, top_k=10)
    print(f"\naudit on {len(prompts)} ARC-Easy prompts ({n_tok} tokens), {time.perf_counter() - t0:.1f} s:\n")
    print(render_audit_table(rows))
    r6 = next(r for r in rows if r["epsilon"] == 6)
    print(f"eps=6 per token: protection against the top-10 embedding-inversion attacker "
          f"{100 * (1 - r6['recovery_topk']):.1f}% (InferDPT reports > 90% at eps=6); Bayes-optimal single "
          f"guess recovers {100 * r6['recovery_map']:.2f}%")


if __name__ == "__main__":
    main()
