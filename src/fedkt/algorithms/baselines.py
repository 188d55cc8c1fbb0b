"""The baselines every paper compares against: zero-shot, standalone, centralized.

* zero-shot: the pretrained models as they are (the fresh LoRA adapter is the identity: B = 0).
* standalone: each client fine-tunes alone on its own data for as many epochs as a federated client
  trains in all rounds together (rounds × local epochs); clients report only metrics (with which public
  evaluation questions they got right, ``eval.per_question``), the mean over
  clients is the result (as the papers report it).
* centralized: one adapter trained on the pooled data of all clients, for the same epochs; when a server
  LLM is configured it is also fine-tuned on all clients' data plus the auxiliary set (the FedCoLLM
  paper's centralized upper bound for the LLM). It exists only in simulation, where pooling is possible.
"""

from __future__ import annotations

import statistics
import time

from fedkt import progress
from fedkt.clients import ClientContext
from fedkt.data.prompts import with_format
from fedkt.evaluate import evaluate_tasks
from fedkt.federation.base import Message
from fedkt.models import get_adapter_state, save_adapter
from fedkt.privacy.policy import guard
from fedkt.registry import MethodSpec, register
from fedkt.run_results import MethodResult
from fedkt.seeds import derive_seed
from fedkt.server import ServerContext
from fedkt.train import sft


def zero_shot(server: ServerContext) -> MethodResult:
    metrics, correct = {}, {}
    for role in ("slm", "llm") if server.has_llm else ("slm",):
        metrics[role], correct[role] = server.evaluate_questions(role, None, "zero-shot")
    return MethodResult(metrics=metrics, correct=correct if server.cfg.eval.per_question else None)


def train_and_evaluate_locally(ctx: ClientContext, data: list, epochs: float, label: str
                               ) -> tuple[dict[str, dict], dict]:
    """Train the client's SLM from the common initial adapter on ``data`` (seeded as Standalone, so a
    method that adds data to Standalone's is a paired comparison), keep the adapter in the client's
    workdir, evaluate on the public sets. Returns the metrics and the reply meta of the per-question
    correctness (``{"correct": ...}``, empty where ``eval.per_question`` is off): what leaves the client."""
    model, tok = ctx.slm.use(None), ctx.slm.tokenizer
    data = with_format(data, ctx.eval)  # e.g. FDKT's synthetic examples, rebuilt from text: eval.format's prompts
    t0 = time.perf_counter()
    if data:
        stats = sft(model, tok, data, ctx.train, seed=ctx.seed_for("standalone"), epochs=epochs,
                    desc=f"{label} {ctx.cid} train")
        progress.log(f"{label} {ctx.cid}: train loss {stats.mean_loss:.4f} (local; not sent)")
    if ctx.workdir is not None:
        save_adapter(model, None, ctx.workdir / "slm")
    t1 = time.perf_counter()
    correct = {} if ctx.eval.per_question else None
    metrics = evaluate_tasks(model, tok, ctx.eval_sets, ctx.eval.batch_size, ctx.eval.max_new_tokens,
                             desc=f"{label} {ctx.cid}", correct=correct, precision=ctx.eval.precision)
    # the times depend on the private data's size and lengths: logged locally, never sent
    progress.log(f"{label} {ctx.cid}: trained on {len(data)} examples in {t1 - t0:.1f} s, evaluated in "
                 f"{time.perf_counter() - t1:.1f} s (local; not sent)")
    return metrics, ({"correct": correct} if correct is not None else {})


def client_train_and_evaluate(ctx: ClientContext, msg: Message) -> Message:
    """Standalone: train on local data, evaluate locally; only metrics (and per-question correctness on the
    public evaluation sets) leave the client."""
    metrics, correct = train_and_evaluate_locally(ctx, list(ctx.data), msg.meta["epochs"], "standalone")
    return Message(meta={"metrics": metrics, "num_examples": len(ctx.data), **correct})


def mean_metrics(per_client: list[dict[str, dict]]) -> dict[str, dict]:
    out = {}
    for task in per_client[0]:
        rows = [c[task] for c in per_client]
        out[task] = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "n"}
        out[task]["n"] = rows[0]["n"]
        out[task]["std_acc"] = statistics.pstdev(r["acc"] for r in rows)
    return out


def standalone(server: ServerContext) -> MethodResult:
    epochs = server.cfg.train.epochs * server.cfg.federation.rounds
    with server.federation(STANDALONE) as fed:
        replies = fed.broadcast("train_and_evaluate", Message(meta={"epochs": epochs}), round=0)
    per_client = {cid: r.meta["metrics"] for cid, r in replies.items()}
    for cid, m in per_client.items():
        server.log_metrics(method="standalone", client=cid, role="slm", metrics=m)
    return MethodResult(metrics={"slm": mean_metrics(list(per_client.values()))}, per_client=per_client,
                        comm=fed.ledger.summary(), failures=list(fed.failures),
                        per_client_correct=server.client_correct(replies))


def centralized(server: ServerContext) -> MethodResult:
    cfg = server.cfg
    epochs = cfg.train.epochs * cfg.federation.rounds
    pooled = server.client_data()
    roles = {"slm": pooled} | ({"llm": pooled + server.aux} if server.has_llm else {})
    metrics, correct = {}, {}
    for role, data in roles.items():
        m = server.model(role)
        sft(m.use(None), m.tokenizer, data, cfg.train, seed=derive_seed(cfg.seed, "centralized", role),
            epochs=epochs, desc=f"centralized {role} train")
        state = get_adapter_state(m.model)
        server.save_adapter(role, state, "centralized")
        metrics[role], correct[role] = server.evaluate_questions(role, state, "centralized")
    return MethodResult(metrics=metrics, correct=correct if cfg.eval.per_question else None)


register(MethodSpec(name="zero_shot", label="Zero-shot", rank=0, run=zero_shot,
                    summary="the pretrained models as they are"))
STANDALONE = register(MethodSpec(
    name="standalone", label="Standalone", rank=10, run=standalone,
    handlers=guard("standalone", {"train_and_evaluate": client_train_and_evaluate}),
    summary="each client fine-tunes a LoRA adapter alone; the mean over clients"))
register(MethodSpec(
    name="centralized", label="Centralized", rank=90, run=centralized,
    summary="one adapter on the pooled client data (and the LLM on pooled + auxiliary data); simulation only"))
