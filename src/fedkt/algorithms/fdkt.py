"""FDKT: federated domain knowledge transfer through differentially private synthetic data (Li et al.,
arXiv 2405.14212), for any causal LM fedkt loads, many clients, end to end.

The protocol (one shot; each client k with its own ε_k and seed):
  1. synthesize (client): DP-SGD fine-tuning of the SLM's LoRA adapter on the private examples, rendered
     as "write a question" tasks (``generation_text``: a topic + answer-letter prefix, then the example in
     the ``render_mc`` template), through Opacus (``fedkt.privacy.dp_sgd``; target ε_k, δ = min(δ, 1/n²)).
     The DP model then samples ``samples_per_client`` examples conditioned on the same kind of prefix (the
     topics and letters follow a public schedule, so even *which* prefixes are used reveals nothing), the
     samples are parsed and malformed ones dropped. Only the parsed samples, their counts and the public
     privacy figures (ε spent by the accountant for the steps taken, δ, σ, q, steps) leave the client;
     the DP adapter stays in the client's state.
  2. filter (server): embed the samples (mean-pooled LLM hidden states), k-means them, and let the LLM
     pick the eligible samples of each cluster (``fedkt.fdkt_server.filter_clusters``).
  3. augment (server): few-shot prompts from the kept samples; the LLM writes new examples; they are
     validated and de-duplicated (``fedkt.fdkt_server.augment``).
  4. train (client): each client fine-tunes its SLM's LoRA on private + synthetic data (or synthetic
     only, ``train_on``) and evaluates it locally, exactly like the standalone baseline (same seed, same
     epochs = ``train.epochs × federation.rounds``): FDKT vs Standalone is a paired comparison, and with
     an empty synthetic set the two are equal bit for bit (tested). Only metrics leave the client.

Privacy: everything after DP training is post-processing of the DP adapter (sampling, parsing, the
server's filter and augmentation, the final training's use of the synthetic set), so the synthetic set,
and anything derived from it alone, carries client k's (ε_k, δ_k). The final SLM is trained on private
data too and is never sent (only its test metrics, as in Standalone).

Rounds: FDKT is one-shot, as in the paper (no adapter is ever averaged: averaging adapters trained
on private data without DP would void the privacy argument). ``federation.rounds`` only scales the
local training epochs, as for Standalone. A resumed run re-uses the synthetic set saved after step 3
(``fdkt/synthetic.json`` in the run directory), and a client asked again returns its stored samples:
no ε is spent twice.

For FedCoLLM without public data, :func:`synthetic_aux` runs steps 1–3 and returns the synthetic set
as the server's auxiliary data (``CLIENT_HANDLERS`` must be among that method's client handlers).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedkt import progress
from fedkt.clients import ClientContext
from fedkt.config import PATH, check, check_positive
from fedkt.data.collate import make_sft_example
from fedkt.data.synthetic import LETTERS, ParseStats, fill_mc_template, parse_mc, render_mc
from fedkt.data.tasks import GENERATION_TASKS, Example
from fedkt.federation.base import Message
from fedkt.fdkt_server import augment, filter_clusters, filter_scored, question_key, topic
from fedkt.models import get_adapter_state, save_adapter
from fedkt.privacy.policy import guard
from fedkt.registry import MethodSpec, register
from fedkt.run_results import MethodResult
from fedkt.seeds import derive_seed


@dataclass
class FDKTConfig:
    """The ``[fdkt]`` section."""

    epsilon: float = 3.0
    """Target ε of each client's DP-SGD (``inf``: no noise, clipping only: the non-private ablation)."""
    client_epsilons: list[float] = field(default_factory=list)
    """Per-client ε (client i gets entry i); empty: every client uses ``epsilon``."""
    delta: float = 1e-5
    """δ of the guarantee; each client's effective δ is min(delta, 1/n²) for its n examples."""
    max_grad_norm: float = 1.0
    """DP-SGD per-example clipping bound C."""
    dp_epochs: float = 3.0
    dp_batch_size: int = 16
    """Expected (Poisson) batch size of DP-SGD."""
    dp_lr: float = 1e-3
    samples_per_client: int = 64
    """Synthetic samples each client draws from its DP model."""
    sampling: Literal["template", "free"] = "template"
    """How the DP model writes a sample: ``"template"`` fills the template field by field (question line,
    then each choice after its label, the answer letter from the sampling plan:
    ``fedkt.data.synthetic.fill_mc_template``); ``"free"``: one free continuation of the prefix, parsed."""
    question_tokens: int = 64
    """Template sampling: at most this many tokens for the question line."""
    choice_tokens: int = 24
    """Template sampling: at most this many tokens per choice."""
    sample_tokens: int = 128
    """Free sampling: at most this many tokens per sample."""
    temperature: float = 1.0
    top_p: float = 0.95
    filter: Literal["auto", "score", "llm", "none"] = "auto"
    """How the LLM picks the eligible samples of each cluster: ``"score"``: each sample's log p(Yes) −
    log p(No) to an eligibility question, the best ``filter_keep`` fraction per cluster (needs a local
    LLM); ``"llm"``: the LLM lists the eligible samples' numbers, parsed (malformed = keep nothing);
    ``"auto"``: "score" with a local LLM, "llm" with an ``openai:`` server; ``"none"``: keep every parsed
    sample (ablation of step 2)."""
    filter_keep: float = 0.5
    """Scored filter: fraction of each cluster kept (rounded up)."""
    cluster_size: int = 8
    """k-means uses k = ceil(samples / cluster_size) clusters."""
    filter_batch: int = 8
    """At most this many samples per filter prompt (larger clusters are split)."""
    embed_model: str = field(default="", metadata=PATH)
    """Local model whose mean-pooled hidden states embed the samples; empty: ``model.llm`` (the server's
    SLM copy when the LLM is an ``openai:`` server)."""
    augment_per_kept: float = 2.0
    """Augmentation prompts per kept sample (0: no augmentation)."""
    shots: int = 3
    augment_tokens: int = 160
    """Free augmentation: at most this many tokens per new example."""
    augment_temperature: float = 0.7
    augment_sampling: Literal["template", "free"] = "template"
    """How the LLM writes a new example: field by field in the template (question, choices, then the
    answer letter it picks), or one free continuation, parsed."""
    synthetic_set: Literal["kept+augmented", "augmented"] = "kept+augmented"
    """What the clients train on: the filtered DP samples plus the LLM's new ones, or the new ones only."""
    train_on: Literal["private+synthetic", "synthetic"] = "private+synthetic"
    gen_batch_size: int = 16
    samples_in_report: int = 3

    def __post_init__(self):
        check(self.epsilon > 0, f"epsilon must be > 0 (inf for no noise), got {self.epsilon}")
        for i, e in enumerate(self.client_epsilons):
            check(e > 0, f"client_epsilons[{i}] must be > 0, got {e}")
        check(0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
        check_positive(self, "max_grad_norm", "dp_epochs", "dp_batch_size", "dp_lr", "samples_per_client",
                       "sample_tokens", "question_tokens", "choice_tokens", "temperature", "cluster_size", "filter_batch", "shots", "augment_tokens",
                       "gen_batch_size")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.augment_per_kept >= 0, f"augment_per_kept must be >= 0, got {self.augment_per_kept}")
        check(self.augment_temperature >= 0, f"augment_temperature must be >= 0, got {self.augment_temperature}")
        check(0 < self.filter_keep <= 1, f"filter_keep must be in (0, 1], got {self.filter_keep}")
        check(self.samples_in_report >= 0, f"samples_in_report must be >= 0, got {self.samples_in_report}")


# ---------------------------------------------------------------------------------------------- prompts
def synth_prefix(task: str, letter: str) -> str:
    """What a synthetic example is conditioned on: its topic and its answer letter (public, not data)."""
    return f"Write a multiple-choice question for a {topic(task)} test. The correct answer is {letter}.\nQuestion:"


def generation_text(ex: Example) -> tuple[str, str]:
    """(prompt, target) of the DP training example: the prefix, then ``ex`` in the template."""
    return synth_prefix(ex.task, LETTERS[ex.answer]), render_mc(ex)[len("Question:"):]


def sampling_plan(tasks: list[str], n: int) -> list[tuple[str, str]]:
    """(task, letter) of each of ``n`` samples: tasks in turn, letters A-D in turn (balanced answers)."""
    return [(tasks[i % len(tasks)], "ABCD"[(i // len(tasks)) % 4]) for i in range(n)]


STOP = ["\n\n", "\nQuestion", "<|im_end|>", "<|endoftext|>"]
PUBLIC_DP_FIELDS = ("epsilon_spent", "target_epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                    "planned_steps", "examples", "max_grad_norm", "accountant")
"""DPStats fields that may leave a client (``mean_loss`` etc. are computed from private data without noise)."""


# ---------------------------------------------------------------------------------------------- client
def sample_generations(model, tok, prompts: list[str], meta: dict, seed: int, desc: str) -> list[str]:
    """Step 1b: sample continuations of the prefixes from the DP model: the template filled field by field
    (answer = the letter of the sampling plan, ``meta["letters"]``), or free continuations."""
    from fedkt.generate import generate

    def complete(ps: list[str], max_new_tokens: int, stop: list[str], tag: str) -> list[str]:
        return generate(model, tok, ps, max_new_tokens=max_new_tokens, batch_size=meta["gen_batch_size"],
                        do_sample=True, temperature=meta["temperature"], top_p=meta["top_p"],
                        seed=derive_seed(seed, tag), stop=stop, desc=f"{desc} {tag}")

    if meta.get("sampling", "free") == "template":
        return fill_mc_template(complete, prompts, meta["letters"], question_tokens=meta["question_tokens"],
                                choice_tokens=meta["choice_tokens"])
    return generate(model, tok, prompts, max_new_tokens=meta["sample_tokens"], batch_size=meta["gen_batch_size"],
                    do_sample=True, temperature=meta["temperature"], top_p=meta["top_p"], seed=seed, stop=STOP,
                    desc=desc)


def client_synthesize(ctx: ClientContext, msg: Message) -> Message:
    """Step 1: DP-SGD on private data, sample from the DP model, parse. Only DP outputs leave."""
    from fedkt.privacy.dp_sgd import DPConfig, dp_train_loop

    if "fdkt_reply" in ctx.state:  # asked again (a resumed run): the same samples, no new privacy cost
        saved = ctx.state["fdkt_reply"]
        return Message(texts=list(saved["texts"]), meta=dict(saved["meta"]))
    m = msg.meta
    eps = float(m["epsilon"])
    if not ctx.data:
        raise ValueError(f"client {ctx.cid} has no training examples to synthesize from")
    if not all(e.is_mc for e in ctx.data):
        raise ValueError(f"client {ctx.cid}: FDKT synthesizes multiple-choice examples; its data holds "
                         f"generation examples (e.g. gsm8k), which it cannot render")
    model, tok = ctx.slm.use(None), ctx.slm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = [make_sft_example(tok, *generation_text(ex), ctx.train.max_length) for ex in ctx.data]
    dp = DPConfig(target_epsilon=eps if math.isfinite(eps) else 1.0, delta=m["delta"],
                  max_grad_norm=m["max_grad_norm"], epochs=m["dp_epochs"], batch_size=m["dp_batch_size"],
                  lr=m["dp_lr"], max_length=ctx.train.max_length,
                  noise_multiplier=None if math.isfinite(eps) else 0.0)
    t0 = time.perf_counter()
    rng = ctx.secret_rng("fdkt-dp")  # an int in simulation (as before); the client's own source otherwise
    stats = dp_train_loop(model, data, dp, seed=rng if isinstance(rng, int) else rng.int_seed("dropout"), pad_id=pad_id,
                          desc=f"{ctx.cid} DP-SGD", rng=None if isinstance(rng, int) else rng)
    ctx.state.tensors["dp_adapter"] = get_adapter_state(model)  # client-owned; never sent
    t1 = time.perf_counter()
    plan = sampling_plan(list(m["tasks"]), int(m["samples"]))
    raw = sample_generations(model, tok, [synth_prefix(t, l) for t, l in plan], {**m, "letters": [l for _, l in plan]},
                             ctx.secret_seed_for("fdkt-sample"), desc=f"{ctx.cid} sample")
    t2 = time.perf_counter()
    pstats = ParseStats()
    texts, tasks, seen, agree = [], [], set(), 0
    for (task, letter), out in zip(plan, raw):
        ex = parse_mc("Question:" + out, task=task, stats=pstats)
        if ex is None:
            continue
        if question_key(ex) in seen:
            pstats.accepted -= 1
            pstats.add("duplicate")
            continue
        seen.add(question_key(ex))
        agree += LETTERS[ex.answer] == letter
        texts.append(render_mc(ex))
        tasks.append(task)
    dp_public = {k: getattr(stats, k) for k in PUBLIC_DP_FIELDS} | {"target_epsilon": eps}
    k = int(m.get("samples_in_report", 3))
    meta = {"tasks": tasks, "generated": len(raw), "parsed": pstats.accepted, "rejected": dict(pstats.rejected),
            "label_agree": agree, "dp": dp_public, "raw_samples": [r[:400] for r in raw[:k]],
            "randomness": ctx.randomness}
    ctx.state["fdkt_reply"] = {"texts": texts, "meta": meta}
    # timings and the DP training loss stay on the client (a side channel on private data if sent)
    ctx.state["fdkt_local"] = {"dp_train_s": t1 - t0, "sample_s": t2 - t1, "dp_mean_loss": stats.mean_loss}
    progress.log(f"{ctx.cid}: DP-SGD ε = {stats.epsilon_spent:.3g} over {stats.steps} steps; "
                 f"{pstats.accepted}/{len(raw)} samples parsed; DP-SGD {t1 - t0:.1f} s, sampling {t2 - t1:.1f} s "
                 f"(local; not sent)")
    return Message(texts=texts, meta=meta)


def read_synthetic(texts: list[str], tasks: list[str], stats: ParseStats | None = None, prefix: str = "syn-"
                   ) -> list[Example]:
    """Synthetic examples back from their rendered texts (invalid ones dropped, counted in ``stats``)."""
    if len(texts) != len(tasks):
        raise ValueError(f"{len(texts)} synthetic texts but {len(tasks)} task tags")
    out = []
    for i, (t, task) in enumerate(zip(texts, tasks)):
        ex = parse_mc(t, task=str(task), id=f"{prefix}{i}", stats=stats)
        if ex is not None:
            out.append(ex)
    return out


def client_train_and_evaluate(ctx: ClientContext, msg: Message) -> Message:
    """Step 4: fine-tune on private + synthetic (or synthetic only) data, evaluate locally; only metrics leave."""
    from fedkt.evaluate import evaluate_tasks
    from fedkt.train import sft

    m = msg.meta
    synthetic = read_synthetic(msg.texts, m["tasks"])
    data = (list(ctx.data) if m["train_on"] == "private+synthetic" else []) + synthetic
    model, tok = ctx.slm.use(None), ctx.slm.tokenizer
    if data:  # same seed as the standalone baseline: a paired comparison
        loss = sft(model, tok, data, ctx.train, seed=ctx.seed_for("standalone"), epochs=m["epochs"],
                   desc=f"fdkt {ctx.cid} train").mean_loss
        progress.log(f"fdkt {ctx.cid}: train loss {loss:.4f} (local; not sent)")
    if ctx.workdir is not None:
        save_adapter(model, None, ctx.workdir / "slm")
    metrics = evaluate_tasks(model, tok, ctx.eval_sets, ctx.eval.batch_size, ctx.eval.max_new_tokens,
                             desc=f"fdkt {ctx.cid}")
    return Message(meta={"metrics": metrics, "trained_on": len(data), "synthetic": len(synthetic)})


CLIENT_HANDLERS = {"synthesize": client_synthesize}
"""What another method's clients must answer to let :func:`synthetic_aux` run (FedCoLLM without public data)."""
HANDLERS = {**CLIENT_HANDLERS, "train_and_evaluate": client_train_and_evaluate}


# ---------------------------------------------------------------------------------------------- server
@dataclass
class Synthesis:
    """Steps 1–3's product: the synthetic set and the record of how it was made."""

    examples: list[Example]
    record: dict
    """{"privacy": {client: ε, δ, σ, ...}, "stages": counts, "samples": a few per stage, "timings": s}."""

    def to_dict(self) -> dict:
        return {"examples": [{"task": e.task, "id": e.id, "text": render_mc(e)} for e in self.examples],
                "record": self.record}

    @classmethod
    def from_dict(cls, d: dict) -> "Synthesis":
        exs = [parse_mc(r["text"], task=r["task"], id=r["id"]) for r in d["examples"]]
        if any(e is None for e in exs):
            raise ValueError("the saved synthetic set holds an invalid example; delete the file to synthesize again")
        return cls(exs, d["record"])


def client_epsilons(cfg: FDKTConfig, clients: list[str]) -> dict[str, float]:
    eps = cfg.client_epsilons
    if eps and len(eps) != len(clients):
        raise ValueError(f"fdkt.client_epsilons lists {len(eps)} values for {len(clients)} clients")
    return {c: (eps[i] if eps else cfg.epsilon) for i, c in enumerate(clients)}


def llm_generator(server, cfg: FDKTConfig):
    """The server LLM as a text generator: an ``openai:`` server, or the local LLM (its initial adapter)."""
    from fedkt.text_generators import HFGenerator, make_generator

    spec = server.cfg.model.llm
    if spec.startswith("openai:"):
        return make_generator(spec, batch_size=cfg.gen_batch_size)
    return HFGenerator(server.llm.use(None), server.llm.tokenizer, batch_size=cfg.gen_batch_size, name=spec,
                       desc="server LLM (fdkt)")


def filter_mode(cfg: FDKTConfig, llm_spec: str) -> str:
    """``cfg.filter`` with "auto" resolved for the server's LLM; "score" needs a local LLM's likelihoods."""
    remote = llm_spec.startswith("openai:")
    if cfg.filter == "auto":
        return "llm" if remote else "score"
    if cfg.filter == "score" and remote:
        raise ValueError("fdkt.filter = 'score' reads the LLM's likelihoods and needs a local LLM; with an openai: "
                         "server use filter = 'llm' (or 'auto')")
    return cfg.filter


def embedder(server, cfg: FDKTConfig):
    """(model, tokenizer) whose hidden states embed the samples (see ``FDKTConfig.embed_model``)."""
    spec = cfg.embed_model or server.cfg.model.llm
    if not spec or spec.startswith("openai:"):
        return server.slm.use(None), server.slm.tokenizer
    if spec == server.cfg.model.llm:
        return server.llm.use(None), server.llm.tokenizer
    from fedkt.models import load_model

    return load_model(spec)


def synthesize(server, fed, cfg: FDKTConfig | None = None, rnd: int = 1, cache: Path | None = None) -> Synthesis:
    """Steps 1–3 over the clients of ``fed`` (whose handlers include ``CLIENT_HANDLERS``).

    With ``cache`` (a JSON file), a saved synthesis is loaded instead of asking the clients again, and a
    new one is saved there."""
    from fedkt.clustering import kmeans, mean_pooled_embeddings

    cfg = cfg or server.cfg.section(FDKTConfig)
    if cache is not None and cache.is_file():
        progress.log(f"fdkt: re-using the synthetic set saved in {cache}")
        return Synthesis.from_dict(json.loads(cache.read_text()))
    tasks = list(server.cfg.data.tasks)
    bad = [t for t in tasks if t in GENERATION_TASKS]
    if bad:
        raise ValueError(f"FDKT synthesizes multiple-choice examples; data.tasks holds generation tasks {bad}: "
                         f"remove them for fdkt")
    mode = filter_mode(cfg, server.cfg.model.llm)  # before any client spends ε
    k_show = cfg.samples_in_report
    timings: dict[str, float] = {}
    # 1: DP synthesis on the clients (timed by the federation)
    eps = client_epsilons(cfg, list(fed.clients))
    meta = {"delta": cfg.delta, "max_grad_norm": cfg.max_grad_norm, "dp_epochs": cfg.dp_epochs,
            "dp_batch_size": cfg.dp_batch_size, "dp_lr": cfg.dp_lr, "samples": cfg.samples_per_client,
            "sampling": cfg.sampling, "question_tokens": cfg.question_tokens, "choice_tokens": cfg.choice_tokens,
            "sample_tokens": cfg.sample_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "gen_batch_size": cfg.gen_batch_size, "tasks": tasks, "samples_in_report": k_show}
    replies = fed.call("synthesize", {c: Message(meta={**meta, "epsilon": e}) for c, e in eps.items()}, rnd)
    timings["synthesize_s"] = fed.take_timing("synthesize")
    privacy = {c: {**r.meta["dp"], "randomness": r.meta.get("randomness", "")} for c, r in replies.items()}
    per_client = {c: {"generated": r.meta["generated"], "parsed": r.meta["parsed"], "label_agree": r.meta["label_agree"],
                      "rejected": r.meta["rejected"]} for c, r in replies.items()}
    # the server re-reads what it received (it trusts no client) and drops duplicates across clients
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
    # 2: embed, cluster, LLM filter
    t1 = time.perf_counter()
    gen = llm_generator(server, cfg) if (mode != "none" or cfg.augment_per_kept > 0) and pool else None
    fstats: dict = {"candidates": len(pool), "mode": mode}
    if pool and mode != "none":
        model, tok = embedder(server, cfg)
        x = mean_pooled_embeddings(model, tok, [render_mc(e) for e in pool], batch_size=cfg.gen_batch_size,
                                   max_length=server.cfg.train.max_length)
        km = kmeans(x, math.ceil(len(pool) / cfg.cluster_size), seed=derive_seed(server.cfg.seed, "fdkt-kmeans"))
        timings["embed_cluster_s"] = time.perf_counter() - t1
        t1b = time.perf_counter()
        if mode == "score":
            keep_idx, fs = filter_scored(gen, server.llm.use(None), server.llm.tokenizer, pool, km.clusters(),
                                         keep=cfg.filter_keep, batch_size=cfg.gen_batch_size)
        else:
            keep_idx, fs = filter_clusters(gen, pool, km.clusters(), batch=cfg.filter_batch, n_samples=k_show)
        fstats = {**fs.to_dict(), "mode": mode, "kmeans_iterations": km.iterations}
        kept = [pool[i] for i in keep_idx]
        timings["filter_s"] = time.perf_counter() - t1b
    else:
        kept = list(pool)
        fstats.update(kept=len(kept), skipped="filter = none" if cfg.filter == "none" else "no samples")
    # 3: augmentation
    t2 = time.perf_counter()
    augmented, astats = [], None
    if kept and cfg.augment_per_kept > 0:
        augmented, astats = augment(gen, kept, tasks, cfg.augment_per_kept, cfg.shots,
                                    seed=derive_seed(server.cfg.seed, "fdkt-augment"), max_new_tokens=cfg.augment_tokens,
                                    temperature=cfg.augment_temperature, n_samples=k_show,
                                    sampling=cfg.augment_sampling, question_tokens=cfg.question_tokens,
                                    choice_tokens=cfg.choice_tokens)
    timings["augment_s"] = time.perf_counter() - t2
    final = (kept if cfg.synthetic_set == "kept+augmented" else []) + augmented
    stages = {"generated": sum(p["generated"] for p in per_client.values()),
              "parsed": sum(p["parsed"] for p in per_client.values()),
              "received_valid": len(pool), "rejected_on_receipt": dict(recv.rejected),
              "filter": fstats, "kept": len(kept),
              "augment": astats.to_dict() if astats else {"prompts": 0, "valid": 0},
              "augmented_valid": len(augmented), "final": len(final), "per_client": per_client}
    samples = {"generated": {c: r.meta["raw_samples"] for c, r in replies.items()},
               "parsed": [render_mc(e) for e in pool[:k_show]], "kept": [render_mc(e) for e in kept[:k_show]],
               "augmented": [render_mc(e) for e in augmented[:k_show]]}
    out = Synthesis(final, {"privacy": privacy, "stages": stages, "samples": samples,
                            "timings": {k: round(v, 3) for k, v in timings.items()}})
    progress.log(f"fdkt: {stages['generated']} generated, {stages['parsed']} parsed, {len(kept)} kept, "
                 f"{len(augmented)} augmented; synthetic set {len(final)}")
    if cache is not None:
        from fedkt.rounds import write_json_atomic

        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, out.to_dict())
    return out


def synthetic_aux(server, fed, cfg: FDKTConfig | None = None, cache: Path | None = None) -> list[Example]:
    """FedCoLLM without public data: steps 1–3 of FDKT, the synthetic set as the auxiliary set. ``fed``'s
    clients must answer ``CLIENT_HANDLERS``; ``cfg`` defaults to the run's ``[fdkt]`` section. Pass a
    ``cache`` file so that a resumed run re-uses the set (no ε spent twice)."""
    return synthesize(server, fed, cfg, cache=cache).examples


def run(server) -> MethodResult:
    from fedkt.algorithms.baselines import mean_metrics

    cfg = server.cfg.section(FDKTConfig)
    epochs = server.cfg.train.epochs * server.cfg.federation.rounds
    with server.federation(FDKT) as fed:
        syn = synthesize(server, fed, cfg, rnd=1, cache=server.out / "fdkt" / "synthetic.json")
        msg = Message(texts=[render_mc(e) for e in syn.examples],
                      meta={"tasks": [e.task for e in syn.examples], "epochs": epochs, "train_on": cfg.train_on})
        replies = fed.broadcast("train_and_evaluate", msg, round=1)
        train_s = fed.take_timing("train_and_evaluate")
    per_client = {cid: r.meta["metrics"] for cid, r in replies.items()}
    for cid, m in per_client.items():
        server.log_metrics(method="fdkt", client=cid, role="slm", metrics=m)
    timings = {**syn.record["timings"], "client_train_eval_s": round(train_s, 3)}
    record = {**syn.record, "trained_on": {c: r.meta["trained_on"] for c, r in replies.items()}}
    return MethodResult(metrics={"slm": mean_metrics(list(per_client.values()))}, per_client=per_client,
                        comm=fed.ledger.summary(), timings=timings, failures=list(fed.failures),
                        extra={"fdkt": record})


# ---------------------------------------------------------------------------------------------- report
def _eps(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.3g}"


def report_section(result: dict) -> str:
    """The report's FDKT section: ε per client, counts through every stage, a few samples, time per stage."""
    rec = result.get("fdkt")
    if not rec:
        return ""
    st = rec["stages"]
    lines = ["## FDKT: privacy and synthetic data", "",
             "| Client | ε target | ε spent | δ | σ | DP steps | generated | parsed | answer = asked letter |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c, p in rec["privacy"].items():
        pc = st["per_client"].get(c, {})
        lines.append(f"| {c} | {_eps(p['target_epsilon'])} | "
                     f"{_eps(p['epsilon_spent'])} | {p['delta']:.3g} | {p['noise_multiplier']:.3g} | {p['steps']} | "
                     f"{pc.get('generated', '–')} | {pc.get('parsed', '–')} | {pc.get('label_agree', '–')} |")
    f, a = st["filter"], st["augment"]
    lines += ["", "ε is the accountant's for the DP-SGD steps taken (sample-level (ε, δ)-DP of the adapter); the "
              "synthetic set is post-processing and carries the same guarantee."]
    modes = sorted({p.get("randomness") for p in rec["privacy"].values()} - {None, ""})
    if modes:
        from fedkt.privacy.randomness import describe

        lines += ["", "Randomness of the DP noise: " + " ".join(f"{m}: {describe(m)}." for m in modes)]
    lines += ["",
              "| Stage | count |", "|---|---|",
              f"| generated by the clients' DP models | {st['generated']} |",
              f"| parsed (valid MC, unique per client) | {st['parsed']} |",
              f"| received valid, unique across clients | {st['received_valid']} |",
              f"| filter prompts (clusters) | {f.get('prompts', 0)} ({f.get('clusters', 0)}) |",
              f"| filter | {f.get('mode', 'llm')} |",
              f"| malformed filter answers (nothing kept) | {f.get('malformed', 0)} |",
              f"| kept by the filter | {st['kept']} |",
              f"| augmentation prompts | {a.get('prompts', 0)} |",
              f"| augmented valid | {st['augmented_valid']} |",
              f"| synthetic set sent to the clients | {st['final']} |"]
    if f.get("margins"):
        mg = f["margins"]
        lines += ["", f"Scored filter: log p(Yes) − log p(No) mean {mg['mean']:.3f} (min {mg['min']:.3f}, max "
                      f"{mg['max']:.3f}), {mg['positive']} of {f.get('candidates', 0)} positive; kept samples' mean "
                      f"{mg['kept_mean']:.3f}."]
    if a.get("rejected"):
        lines += ["", "Augmented outputs rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(a["rejected"].items()))
                  + "."]
    t = rec.get("timings", {})
    if t:
        lines += ["", "Time per stage: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t.items()) + "."]
    ct = rec.get("client_timings", {})
    if ct:
        lines += ["Per client (DP-SGD, sampling): " + "; ".join(
            f"{c} {v.get('dp_train_s', 0):.1f} s, {v.get('sample_s', 0):.1f} s" for c, v in ct.items()) + "."]
    smp = rec.get("samples", {})
    for stage in ("parsed", "kept", "augmented"):
        if smp.get(stage):
            lines += ["", f"Samples, {stage}:", "", "```", "\n\n".join(smp[stage]), "```"]
    gen = [s for v in smp.get("generated", {}).values() for s in v][:3]
    if gen:
        lines += ["", "Samples, raw DP generations (after the prefix `Question:`):", "", "```",
                  "\n---\n".join(g.strip() for g in gen), "```"]
    return "\n".join(lines)


FDKT = register(MethodSpec(
    name="fdkt", label="FDKT", rank=50, run=run, handlers=guard("fdkt", HANDLERS), config=FDKTConfig, needs_llm=True,
    report=report_section,
    summary="clients DP-train their SLM and send only synthetic samples; the LLM filters and augments them; "
            "clients train on private + synthetic data"))
