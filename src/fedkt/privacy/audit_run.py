"""``fedkt audit``: run the privacy attacks on one model and render their tables (docs/privacy-attacks.md).

Three parts, each timed:

1. **Text DP (FedCoT)**: ``limit`` prompts of a task, each with a planted canary (fake patient name and
   record number), perturbed at every ε; attacks: nearest embedding, per-token MAP, contextual
   noisy-channel beam with the model as LM prior, and (``restore``) the model asked to restore the prompt.
2. **Exposure of a secret in a FedCoT prompt**: ``"Patient record {secret} asks: <question>"`` with the
   secret one of N random 4-digit numbers; the attacker ranks all N by the exact channel likelihood of the
   perturbed prompt it received (``fedkt.privacy.exposure.text_dp_exposure``); mean over the prompts.
3. (``membership``) **Exposure through uploaded adapters** and FDKT-style synthetic texts
   (``fedkt.privacy.membership``): trains LoRA adapters on the model, so it costs minutes on a real one.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch

from fedkt.privacy.attacks_text import (AttackSetting, ChannelModel, attack_table, make_canaries, plant,
    render_attack_table)
from fedkt.privacy.exposure import channel_scores, exposure_of_scores, random_baseline, secret_candidates
from fedkt.privacy.membership import adapter_exposure_experiment
from fedkt.privacy.text_dp import sample_replacements
from fedkt.text_generators import HFGenerator

EXPOSURE_TEMPLATE = "Patient record {secret} asks: "


def prompt_exposure(kit, tok, texts: Sequence[str], epsilons: Sequence[float], n_candidates: int,
                    seed: int) -> list[dict[str, Any]]:
    """Mean exposure of a planted 4-digit secret in each prompt, per ε (exact channel attacker)."""
    rows = []
    for j, eps in enumerate(epsilons):
        ch = ChannelModel(kit, eps)
        exps = []
        for i, text in enumerate(texts):
            template = EXPOSURE_TEMPLATE + text.replace("{", "{{").replace("}", "}}")
            cands = secret_candidates(n_candidates, seed * 100003 + i)
            ids = torch.tensor(tok(template.format(secret=cands[0]), add_special_tokens=False)["input_ids"])
            obs = sample_replacements(ids, kit, eps, torch.Generator().manual_seed(seed * 1000 + 31 * j + i))
            scores = channel_scores(kit, tok, obs.tolist(), [template.format(secret=c) for c in cands], eps, ch=ch)
            exps.append(exposure_of_scores(scores, 0))
        rows.append({"epsilon": float(eps), "exposure_mean": sum(exps) / max(1, len(exps)),
                     "exposure_max": max(exps, default=0.0), "n": len(exps)})
    return rows


def run_audit(model, tok, kit, texts: Sequence[str], epsilons: Sequence[float], seed: int = 0,
              setting: AttackSetting | None = None, exposure_candidates: int = 1000, membership=None,
              membership_model=None) -> dict[str, Any]:
    """Everything ``fedkt audit`` prints, as a dict (json-able)."""
    st = setting or AttackSetting()
    out: dict[str, Any] = {"n_prompts": len(texts), "epsilons": [float(e) for e in epsilons],
                           "setting": vars(st).copy(), "timings_s": {}}
    canaries = make_canaries(len(texts), seed)
    gen = HFGenerator(model, tok, batch_size=max(1, len(texts)), desc="restore prompts") if st.restore else None
    t0 = time.perf_counter()
    out["attacks"] = attack_table(plant(texts, canaries), canaries, kit, tok, model, epsilons, seed=seed, setting=st,
                                  generator=gen)
    out["timings_s"]["attacks"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["exposure_text_dp"] = prompt_exposure(kit, tok, texts, epsilons, exposure_candidates, seed)
    out["exposure_candidates"] = exposure_candidates
    out["random_baseline"] = random_baseline(exposure_candidates)
    out["timings_s"]["exposure_text_dp"] = time.perf_counter() - t0
    if membership is not None:
        t0 = time.perf_counter()
        out["membership"] = adapter_exposure_experiment(membership_model, tok, membership, seed=seed)
        out["timings_s"]["membership"] = time.perf_counter() - t0
    return out


def _eps(e: float) -> str:
    return "∞" if math.isinf(e) else f"{e:g}"


def render_audit(res: dict[str, Any]) -> str:
    st = res["setting"]
    lines = [f"## Text DP: attacks on {res['n_prompts']} prompts with planted canaries", "",
             f"Token recovery / exact canary recovery (contextual: beam {st['beam']}, {st['top_k']} channel + "
             f"{st['lm_top']} LM candidates per position"
             + ("; restore: greedy, recovery by alignment)." if st["restore"] else ")."), "",
             render_attack_table(res["attacks"]),
             f"## Exposure of a 4-digit secret in a FedCoT prompt (N = {res['exposure_candidates']}; max "
             f"{math.log2(res['exposure_candidates']):.2f}, random baseline {res['random_baseline']:.2f})", "",
             "| ε per token | mean exposure | max exposure |", "|---|---|---|"]
    for r in res["exposure_text_dp"]:
        lines.append(f"| {_eps(r['epsilon'])} | {r['exposure_mean']:.2f} | {r['exposure_max']:.2f} |")
    m = res.get("membership")
    if m:
        lines += ["", f"## Exposure through uploaded adapters (N = {m['n_candidates']}; max {m['max_exposure']:.2f}, "
                  f"random baseline {m['random_baseline']:.2f}; canary repeated {m['repeats']}×, {m['steps']} steps)",
                  "", "| attacker sees | mean exposure |", "|---|---|"]
        labels = {"initial": "base model + initial adapter (no information)", "client": "the client's adapter "
                  "(plain upload: FedAvg, FedProx, FedCoLLM)", "secure_aggregation": f"mean of {m['clients']} "
                  "clients' adapters (secure aggregation)", "dp_sgd": "the client's DP-SGD adapter",
                  "synthetic_plain": "texts sampled from the plain adapter (n-gram attacker)",
                  "synthetic_dp": "texts sampled from the DP-SGD adapter (FDKT; n-gram attacker)"}
        for k, label in labels.items():
            if k in m:
                lines.append(f"| {label} | {m[k]:.2f} |")
    t = res["timings_s"]
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + "."]
    return "\n".join(lines) + "\n"
