"""Membership inference on the LoRA adapters clients upload (FedAvg, FedProx, FedCoLLM, FedCoT's
FedAvg step): the canary-exposure form of the loss-threshold attack (Yeom et al. 2018; Carlini et al. 2019).

The attacker is the server. It holds the public base model and receives an adapter: the client's own
(plain upload), or only the sample-weighted mean over the round's clients (secure aggregation). It plugs
the adapter into the base model and ranks the N candidate canaries ``template.format(secret=c)`` by the
model's loss on the secret's tokens (lower loss = more likely a training member); the exposure of the
planted canary (``fedkt.privacy.exposure``) measures the leak.

``adapter_exposure_experiment`` runs the whole scenario on one base model: a client trains on private
data holding the canary (repeated ``repeats`` times, as in Carlini et al.), two other clients train on
data without it, and the attack is run on (1) the base model with the initial adapter (no information:
the random baseline), (2) the client's adapter (plain upload), (3) the mean of the three adapters
(secure aggregation), (4) the client's adapter trained with DP-SGD (FDKT's trainer, ``dp_sgd``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from fedkt.algorithms.fedavg import aggregate
from fedkt.config import TrainConfig
from fedkt.data.collate import make_sft_example
from fedkt.losses import answer_ce
from fedkt.models import get_adapter_state, set_adapter_state
from fedkt.privacy.dp_sgd import DPConfig, dp_train_loop
from fedkt.privacy.exposure import exposure_of_scores, ngram_exposure, random_baseline, secret_candidates
from fedkt.train import train_loop


@torch.no_grad()
def candidate_losses(model, tok, template: str, candidates: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Summed NLL of the tokens after the template's prefix, for each candidate (float64 [N])."""
    prefix = tok(template.split("{secret}")[0], add_special_tokens=False)["input_ids"]
    seqs = [tok(template.format(secret=c), add_special_tokens=False)["input_ids"] for c in candidates]
    p = len(prefix)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = torch.empty(len(seqs), dtype=torch.float64)
    model.eval()
    device = next(model.parameters()).device
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s: s + batch_size]
        w = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), w), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), w), dtype=torch.long)
        for i, x in enumerate(chunk):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1).double()
        keep = mask[:, 1:].bool() & (torch.arange(w - 1)[None] >= p - 1)
        out[s: s + len(chunk)] = -(lp * keep).sum(1)
    return out


@torch.no_grad()
def sample_texts(model, tok, prompt: str, n: int, max_new_tokens: int, seed: int) -> list[str]:
    """n samples (temperature 1, no truncation: how FDKT's clients sample) continuing ``prompt``, decoded
    with the prompt; a plain loop without cache (short samples from small models)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]] * n)
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids.to(device)).logits[:, -1].float().cpu()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        ids = torch.cat([ids, nxt], 1)
    return tok.batch_decode(ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def loss_exposure(model, tok, template: str, candidates: Sequence[str]) -> float:
    """Exposure of ``candidates[0]`` ranked by the model's loss (lower loss ranks first)."""
    return exposure_of_scores(-candidate_losses(model, tok, template, candidates), 0)


def adapter_exposure(model, tok, state: dict[str, torch.Tensor], template: str, candidates: Sequence[str]) -> float:
    """Plug an uploaded adapter into the (peft-wrapped) public base model, then ``loss_exposure``."""
    set_adapter_state(model, state)
    return loss_exposure(model, tok, template, candidates)


@dataclass
class MembershipSetting:
    """One scenario: canary template, candidate count, training of the clients' adapters."""

    template: str = "The patient's record number is {secret}."
    n_candidates: int = 1000
    digits: int = 4
    repeats: int = 8
    filler: list[str] = field(default_factory=list)
    clients: int = 3
    lr: float = 1e-2
    steps: int = 60
    batch_size: int = 8
    dp_epsilon: float = 1.0
    dp_noise_multiplier: float | None = None
    canaries: int = 3
    """Independent canaries (secrets); exposures are averaged."""
    synthetic: int = 0
    """If > 0, also sample this many texts from the plain and the DP-SGD model (FDKT's synthetic data) and
    rank the candidates with an n-gram model fit on them (``synthetic_plain``, ``synthetic_dp``)."""
    synthetic_tokens: int = 32


def _sft_data(tok, texts: Sequence[str], max_length: int = 64):
    return [make_sft_example(tok, "", t, max_length) for t in texts]


def adapter_exposure_experiment(model, tok, setting: MembershipSetting | None = None, seed: int = 0,
                                lora_seed: int = 0) -> dict[str, Any]:
    """Run the scenario on a peft-wrapped base model; returns the mean exposure per attack target
    (``initial``, ``client``, ``secure_aggregation``, ``dp_sgd``) and the random baseline."""
    st = setting or MembershipSetting()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    init = get_adapter_state(model)
    filler = st.filler or [f"Note {i}: the sample was stored at {4 + i % 5} degrees." for i in range(24)]
    cfg = TrainConfig(lr=st.lr, max_steps=st.steps, epochs=1000.0, batch_size=st.batch_size, warmup_ratio=0.0,
                      schedule="constant", max_length=64)

    def loss_fn(m, b):
        return answer_ce(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    def train(texts, s, dp: bool):
        set_adapter_state(model, init)
        data = _sft_data(tok, texts)
        if dp:
            dcfg = DPConfig(target_epsilon=st.dp_epsilon, delta=1e-5, max_steps=st.steps, batch_size=st.batch_size,
                            lr=st.lr, max_length=64, noise_multiplier=st.dp_noise_multiplier)
            dp_train_loop(model, data, dcfg, seed=s, pad_id=pad, desc="membership dp-sgd")
        else:
            train_loop(model, data, loss_fn, cfg, seed=s, pad_id=pad, desc="membership train")
        return get_adapter_state(model)

    def synthetic_exposure(state, cands, k):
        set_adapter_state(model, state)
        start = st.template.split()[0]
        texts = sample_texts(model, tok, start, st.synthetic, st.synthetic_tokens, seed * 1000 + k)
        return ngram_exposure(texts, tok, st.template, cands)

    res: dict[str, list[float]] = {"initial": [], "client": [], "secure_aggregation": [], "dp_sgd": []}
    if st.synthetic:
        res.update(synthetic_plain=[], synthetic_dp=[])
    n_other = max(0, st.clients - 1)
    half = len(filler) // max(1, n_other + 1)
    for k in range(st.canaries):
        cands = secret_candidates(st.n_candidates, seed * 1000 + k, st.digits)
        canary = st.template.format(secret=cands[0])
        private = [canary] * st.repeats + filler[:half]
        res["initial"].append(adapter_exposure(model, tok, init, st.template, cands))
        own = train(private, seed * 1000 + k, dp=False)
        res["client"].append(adapter_exposure(model, tok, own, st.template, cands))
        if st.synthetic:
            res["synthetic_plain"].append(synthetic_exposure(own, cands, k))
        others = [train(filler[half * (j + 1): half * (j + 2)] or filler, seed * 1000 + k + 17 * (j + 1), dp=False)
                  for j in range(n_other)]
        mean = aggregate([own] + others, [len(private)] + [half] * n_other)
        res["secure_aggregation"].append(adapter_exposure(model, tok, mean, st.template, cands))
        dp = train(private, seed * 1000 + k, dp=True)
        res["dp_sgd"].append(adapter_exposure(model, tok, dp, st.template, cands))
        if st.synthetic:
            res["synthetic_dp"].append(synthetic_exposure(dp, cands, k))
    set_adapter_state(model, init)
    out: dict[str, Any] = {k: sum(v) / len(v) for k, v in res.items()}
    out.update(per_canary=res, n_candidates=st.n_candidates, random_baseline=random_baseline(st.n_candidates),
               max_exposure=math.log2(st.n_candidates), clients=st.clients, repeats=st.repeats, steps=st.steps,
               dp_epsilon=st.dp_epsilon if st.dp_noise_multiplier is None else None)
    return out
