"""FDKT's two template-filling workloads timed at several batch sizes (docs/fdkt.md, issue 23): one client's
DP sampling (the SLM with a fresh LoRA adapter, the public sampling plan's prompts, the example's
temperature 1 / top-p 0.95 and token limits) and the server LLM's 3-shot augmentation (prompts built by
``filter_augment.augment_prompt`` from real training questions standing in for kept samples, temperature
0.7, the answer greedy). Prints, per run, process-CPU and wall seconds and the filler's counts. Run through
the heavy-job queue with one thread; to compare code versions run it with another checkout on PYTHONPATH:

  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fdkt_fill_batch.py DATA_DIR sample:64:16,32,64 augment:48:16,48

(``augment6:64:64``: 64 six-shot prompts at batch 64.)
"""

from __future__ import annotations

import random
import sys
import time


def _models():
    import torch

    torch.set_num_threads(1)
    from fedkt.config import LoraSettings
    from fedkt.models import add_lora, load_model

    slm, stok = load_model("builtin:smollm2-slm")
    llm, ltok = load_model("builtin:smollm2-135m")
    return (add_lora(slm, LoraSettings()), stok), (llm, ltok)


def _fill(model, tok, prompts, batch_size, **kw):
    from fedkt.algorithms.fdkt.template_fill import FillStats, fill_mc_template_cached

    st = FillStats()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fill_mc_template_cached(model, tok, prompts, batch_size=batch_size, stats=st, **kw)
    return out, time.process_time() - c0, time.perf_counter() - t0, st


def main(data_dir: str, specs: list[str]) -> None:
    from fedkt.algorithms.fdkt.filter_augment import augment_prompt
    from fedkt.algorithms.fdkt.samples import sampling_plan, synth_prefix
    from fedkt.data.tasks import load_task
    from fedkt.seeds import derive_seed
    from fedkt.text_generators import HFGenerator

    (slm, stok), (llm, ltok) = _models()
    for spec in specs:
        kind, n, sizes = spec.split(":")
        n = int(n)
        if kind == "sample":
            plan = sampling_plan(["arc_easy", "openbookqa"], n)
            prompts, letters = [synth_prefix(t, l) for t, l in plan], [l for _, l in plan]
            model, tok = slm, stok
            kw = dict(answers=letters, n_choices=4, question_tokens=64, choice_tokens=24, temperature=1.0,
                      top_p=0.95, seed_for=lambda tag: derive_seed(1, tag))
        else:  # "augment" (3 shots) or "augmentK" (K shots: longer prompts, as DP samples' long fields make them)
            shots = int(kind[len("augment"):] or 3)
            gen = HFGenerator(llm, ltok)
            pools = {t: load_task(t, "train", data_dir)[:200] for t in ("arc_easy", "openbookqa")}
            prompts = []
            for j in range(n):
                task = ("arc_easy", "openbookqa")[j % 2]
                prompts.append(augment_prompt(gen, random.Random(j).sample(pools[task], shots), 4))
            model, tok = llm, ltok
            kw = dict(n_choices=4, question_tokens=64, choice_tokens=24, temperature=0.7, top_p=1.0,
                      greedy=("answer",), seed_for=lambda tag: derive_seed(2, tag))
        lengths = sorted(len(r) for r in tok(prompts, add_special_tokens=False)["input_ids"])
        print(f"{kind}: {n} prompts of {lengths[0]}-{lengths[-1]} tokens (median {lengths[n // 2]})", flush=True)
        for bs in (int(b) for b in sizes.split(",")):
            out, cpu, wall, st = _fill(model, tok, prompts, bs, **kw)
            print(f"  {kind} batch {bs}: cpu {cpu:.1f} s, wall {wall:.1f} s; forwards {st.forward_calls} "
                  f"(prefills/boundaries {st.prefill_calls}), tokens sampled {st.new_tokens}, fed {st.input_tokens}",
                  flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
