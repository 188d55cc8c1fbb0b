"""FDKT's server side: steps 1–3 (:func:`synthesize`: ask the clients for DP samples, filter them with the
LLM, let the LLM write new ones), the one-shot run (:func:`run`: send the synthetic set, the clients
train and evaluate), and the method's registration."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from fedkt import progress
from fedkt.algorithms.baselines import mean_metrics
from fedkt.algorithms.fdkt.client import HANDLERS
from fedkt.algorithms.fdkt.config import FDKTConfig
from fedkt.algorithms.fdkt.filter_augment import augment, filter_clusters, filter_scored
from fedkt.algorithms.fdkt.quality import answers_mode, check_answers, contamination, near_duplicates
from fedkt.algorithms.fdkt.report import report_section
from fedkt.algorithms.fdkt.samples import question_key, read_synthetic, task_choices
from fedkt.data.contamination import NgramIndex
from fedkt.data.prompts import with_format
from fedkt.data.synthetic import ParseStats, parse_mc, render_mc
from fedkt.clustering import kmeans, mean_pooled_embeddings
from fedkt.data.tasks import GENERATION_TASKS, Example
from fedkt.federation.base import Message
from fedkt.models import load_model
from fedkt.privacy.epsilons import per_client
from fedkt.privacy.policy import guard
from fedkt.registry import MethodSpec, register
from fedkt.rounds import write_json_atomic
from fedkt.run_results import MethodResult
from fedkt.seeds import derive_seed
from fedkt.text_generators import is_remote


@dataclass
class Synthesis:
    """Steps 1–3's product: the kept DP samples, the LLM's augmented examples, and the record of how they
    were made. ``examples`` (kept + augmented) is FedCoLLM's auxiliary set; FDKT's clients train on the
    part ``fdkt.synthetic_set`` names (:func:`synthetic_part`)."""

    kept: list[Example]
    augmented: list[Example]
    record: dict
    """{"privacy": {client: ε, δ, σ, ...}, "stages": counts, "samples": a few per stage, "timings": s}."""

    @property
    def examples(self) -> list[Example]:
        return self.kept + self.augmented

    def to_dict(self) -> dict:
        rows = lambda exs: [{"task": e.task, "id": e.id, "text": render_mc(e)} for e in exs]  # noqa: E731
        return {"kept": rows(self.kept), "augmented": rows(self.augmented), "record": self.record}

    @classmethod
    def from_dict(cls, d: dict) -> "Synthesis":
        def read(rows):
            exs = [parse_mc(r["text"], task=r["task"], id=r["id"]) for r in rows]
            if any(e is None for e in exs):
                raise ValueError("the saved synthetic set holds an invalid example; delete the file to synthesize again")
            return exs

        if "examples" in d:  # saved before issue 22: one list, the augmented ones have ids "aug-…"
            exs = read(d["examples"])
            return cls([e for e in exs if not e.id.startswith("aug-")], [e for e in exs if e.id.startswith("aug-")],
                       d["record"])
        return cls(read(d["kept"]), read(d["augmented"]), d["record"])


def filter_mode(cfg: FDKTConfig, remote: bool) -> str:
    """``cfg.filter`` with "auto" resolved for the server's LLM (``remote``: an ``openai:`` server);
    "score" needs a local LLM's likelihoods."""
    if cfg.filter == "auto":
        return "llm" if remote else "score"
    if cfg.filter == "score" and remote:
        raise ValueError("fdkt.filter = 'score' reads the LLM's likelihoods and needs a local LLM; with an openai: "
                         "server use filter = 'llm' (or 'auto')")
    return cfg.filter


def embedder(server, cfg: FDKTConfig):
    """(model, tokenizer) whose hidden states embed the samples (see ``FDKTConfig.embed_model``)."""
    spec = cfg.embed_model or server.cfg.model.llm
    if not spec or is_remote(spec):
        return server.slm.use(None), server.slm.tokenizer
    if spec == server.cfg.model.llm:
        return server.llm.use(None), server.llm.tokenizer
    return load_model(spec)


def client_request(cfg: FDKTConfig, tasks: list[str], choices: dict[str, int]) -> dict:
    """Step 1's request (each client's ε is added to it): DP-SGD and sampling settings, the public plan's tasks
    and each task's number of choices."""
    return {"choices": choices, "delta": cfg.delta, "max_grad_norm": cfg.max_grad_norm, "dp_epochs": cfg.dp_epochs,
            "dp_batch_size": cfg.dp_batch_size, "dp_lr": cfg.dp_lr, "samples": cfg.samples_per_client,
            "sampling": cfg.sampling, "question_tokens": cfg.question_tokens, "choice_tokens": cfg.choice_tokens,
            "sample_tokens": cfg.sample_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "gen_batch_size": cfg.gen_batch_size, "tasks": tasks, "samples_in_report": cfg.samples_in_report}


def receive(replies: dict[str, Message]) -> tuple[list[Example], ParseStats]:
    """The server re-reads what it received (it trusts no client) and drops duplicates across clients."""
    recv = ParseStats()
    pool: list[Example] = []
    seen: set[str] = set()
    for c, r in replies.items():
        for ex in read_synthetic(r.texts, r.meta["tasks"], recv, prefix=f"{c}-"):
            if question_key(ex) in seen:
                recv.accepted -= 1
                recv.add("duplicate")
                continue
            seen.add(question_key(ex))
            pool.append(ex)
    return pool, recv


def select(server, cfg: FDKTConfig, gen, pool: list[Example], mode: str, timings: dict) -> tuple[list[Example], dict]:
    """Step 2: embed the samples, k-means them, and let the LLM pick each cluster's eligible ones."""
    if not pool or mode == "none":
        return list(pool), {"candidates": len(pool), "mode": mode, "kept": len(pool),
                            "skipped": "filter = none" if cfg.filter == "none" else "no samples"}
    t0 = time.perf_counter()
    model, tok = embedder(server, cfg)
    x = mean_pooled_embeddings(model, tok, [render_mc(e) for e in pool], batch_size=cfg.gen_batch_size,
                               max_length=server.cfg.train.max_length)
    km = kmeans(x, math.ceil(len(pool) / cfg.cluster_size), seed=derive_seed(server.cfg.seed, "fdkt-kmeans"))
    timings["embed_cluster_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if mode == "score":
        keep_idx, fs = filter_scored(gen, server.llm.use(None), server.llm.tokenizer, pool, km.clusters(),
                                     keep=cfg.filter_keep, batch_size=cfg.gen_batch_size,
                                     min_margin=cfg.filter_min_margin)
    else:
        keep_idx, fs = filter_clusters(gen, pool, km.clusters(), batch=cfg.filter_batch, n_samples=cfg.samples_in_report)
    timings["filter_s"] = time.perf_counter() - t1
    return [pool[i] for i in keep_idx], {**fs.to_dict(), "mode": mode, "kmeans_iterations": km.iterations}


def synthetic_part(synthetic_set: str, kept: list[Example], augmented: list[Example]) -> list[Example]:
    """The synthetic examples ``synthetic_set`` trains on: the augmented ones, after the kept DP samples for
    "kept+augmented" and "private+synthetic"."""
    return (kept if synthetic_set in ("kept+augmented", "private+synthetic") else []) + augmented


def trains_on_private(synthetic_set: str) -> bool:
    """Whether ``synthetic_set`` adds the client's private data to the synthetic part ("private+…")."""
    return synthetic_set.startswith("private+")


def synthesize(server, fed, cfg: FDKTConfig | None = None, rnd: int = 1, cache: Path | None = None) -> Synthesis:
    """Steps 1–3 over the clients of ``fed`` (whose handlers include ``CLIENT_HANDLERS``).

    With ``cache`` (a JSON file), a saved synthesis is loaded instead of asking the clients again, and a
    new one is saved there (a resumed run spends no ε twice)."""
    cfg = cfg or server.cfg.section(FDKTConfig)
    if cache is not None and cache.is_file():
        progress.log(f"fdkt: re-using the synthetic set saved in {cache}")
        return Synthesis.from_dict(json.loads(cache.read_text()))
    tasks = list(server.cfg.data.tasks)
    bad = [t for t in tasks if t in GENERATION_TASKS]
    if bad:
        raise ValueError(f"FDKT synthesizes multiple-choice examples; data.tasks holds generation tasks {bad}: "
                         f"remove them for fdkt")
    mode = filter_mode(cfg, server.llm_is_remote)  # before any client spends ε
    answers = answers_mode(cfg.kept_answers, server.llm_is_remote)
    choices = task_choices(tasks, server.eval_sets)
    index = NgramIndex.build(server.eval_sets, cfg.decontaminate_ngram) if cfg.decontaminate_ngram else None
    k_show, timings = cfg.samples_in_report, {}
    # 1: DP synthesis on the clients, each at its own ε
    eps = per_client("fdkt", cfg.epsilon, cfg.client_epsilons, list(fed.clients))
    request = client_request(cfg, tasks, choices)
    replies = fed.call("synthesize", {c: Message(meta={**request, "epsilon": e}) for c, e in eps.items()}, rnd)
    timings["synthesize_s"] = fed.take_timing("synthesize")
    privacy = {c: {**r.meta["dp"], "randomness": r.meta.get("randomness", "")} for c, r in replies.items()}
    per_cl = {c: {k: r.meta[k] for k in ("generated", "parsed", "label_agree", "rejected")} for c, r in replies.items()}
    pool, recv = receive(replies)
    received = len(pool)
    pool, near_recv = near_duplicates(pool, cfg.dedup_jaccard)
    pool, cont_recv = contamination(pool, index, k_show)
    # 2: embed, cluster, LLM filter (with its quality bar); the LLM re-answers the kept samples
    gen = server.generator(cfg.gen_batch_size) if (mode != "none" or cfg.augment_per_kept > 0) and pool else None
    kept, fstats = select(server, cfg, gen, pool, mode, timings)
    filtered = len(kept)
    if answers != "keep" and kept:
        kept, arec = check_answers(server.llm.use(None), server.llm.tokenizer, with_format(kept, server.cfg.eval),
                                   answers, cfg.gen_batch_size)
    else:
        arec = check_answers(None, None, kept, "keep")[1] | {"mode": answers}
    # 3: augmentation by the LLM from few-shot prompts of kept samples
    t2 = time.perf_counter()
    augmented, astats = [], None
    if kept and cfg.augment_per_kept > 0:
        augmented, astats = augment(gen, kept, tasks, cfg.augment_per_kept, cfg.shots,
                                    seed=derive_seed(server.cfg.seed, "fdkt-augment"), max_new_tokens=cfg.augment_tokens,
                                    temperature=cfg.augment_temperature, n_samples=k_show,
                                    sampling=cfg.augment_sampling, question_tokens=cfg.question_tokens,
                                    choice_tokens=cfg.choice_tokens, choices=choices)
    timings["augment_s"] = time.perf_counter() - t2
    augmented_valid = len(augmented)
    augmented, near_aug = near_duplicates(augmented, cfg.dedup_jaccard, reference=kept)
    augmented, cont_aug = contamination(augmented, index, k_show)
    final = synthetic_part(cfg.synthetic_set, kept, augmented)
    stages = {"generated": sum(p["generated"] for p in per_cl.values()),
              "parsed": sum(p["parsed"] for p in per_cl.values()),
              "received_valid": received, "rejected_on_receipt": dict(recv.rejected),
              "near_duplicates": {"jaccard": cfg.dedup_jaccard, "received": near_recv, "augmented": near_aug},
              "contamination": {"ngram": cfg.decontaminate_ngram,
                                "eval_questions": {t: len(e) for t, e in server.eval_sets.items()} if index else {},
                                "received": cont_recv, "augmented": cont_aug,
                                "dropped": cont_recv["dropped"] + cont_aug["dropped"]},
              "filter": fstats, "filter_kept": filtered, "answers": arec, "kept": len(kept), "choices": choices,
              "augment": astats.to_dict() if astats else {"prompts": 0, "valid": 0},
              "augmented_valid": augmented_valid, "augmented": len(augmented), "synthetic_set": cfg.synthetic_set,
              "final": len(final), "per_client": per_cl}
    samples = {"generated": {c: r.meta["raw_samples"] for c, r in replies.items()},
               "parsed": [render_mc(e) for e in pool[:k_show]], "kept": [render_mc(e) for e in kept[:k_show]],
               "augmented": [render_mc(e) for e in augmented[:k_show]]}
    out = Synthesis(kept, augmented, {"privacy": privacy, "stages": stages, "samples": samples,
                            "timings": {k: round(v, 3) for k, v in timings.items()}})
    progress.log(f"fdkt: {stages['generated']} generated, {stages['parsed']} parsed, {near_recv} near-duplicates, "
                 f"{stages['contamination']['dropped']} contaminated, {len(kept)} kept ({arec['relabelled']} "
                 f"relabelled, {arec['dropped']} dropped by the answer check), {len(augmented)} augmented; "
                 f"synthetic set ({cfg.synthetic_set}) {len(final)}")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, out.to_dict())
    return out


def run(server) -> MethodResult:
    """FDKT, one shot: steps 1–3, then step 4 (the clients train on the synthetic set, with their private
    data for ``synthetic_set = "private+…"``, and evaluate)."""

    cfg = server.cfg.section(FDKTConfig)
    epochs = server.cfg.train.epochs * server.cfg.federation.rounds
    with server.federation(FDKT) as fed:
        syn = synthesize(server, fed, cfg, rnd=1, cache=server.out / "fdkt" / "synthetic.json")
        train_on = "private+synthetic" if trains_on_private(cfg.synthetic_set) else "synthetic"
        synthetic = synthetic_part(cfg.synthetic_set, syn.kept, syn.augmented)
        if train_on == "synthetic" and not synthetic:
            progress.log(f"fdkt: the synthetic set is empty and synthetic_set = {cfg.synthetic_set!r} trains on it "
                         f"alone: the clients evaluate their untrained SLM (zero-shot)")
        msg = Message(texts=[render_mc(e) for e in synthetic],
                      meta={"tasks": [e.task for e in synthetic], "epochs": epochs, "train_on": train_on})
        replies = fed.broadcast("train_and_evaluate", msg, round=1)
        train_s = fed.take_timing("train_and_evaluate")
    per_client_metrics = {cid: r.meta["metrics"] for cid, r in replies.items()}
    for cid, m in per_client_metrics.items():
        server.log_metrics(method="fdkt", client=cid, role="slm", metrics=m)
    timings = {**syn.record["timings"], "client_train_eval_s": round(train_s, 3)}
    stages = {**syn.record["stages"], "synthetic_set": cfg.synthetic_set, "final": len(synthetic)}  # this run's choice
    record = {**syn.record, "stages": stages, "trained_on": {c: r.meta["trained_on"] for c, r in replies.items()}}
    return MethodResult(metrics={"slm": mean_metrics(list(per_client_metrics.values()))}, per_client=per_client_metrics,
                        comm=fed.ledger.summary(), timings=timings, failures=list(fed.failures),
                        per_client_correct=server.client_correct(replies), extra={"fdkt": record})


FDKT = register(MethodSpec(
    name="fdkt", label="FDKT", rank=50, run=run, handlers=guard("fdkt", HANDLERS), config=FDKTConfig, needs_llm=True,
    report=report_section,
    summary="clients DP-train their SLM and send only synthetic samples; the LLM filters and augments them; "
            "clients train on the LLM's augmented data"))
