"""The baselines every paper compares against: zero-shot, standalone, centralized.

* zero-shot: the pretrained models as they are (the fresh LoRA adapter is the identity: B = 0).
* standalone: each client fine-tunes alone on its own data for as many epochs as a federated client
  trains in all rounds together (rounds × local epochs); clients report only metrics, the mean over
  clients is the result (as the papers report it).
* centralized: one adapter trained on the pooled data of all clients, for the same epochs; when a server
  LLM is configured it is also fine-tuned on all clients' data plus the auxiliary set (the FedCoLLM
  paper's centralized upper bound for the LLM).
"""

from __future__ import annotations

import statistics

from fedkt.evaluate import evaluate_tasks
from fedkt.experiment import Env, derive_seed
from fedkt.federation import Message
from fedkt.models import get_adapter_state, save_adapter, set_adapter_state
from fedkt.train import sft


def zero_shot(env: Env) -> dict:
    result = {"slm": env.evaluate("slm", None, "zero-shot")}
    if env.has_llm:
        result["llm"] = env.evaluate("llm", None, "zero-shot")
    return result


def client_train_and_evaluate(ctx, msg: Message) -> Message:
    """Standalone: train from the common initial adapter on local data, evaluate locally, keep the
    adapter in the client's workdir; only metrics leave the client."""
    model, tok, cfg = ctx.shared["model"], ctx.shared["tok"], ctx.shared["cfg"]
    set_adapter_state(model, ctx.shared["init_adapter"])
    stats = sft(model, tok, ctx.data, cfg.train, seed=derive_seed(cfg.seed, "standalone", ctx.cid),
                epochs=msg.meta["epochs"], desc=f"standalone {ctx.cid} train")
    if ctx.workdir is not None:
        save_adapter(model, None, ctx.workdir / "slm")
    metrics = evaluate_tasks(model, tok, ctx.shared["eval_sets"], cfg.eval.batch_size, cfg.eval.max_new_tokens,
                             desc=f"standalone {ctx.cid}")
    return Message(meta={"metrics": metrics, "loss": stats.mean_loss, "num_examples": len(ctx.data)})


def mean_metrics(per_client: list[dict[str, dict]]) -> dict[str, dict]:
    out = {}
    for task in per_client[0]:
        rows = [c[task] for c in per_client]
        out[task] = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "n"}
        out[task]["n"] = rows[0]["n"]
        out[task]["std_acc"] = statistics.pstdev(r["acc"] for r in rows)
    return out


def standalone(env: Env) -> dict:
    cfg = env.cfg
    fed = env.federation({"train_and_evaluate": client_train_and_evaluate}, "standalone")
    epochs = cfg.train.epochs * cfg.federation.rounds
    replies = fed.broadcast("train_and_evaluate", Message(meta={"epochs": epochs}), round=0)
    per_client = {cid: r.meta["metrics"] for cid, r in replies.items()}
    for cid, m in per_client.items():
        env.log_metrics(method="standalone", client=cid, role="slm", metrics=m)
    return {"slm": mean_metrics(list(per_client.values())), "per_client": per_client,
            "comm": fed.ledger.summary(), "failures": fed.failures}


def centralized(env: Env) -> dict:
    cfg = env.cfg
    epochs = cfg.train.epochs * cfg.federation.rounds
    pooled = [e for c in env.clients_data for e in c]
    model, tok, init = env.slm
    set_adapter_state(model, init)
    sft(model, tok, pooled, cfg.train, seed=derive_seed(cfg.seed, "centralized", "slm"), epochs=epochs,
        desc="centralized slm train")
    state = get_adapter_state(model)
    save_adapter(model, state, env.out / "adapters" / "centralized" / "slm")
    result = {"slm": env.evaluate("slm", state, "centralized")}
    if env.has_llm:
        llm, ltok, linit = env.llm
        set_adapter_state(llm, linit)
        sft(llm, ltok, pooled + env.aux, cfg.train, seed=derive_seed(cfg.seed, "centralized", "llm"),
            epochs=epochs, desc="centralized llm train")
        lstate = get_adapter_state(llm)
        save_adapter(llm, lstate, env.out / "adapters" / "centralized" / "llm")
        result["llm"] = env.evaluate("llm", lstate, "centralized")
    return result
