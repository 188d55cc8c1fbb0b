"""The replay attack on FedCoT's text DP with a real tokenizer and kit (issue 19): a server that knows
the simulation seed reproduces a client's perturbation and reads tokens back; against a client drawing
from its OS CSPRNG the replay agrees only by chance.

    PYTHONPATH=src python benchmarks/replay_attack.py --model builtin:smollm2-135m \
        --data ../shared/assets/data --prompts 100 --recovery-prompts 4

Prints one row per ε: token match of the server's replay with a simulated client's perturbation and with
a CSPRNG client's, the chance level Σ P(t'|t)², and (on the first --recovery-prompts prompts) the replay
attacker's token recovery with the known seed vs against the CSPRNG.
"""

from __future__ import annotations

import argparse
import time

from fedkt.algorithms.fedcot import render_question
from fedkt.clients import ClientContext
from fedkt.data.tasks import load_task
from fedkt.models import load_model
from fedkt.privacy.kit_check import validate_kit
from fedkt.privacy.replay import chance_match, replay_recovery, token_match
from fedkt.privacy.text_dp import EmbeddingKit, perturb_batch
from fedkt.seeds import derive_seed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--data", default="../shared/assets/data")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--recovery-prompts", type=int, default=4)
    ap.add_argument("--epsilons", default="1,3,6,10")
    a = ap.parse_args()
    model, tok = load_model(a.model)
    kit = EmbeddingKit.for_model(tok, model.get_input_embeddings().weight.detach())
    t0 = time.perf_counter()
    validate_kit(kit, tok)
    print(f"kit {kit.vocab_size} x {kit.n_neighbors}: validated against the tokenizer in {time.perf_counter() - t0:.1f} s")
    prompts = [render_question(e) for e in load_task("arc_easy", "train", a.data)[:a.prompts]]
    original = [r.token_ids for r in perturb_batch(prompts, kit, tok, float("inf"), seed=0)]
    flat = [x for r in original for x in r]
    k = a.recovery_prompts
    n_rec = sum(len(r) for r in original[:k])
    print(f"{len(prompts)} ARC-Easy prompts, {len(flat)} tokens; recovery on the first {k} ({n_rec} tokens)")
    print("| ε | changed | replay = simulated client | replay = CSPRNG client | chance | recovery, known seed "
          "| recovery vs CSPRNG |")
    print("|---|---|---|---|---|---|---|")
    for eps in (float(x) for x in a.epsilons.split(",")):
        server_seed = derive_seed(derive_seed(0, "secret", "client0"), "textdp")
        replay = [r.token_ids for r in perturb_batch(prompts, kit, tok, eps, seed=server_seed)]
        sim = [r.token_ids for r in perturb_batch(prompts, kit, tok, eps,
                                                  seed=ClientContext("client0", simulation=True).secret_rng("textdp"))]
        dep = [r.token_ids for r in perturb_batch(prompts, kit, tok, eps, seed=ClientContext("client0").secret_rng("textdp"))]
        changed = 1 - token_match(sim, original)
        rec_seed = derive_seed(derive_seed(0, "secret", "client0"), "textdp")
        rs = replay_recovery(kit, eps, rec_seed, [x for r in original[:k] for x in r],
                             [x for r in perturb_batch(prompts[:k], kit, tok, eps, seed=rec_seed) for x in r.token_ids])
        rd = replay_recovery(kit, eps, rec_seed, [x for r in original[:k] for x in r],
                             [x for r in dep[:k] for x in r])
        print(f"| {eps:g} | {100 * changed:.1f}% | {token_match(sim, replay):.4f} | {token_match(dep, replay):.4f} | "
              f"{chance_match(kit, flat, eps):.4f} | {100 * rs['recovered']:.1f}% | {100 * rd['recovered']:.1f}% |")


if __name__ == "__main__":
    main()
