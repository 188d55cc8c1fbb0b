"""Which tokens the contextual attack recovers (4 ARC-Easy prompts, SmolLM2-135M, eps 1 and 10); docs/privacy-attacks.md.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/privacy_contextual_which.py   # ~35 s
"""
from fedkt.models import load_model
from fedkt.privacy.text_dp import EmbeddingKit, sample_replacements
from fedkt.privacy.attacks_text import contextual_attack, plant, make_canaries
from fedkt.algorithms.fedcot import render_question
from fedkt.data.partition import subsample
from fedkt.data.tasks import load_task
from fedkt.seeds import derive_seed
import collections, sys

import torch
m, tok = load_model("builtin:smollm2-135m"); m.eval()
kit = EmbeddingKit.for_model(tok, m.get_input_embeddings().weight.detach())
exs = subsample(load_task("arc_easy", "test", sys.argv[1] if len(sys.argv) > 1 else "/work/shared/assets/data"), 20, derive_seed(0, "audit", "arc_easy"))[:4]
texts = plant([render_question(e) for e in exs], make_canaries(4, 0))
ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
for eps in (1.0, 10.0):
    obs = [sample_replacements(torch.tensor(x), kit, eps, seed=7).tolist() for x in ids]
    g = contextual_attack(m, tok, kit, obs, eps)
    hit = collections.Counter(); tot = 0
    for x, o, y in zip(ids, obs, g):
        for a, b, c in zip(x, o, y):
            tot += 1
            if a == c: hit[(tok.decode([a]), "kept" if a == b else "undone")] += 1
    print(eps, tot, sum(hit.values()), hit.most_common(40))
