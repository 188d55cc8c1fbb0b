"""FedAvg of LoRA adapters (McMahan et al. 2017), sample-weighted.

Per round t: the server broadcasts the global adapter θᵗ; each client sets it, fine-tunes E local
epochs on its private data and uploads its adapter with its example count; the server averages the
adapters weighted by example count. A and B matrices are averaged separately (as FATE-LLM and most LoRA
FL work do). Under secure aggregation the server would see only the weighted sum; the arithmetic is the
same.
"""

from __future__ import annotations

import time

import torch

from fedkt import progress
from fedkt.experiment import Checkpoints, Env, derive_seed
from fedkt.federation import Message
from fedkt.models import get_adapter_state, set_adapter_state
from fedkt.train import sft


# ---------------------------------------------------------------------------------------------- client
def client_fit(ctx, msg: Message) -> Message:
    """Set the received adapter (or the common initial one), train ``epochs`` on local data, upload."""
    model, tok, cfg = ctx.shared["model"], ctx.shared["tok"], ctx.shared["cfg"]
    set_adapter_state(model, msg.tensors or ctx.shared["init_adapter"])
    rnd = msg.meta.get("round", 0)
    stats = sft(model, tok, ctx.data, cfg.train, seed=derive_seed(cfg.seed, "fit", rnd, ctx.cid),
                epochs=msg.meta.get("epochs", cfg.train.epochs), desc=f"round {rnd} {ctx.cid} train")
    return Message(tensors=get_adapter_state(model),
                   meta={"num_examples": len(ctx.data), "loss": stats.mean_loss, "steps": stats.steps})


HANDLERS = {"fit": client_fit}


# ---------------------------------------------------------------------------------------------- server
def aggregate(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of adapter state dicts: Σ wᵢ θᵢ / Σ wᵢ, key by key (float64 accumulation)."""
    if not states:
        raise ValueError("nothing to aggregate")
    if len(states) != len(weights):
        raise ValueError("one weight per state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to > 0")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("adapters have different keys")
    out = {}
    for k in keys:
        acc = sum(s[k].double() * (w / total) for s, w in zip(states, weights))
        out[k] = acc.to(states[0][k].dtype)
    return out


def fit_round(fed, global_state: dict[str, torch.Tensor], rnd: int, epochs: float) -> dict[str, torch.Tensor]:
    """Steps 1–3 of a FedAvg round: broadcast, local training, weighted aggregation."""
    replies = fed.broadcast("fit", Message(tensors=global_state, meta={"round": rnd, "epochs": epochs}), rnd)
    states = [r.tensors for r in replies.values()]
    weights = [r.meta["num_examples"] for r in replies.values()]
    losses = {c: round(r.meta["loss"], 4) for c, r in replies.items()}
    progress.log(f"round {rnd}: client train loss {losses}")
    return aggregate(states, weights)


def run(env: Env) -> dict:
    cfg = env.cfg
    fed = env.federation(HANDLERS, "fedavg")
    ckpt = Checkpoints(env.out, "fedavg")
    _, _, init = env.slm
    state, per_round, start, timings = init, [], 1, {"client_train_s": 0.0, "aggregate_s": 0.0, "eval_s": 0.0}
    resumed = ckpt.latest()
    if resumed:
        last, tensors, saved = resumed
        state, per_round, timings = tensors["slm"], saved["per_round"], saved["timings"]
        fed.ledger = type(fed.ledger).from_list(saved["ledger"])
        start = last + 1
        progress.log(f"fedavg: resuming after round {last}")
    slm_metrics = per_round[-1].get("slm", {}) if per_round else {}
    for rnd in range(start, cfg.federation.rounds + 1):
        t0 = time.perf_counter()
        state = fit_round(fed, state, rnd, cfg.train.epochs)
        client_s = fed.timings.pop("fit", 0.0)
        timings["client_train_s"] += client_s
        timings["aggregate_s"] += time.perf_counter() - t0 - client_s
        entry = {"round": rnd}
        if cfg.eval.every_round or rnd == cfg.federation.rounds:
            t2 = time.perf_counter()
            slm_metrics = entry["slm"] = env.evaluate("slm", state, f"fedavg r{rnd}")
            timings["eval_s"] += time.perf_counter() - t2
            env.log_metrics(method="fedavg", round=rnd, role="slm", metrics=slm_metrics)
        per_round.append(entry)
        ckpt.save(rnd, {"slm": state}, {"per_round": per_round, "timings": timings,
                                          "ledger": fed.ledger.to_list()})
    model, tok, _ = env.slm
    from fedkt.models import save_adapter

    save_adapter(model, state, env.out / "adapters" / "fedavg" / "slm")
    return {"slm": slm_metrics, "comm": fed.ledger.summary(), "per_round": per_round, "timings": timings,
            "failures": fed.failures}
