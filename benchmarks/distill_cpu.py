"""Mutual distillation CPU time: the quickstart pair (builtin:smollm2-135m LLM, builtin:smollm2-slm SLM, LoRA r=8 q/k/v/o),
6 simultaneous steps of batch 8 on 64 ARC-Easy train examples, after one warm-up step.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/distill_cpu.py LABEL
"""
import sys, time, torch
from fedkt.config import LoraSettings
from fedkt.models import load_lora_model
from fedkt.data.tasks import load_task
from fedkt.algorithms.fedcollm import FedCoLLMConfig, mutual_distill
lora = LoraSettings(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
slm = load_lora_model("builtin:smollm2-slm", "float32", lora, 0)
llm = load_lora_model("builtin:smollm2-135m", "float32", lora, 1)
aux = load_task("arc_easy", "train", "")[:64]
cfg = FedCoLLMConfig(kd_steps=6, batch_size=8, temperature=2.0, kd_lambda=1.0, lr_slm=1e-3, lr_llm=1e-3)
mutual_distill(slm.model, llm.model, slm.tokenizer, aux[:8], FedCoLLMConfig(kd_steps=1, batch_size=8), 512, 1.0, 0)
c = time.process_time()
out = mutual_distill(slm.model, llm.model, slm.tokenizer, aux, cfg, 512, 1.0, 0)
print(sys.argv[1], f"distill 6 steps CPU {time.process_time() - c:.1f} s", {k: round(v, 5) for k, v in out.items() if k.endswith("_mean")})
