"""One FDKT client's sampling throughput (step 1b) at the default [fdkt] settings: template sampling of
``--samples`` samples from the SLM (the DP adapter's cost is the same as the fresh one's: LoRA on the same
model), batched by ``fdkt.gen_batch_size``; prints samples/s, the parse rate, and the time to the paper's
and to "hundreds" of samples. DP-SGD's cost is measured by ``fdkt_paper.py --ratio``.

  /work/wt/heavy env PYTHONPATH=src python benchmarks/fdkt_sampling_rate.py --samples 64 --set model.threads=1
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", nargs="?")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--set", dest="sets", action="append", default=[])
    a = p.parse_args()

    from fedkt.algorithms.fdkt import FDKTConfig, sample_generations, sampling_plan, synth_prefix
    from fedkt.algorithms.fdkt.client import parse_samples
    from fedkt.experiment import set_threads
    from fedkt.models import add_lora, load_model
    from fedkt.registry import load_config

    cfg = load_config(a.config, a.sets)
    set_threads(cfg)
    fd = cfg.section(FDKTConfig)
    model, tok = load_model(cfg.model.slm)
    model = add_lora(model, cfg.lora, seed=cfg.seed)  # the client samples through its LoRA-wrapped SLM
    plan = sampling_plan([a.task], a.samples)
    meta = {"sampling": fd.sampling, "letters": [l for _, l in plan], "n_choices": [4] * len(plan),
            "gen_batch_size": fd.gen_batch_size, "temperature": fd.temperature, "top_p": fd.top_p,
            "question_tokens": fd.question_tokens, "choice_tokens": fd.choice_tokens, "sample_tokens": fd.sample_tokens}
    t0 = time.perf_counter()
    raw = sample_generations(model, tok, [synth_prefix(t, l) for t, l in plan], meta, seed=cfg.seed, desc="probe")
    dt = time.perf_counter() - t0
    texts, _, stats, _ = parse_samples(plan, raw)
    rate = a.samples / dt
    print(f"{cfg.model.slm}: {a.samples} samples ({fd.sampling}, batch {fd.gen_batch_size}, question_tokens "
          f"{fd.question_tokens}, choice_tokens {fd.choice_tokens}) in {dt:.1f} s = {rate:.2f} samples/s; "
          f"{stats.accepted} parsed (untrained SLM); rejected {dict(stats.rejected)}")
    for n in (200, 500, 2000 * 4):
        print(f"  {n} samples: {n / rate / 60:.1f} min")


if __name__ == "__main__":
    main()
