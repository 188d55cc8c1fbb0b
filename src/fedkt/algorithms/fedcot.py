"""FedCoT: privacy-preserving chain-of-thought distillation from the server LLM to the clients' SLMs
(Fan et al., EMNLP Findings 2025; first version "PDSS", arXiv 2406.12403), with the multi-task objective
of "Distilling step-by-step" (Hsieh et al. 2023).

Round 1 (the paper's protocol, for every client k in parallel):
  1. encode (client): render each private training example (question + choices) in the public frame
     and perturb every token of the client's own text with token-level text DP — the exponential
     mechanism over the server LLM's public token embeddings (``fedkt.privacy.text_dp``), ε per private
     token (``mechanism = "exponential"``) or the same ε per prompt (``"adaptive"``), seeded with the
     client's *secret* seed; the frame ("Question:", "Choices:", "(A)") passes as public and is not
     charged (``fedkt.privacy.text_dp_frame``). Only the perturbed prompts leave the client;
  2. generate (server): the LLM writes a rationale for each perturbed prompt with the paper's
     instruction and a worked example in its chat format (a local model, or an OpenAI-compatible server);
  3. decode (client): the SLM turns (instruction, worked example, perturbed prompt + LLM rationale,
     original question) into a rationale for the original question by in-context learning, ending at
     ``<end>``; a rationale cut at the token limit is dropped or kept without EOS (``truncated``);
  4. train (client): multi-task distillation on the SLM's LoRA, one input for both tasks,
         L = α·CE(rationale | "Explain:" + x) + (1−α)·CE(answer | x),  x = the task's prompt.
     The paper's mode (``share_adapters = false``, the default): the client keeps its SLM, evaluates it
     locally and sends only the metrics. ``share_adapters = true``: it uploads the adapter and the server
     averages (FedAvg, sample-weighted; a client's default policy requires secure aggregation).
Rounds r ≥ 2: clients re-train on their kept rationales, from their own adapter (paper's mode) or from
the averaged one (shared variant, a federated extension of the paper). No prompt is perturbed twice, so
a client's privacy cost is that of round 1 whatever the number of rounds.

Evaluation scores the task prompt only ("Predict"), exactly as every other method (on the clients in the
paper's mode, on the server's average in the shared variant). Adapters of the shared variant are trained
on private data as in FedAvg; text DP protects the prompts, not the adapters (docs/fedcot.md).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from fedkt import progress
from fedkt.algorithms.baselines import mean_metrics
from fedkt.clients import ClientContext
from fedkt.config import PATH, check
from fedkt.algorithms.fedcot_prompts import (END, STOP, decode_prompt, label_pair, question_segments,
                                             rationale_pair, render_question, teacher_prompt)
from fedkt.data.collate import IGNORE, SFTExample, collate_sft, make_sft_example
from fedkt.data.tasks import Example
from fedkt.evaluate import evaluate_tasks
from fedkt.fedavg_round import FedAvgRound
from fedkt.federation.base import Message
from fedkt.generate import eos_token_ids, generate_ex
from fedkt.losses import answer_ce
from fedkt.models import get_adapter_state, load_model, save_adapter
from fedkt.privacy.attacks_text import attack_sample
from fedkt.privacy.audit import text_dp_audit
from fedkt.privacy.epsilons import per_client
from fedkt.privacy.kit_check import client_kit, kit_sha256
from fedkt.privacy.policy import guard
from fedkt.privacy.text_dp import EmbeddingKit
from fedkt.privacy.text_dp_frame import MECHANISMS, perturb_framed, token_epsilons
from fedkt.registry import MethodSpec, register
from fedkt.text_generators import is_remote
from fedkt.train import train_loop


TRUNCATED = ("drop", "keep_unterminated")


@dataclass
class FedCoTConfig:
    """The ``[fedcot]`` section."""
    epsilon: float = 3.0
    """Text-DP ε per private token (``inf``: no perturbation). A prompt with n private tokens costs n·ε
    (basic composition); the public frame ("Question:", "Choices:", "(A)") is neither perturbed nor charged."""
    mechanism: str = "exponential"
    """``"exponential"``: every private token gets ε. ``"adaptive"`` (the Adaptive Exponential Mechanism):
    the same total budget spread so every prompt of the client costs ε·n̄ (n̄ = its mean private tokens per
    prompt; a prompt of n tokens gets ε·n̄/n per token). docs/text-dp.md."""
    client_epsilons: list[float] = field(default_factory=list)
    """Per-client ε (client i gets entry i); empty: every client uses ``epsilon``."""
    kit_neighbors: int = 64
    """N: neighbours per token in the embedding kit (see docs/text-dp.md)."""
    kit_model: str = field(default="", metadata=PATH)
    """Local model whose public tokenizer + input embeddings define the kit; empty = ``model.llm`` (needed
    when the LLM is an ``openai:`` server)."""
    alpha: float = 0.5
    """α: weight of the rationale loss; 1 − α weighs the label loss."""
    rationale_tokens: int = 256
    """Server LLM budget per rationale (tokens; the paper's/FATE-LLM's 256)."""
    decode_tokens: int = 256
    """Client SLM budget per decoded rationale (tokens; the paper's/FATE-LLM's 256)."""
    truncated: str = "keep_unterminated"
    """A decoded rationale that hit ``decode_tokens`` before its end marker: ``"drop"`` (the example trains the
    label task only) or ``"keep_unterminated"`` (trained without EOS, so the SLM never learns to stop
    mid-sentence). Finished rationales are trained with EOS. Default by measurement (docs/fedcot.md: 44.8 vs
    44.3 for "drop" at ε = ∞, within noise)."""
    share_adapters: bool = False
    """False (the paper's mode): each client keeps its SLM; adapters never leave, clients evaluate locally
    and send only metrics. True: the federated extension, FedAvg of the clients' adapters every round
    (a client's default policy lets them leave only under secure aggregation)."""
    empty_rationales: bool = False
    """Ablation: the server returns empty rationales (what the LLM contributes through the decoder)."""
    gen_batch_size: int = 32
    """Prompts per generation batch (the LLM's rationales, the clients' decoding; greedy, so the texts do not
    depend on it). 32 slots: continuous batching is >= 4x faster than one prompt at a time from 32 slots on a
    CPU (3.5x at 16; docs/generation.md)."""
    attack_prompts: int = 8
    """Public prompts the contextual attack (LM prior = the server LLM) runs on for the run's privacy
    section (docs/privacy-attacks.md); 0 turns it off. Needs a local ``model.llm``."""
    def __post_init__(self):
        check(self.epsilon > 0, f"epsilon must be > 0 (inf for no perturbation), got {self.epsilon}")
        for i, e in enumerate(self.client_epsilons):
            check(e > 0, f"client_epsilons[{i}] must be > 0, got {e}")
        check(0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}")
        check(self.mechanism in MECHANISMS, f"mechanism must be one of {list(MECHANISMS)}, got {self.mechanism!r}")
        check(self.truncated in TRUNCATED, f"truncated must be one of {list(TRUNCATED)}, got {self.truncated!r}")
        check(self.attack_prompts >= 0, f"attack_prompts must be >= 0 (0 = off), got {self.attack_prompts}")
        for name in ("kit_neighbors", "rationale_tokens", "decode_tokens", "gen_batch_size"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------- prompts
# (fedkt.algorithms.fedcot_prompts: the frame, the teacher's and the decoder's prompts, the two tasks' inputs)
AUDIT_EPSILONS = (1.0, 3.0, 6.0, 10.0, math.inf)
AUDIT_PROMPTS = 100


def explain_prompt(ex: Example) -> str:
    """The rationale task's input: ``Explain:`` + the label task's input (one input for both tasks)."""
    return rationale_pair(ex, "")[0]


# ---------------------------------------------------------------------------------------------- client
def client_encode(ctx: ClientContext, msg: Message) -> Message:
    """Step 1: perturb every private prompt with text DP; only the perturbed prompts leave.

    The kit comes from the client's policy (built from its own model, or a server-named file checked by
    hash and validated against its own tokenizer: ``fedkt.privacy.kit_check``), the randomness from its
    own source (``ctx.secret_rng``), and the reply holds only the DP texts and declared counts."""
    eps = float(msg.meta["epsilon"])
    mechanism = msg.meta.get("mechanism", "exponential")
    tok = ctx.slm.tokenizer
    framed = [question_segments(ex.question, ex.choices) for ex in ctx.data]
    # only the client's own text is charged: the frame ("Question:", "Choices:", "(A)") is public
    private = [s for f in framed for s, p in f if p]
    n_seg = [sum(1 for _, p in f if p) for f in framed]
    lens = [len(x) for x in tok(private, add_special_tokens=False)["input_ids"]] if private else []
    n_tokens, i = [], 0
    for k in n_seg:
        n_tokens.append(sum(lens[i:i + k]))
        i += k
    tok_eps = token_epsilons(n_tokens, eps, mechanism)
    prompt_eps = [n * e for n, e in zip(n_tokens, tok_eps)]
    if prompt_eps:  # the client's caps, before anything is perturbed
        ctx.policy.at_most("fedcot_max_prompt_epsilon", "fedcot.epsilon × tokens", max(prompt_eps))
        if mechanism == "adaptive":
            ctx.policy.at_most("fedcot_max_token_epsilon", "the adaptive mechanism's ε per token", max(tok_eps))
    kit = client_kit(ctx, msg.meta) if not math.isinf(eps) else None
    results = perturb_framed(framed, kit, tok, eps, ctx.secret_rng("textdp") if kit is not None else 0, mechanism)
    texts = [r.text for r in results]
    n_changed = sum(r.n_changed for r in results)
    ctx.state["perturbed"] = texts
    # client-local only (a side channel if sent: 0 would tell the server it got the original text)
    progress.log(f"{ctx.cid}: text DP ε = {eps:g} per token, {n_changed}/{sum(n_tokens)} tokens changed "
                 f"(local; not sent)")
    return Message(texts=texts, meta={
        "epsilon_per_token": eps, "tokens": sum(n_tokens),
        "prompt_epsilon_mean": statistics.fmean(prompt_eps) if prompt_eps else 0.0,
        "prompt_epsilon_max": max(prompt_eps, default=0.0), "randomness": ctx.randomness})


def decode_rationales(ctx: ClientContext, rationales: list[str], decode_tokens: int,
                      batch_size: int) -> tuple[list[str], list[bool]]:
    """Step 3: the SLM writes a rationale for each original question from the perturbed example (the
    paper's decode prompt). Returns the rationales and, for each, whether it finished (EOS or a stop
    string such as ``<end>``) rather than running into ``decode_tokens``."""
    perturbed = ctx.state["perturbed"]
    if len(rationales) != len(perturbed):
        raise ValueError(f"got {len(rationales)} rationales for {len(perturbed)} prompts")
    prompts = [decode_prompt(p, r, ex) for p, r, ex in zip(perturbed, rationales, ctx.data)]
    model, tok = ctx.slm.model, ctx.slm.tokenizer
    g = generate_ex(model, tok, prompts, max_new_tokens=decode_tokens, batch_size=batch_size, stop=STOP,
                    desc=f"{ctx.cid} decode rationales")
    return [t.strip() for t in g.texts], finished(g, tok, eos_token_ids(model, tok), STOP)


def finished(g, tok, eos: list[int], stop: list[str]) -> list[bool]:
    """Per generated row: did it end (EOS, or a stop string in its text) before the token limit?"""
    full = tok.batch_decode(g.token_ids, skip_special_tokens=True)
    return [bool(ids) and (ids[-1] in eos or any(s in text for s in stop)) for ids, text in zip(g.token_ids, full)]


def multitask_loss(model, batch: dict[str, dict[str, torch.Tensor]], alpha: float) -> torch.Tensor:
    """L = α·CE(rationale | explain prompt) + (1−α)·CE(answer | task prompt), each a token mean. A batch
    whose rationales were all dropped (``truncated = "drop"``) has no rationale term."""
    def ce(b):
        return answer_ce(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    parts = []
    if alpha > 0 and bool((batch["explain"]["labels"] != IGNORE).any()):
        parts.append(alpha * ce(batch["explain"]))
    if alpha < 1:
        parts.append((1 - alpha) * ce(batch["predict"]))
    return sum(parts)


def multitask_data(tok, examples: list[Example], rationales: list[str], max_length: int,
                   ended: list[bool] | None = None, truncated: str = "keep_unterminated") -> list[tuple]:
    """(rationale item, label item) per example, one input for both tasks (``fedcot_prompts``). A rationale
    that did not end (``ended[i]`` false) is trained without EOS (``keep_unterminated``) or not at all
    (``drop``: its rationale item supervises nothing, the label item stays)."""
    ended = [True] * len(examples) if ended is None else ended
    out = []
    for ex, r, fin in zip(examples, rationales, ended):
        e = make_sft_example(tok, *rationale_pair(ex, r), max_length, add_eos=fin)
        if not fin and truncated == "drop":
            e = SFTExample(e.input_ids, [IGNORE] * len(e.labels))
        out.append((e, make_sft_example(tok, *label_pair(ex), max_length)))
    return out


def collate_multitask(items: list[tuple], pad_id: int) -> dict[str, dict[str, torch.Tensor]]:
    return {"explain": collate_sft([e for e, _ in items], pad_id), "predict": collate_sft([p for _, p in items], pad_id)}


def client_decode_train(ctx: ClientContext, msg: Message) -> Message:
    """Steps 3–4: decode the LLM's rationales (round 1), then multi-task training: from the global adapter
    (``share_adapters``), or from the client's own (the paper's mode: it never leaves; the client evaluates
    it locally when asked and replies the metrics)."""
    rnd, m = msg.meta["round"], msg.meta
    share = bool(m.get("share_adapters", True))
    own = ctx.state.tensors.get("own_slm") if not share else None
    model = ctx.slm.use(msg.tensors or None) if share else ctx.slm.use(own or None)
    if "rationales" not in ctx.state:
        texts, ended = decode_rationales(ctx, msg.texts, m["decode_tokens"], m["gen_batch_size"])
        ctx.state["rationales"], ctx.state["rationale_ended"] = texts, ended
        progress.log(f"{ctx.cid}: {sum(ended)}/{len(ended)} decoded rationales ended before "
                     f"{m['decode_tokens']} tokens (local; not sent)")
    tok = ctx.slm.tokenizer
    data = multitask_data(tok, ctx.data, ctx.state["rationales"], ctx.train.max_length,
                          ctx.state.get("rationale_ended"), m.get("truncated", "keep_unterminated"))
    stats = train_loop(model, data, lambda mdl, b: multitask_loss(mdl, b, m["alpha"]), ctx.train,
                       seed=ctx.seed_for("fit", rnd), pad_id=tok.pad_token_id, epochs=m.get("epochs", ctx.train.epochs),
                       desc=f"round {rnd} {ctx.cid} train", collate=collate_multitask)
    progress.log(f"round {rnd} {ctx.cid}: train loss {stats.mean_loss:.4f} (local; not sent)")
    if share:
        return Message(tensors=get_adapter_state(model), meta={"num_examples": len(ctx.data), "steps": stats.steps})
    ctx.state.tensors["own_slm"] = get_adapter_state(model)  # client-owned; never sent
    meta = {"num_examples": len(ctx.data), "steps": stats.steps}
    if m.get("evaluate"):

        if ctx.workdir is not None:
            save_adapter(model, None, ctx.workdir / "slm")
        correct = {} if ctx.eval.per_question else None
        meta["metrics"] = evaluate_tasks(model, tok, ctx.eval_sets, ctx.eval.batch_size, ctx.eval.max_new_tokens,
                                         desc=f"fedcot {ctx.cid} r{rnd}", correct=correct,
                                         precision=ctx.eval.precision)
        if correct is not None:
            meta["correct"] = correct
    return Message(meta=meta)


HANDLERS = {"encode": client_encode, "decode_train": client_decode_train}


# ---------------------------------------------------------------------------------------------- server
def teacher_prompts(generator, perturbed: list[str]) -> list[str]:
    return [teacher_prompt(generator, p) for p in perturbed]


class FedCoT(FedAvgRound):
    phases = ("encode_s", "generate_s", "client_train_s", "aggregate_s")
    client_method = "decode_train"

    def setup(self, server, fed):
        self.cfg = server.cfg.section(FedCoTConfig)
        k = server.cfg.federation.clients_per_round
        if k and k < len(fed.clients):
            raise ValueError(f"fedcot does not support client sampling (federation.clients_per_round = {k} of "
                             f"{len(fed.clients)} clients): each client decodes the LLM's rationales in round 1 "
                             "and trains on them every round; set federation.clients_per_round = 0 for fedcot")
        self.kit_path = kit_for(server, self.cfg) if any(not math.isinf(e) for e in self.epsilons(fed).values()) else ""

        self.kit_sha256 = kit_sha256(self.kit_path) if self.kit_path else ""

    def audit(self, server, fed) -> list[dict]:
        """The text-DP audit on the server's own public prompts (aux set, framed as the clients' prompts): what
        a server-side embedding-inversion attacker recovers of the private segments (question and choice
        texts; the frame is sent verbatim) at the run's ε values and the standard ones."""
        if not self.kit_path or not server.aux:
            return []
        kit = EmbeddingKit.load(self.kit_path)
        tok = server.slm.tokenizer
        eps = sorted({*self.epsilons(fed).values(), *AUDIT_EPSILONS})
        return text_dp_audit([question_segments(e.question, e.choices) for e in server.aux[:AUDIT_PROMPTS]], kit, tok, eps,
                             seed=server.cfg.seed, top_k=min(10, kit.n_neighbors))

    def attack(self, server, fed) -> list[dict]:
        """The contextual attack (noisy channel + the server LLM as LM prior) on ``attack_prompts`` public
        prompts with planted canaries, at the run's finite ε values and 3, 6, 10 (docs/privacy-attacks.md)."""
        n = self.cfg.attack_prompts
        if not n or not self.kit_path or not server.aux or server.llm_is_remote:
            return []
        eps = sorted({e for e in self.epsilons(fed).values() if not math.isinf(e)} | {3.0, 6.0, 10.0})
        return attack_sample(server.llm.use(None), server.slm.tokenizer, EmbeddingKit.load(self.kit_path),
                             [render_question(e) for e in server.aux[:n]], eps, seed=server.cfg.seed)

    def epsilons(self, fed) -> dict[str, float]:
        return per_client("fedcot", self.cfg.epsilon, self.cfg.client_epsilons, list(fed.clients))

    def before_round(self, server, fed, state, rnd, out):
        """Round 1: steps 1-2 (clients encode, the LLM writes rationales); later rounds train on the rationales
        each client kept (in its state)."""
        self.texts: dict[str, list[str]] = {}
        if rnd != 1:
            return
        cfg, timings, entry = self.cfg, out.timings, out.entry
        t0 = time.perf_counter()
        eps = self.epsilons(fed)
        kit_meta = {"kit": self.kit_path, "kit_sha256": self.kit_sha256, "kit_neighbors": cfg.kit_neighbors,
                    "mechanism": cfg.mechanism}
        encoded = fed.call("encode", {c: Message(meta={"epsilon": e, **kit_meta}) for c, e in eps.items()}, rnd)
        timings["encode_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        self.texts = self.rationales(server, {c: r.texts for c, r in encoded.items()})
        timings["generate_s"] = time.perf_counter() - t1
        entry["privacy"] = {c: {k: r.meta[k] for k in ("epsilon_per_token", "tokens", "prompt_epsilon_mean",
                                                      "prompt_epsilon_max", "randomness")}
                            for c, r in encoded.items()}
        entry["generation"] = {"prompts": sum(len(t) for t in self.texts.values()),
                               "empty": sum(1 for t in self.texts.values() for x in t if not x.strip())}
        entry["audit"] = self.audit(server, fed)
        entry["attack"] = self.attack(server, fed)

    def aggregates(self, server):  # the paper's mode: the clients keep (and evaluate) their own SLMs
        return self.cfg.share_adapters

    def client_requests(self, server, state, rnd, clients):
        cfg = self.cfg
        meta = {"round": rnd, "epochs": server.cfg.train.epochs, "alpha": cfg.alpha,
                "decode_tokens": cfg.decode_tokens, "gen_batch_size": cfg.gen_batch_size, "truncated": cfg.truncated}
        if cfg.share_adapters:
            return {c: Message(tensors=state["slm"], texts=self.texts.get(c, []), meta=meta) for c in clients}
        self.evaluate = server.cfg.eval.every_round or rnd == server.cfg.federation.rounds
        return {c: Message(texts=self.texts.get(c, []), meta={**meta, "share_adapters": False, "evaluate": self.evaluate})
                for c in clients}

    def after_replies(self, server, fed, replies, rnd, out):
        if self.evaluate:

            per_client = {c: r.meta["metrics"] for c, r in replies.items()}
            for c, mt in per_client.items():
                server.log_metrics(method="fedcot", client=c, role="slm", round=rnd, metrics=mt)
            out.entry.update(slm=mean_metrics(list(per_client.values())), per_client=per_client)
            correct = server.client_correct(replies)
            if correct:
                out.entry["per_client_correct"] = correct

    def rationales(self, server, perturbed: dict[str, list[str]]) -> dict[str, list[str]]:
        """Step 2: the LLM's rationales for every client's perturbed prompts, in one batched pass."""
        if self.cfg.empty_rationales:
            return {c: [""] * len(p) for c, p in perturbed.items()}
        gen = server.generator(self.cfg.gen_batch_size)
        flat = [p for ps in perturbed.values() for p in ps]
        outs = gen.generate(teacher_prompts(gen, flat), max_new_tokens=self.cfg.rationale_tokens, stop=STOP)
        out, i = {}, 0
        for c, ps in perturbed.items():
            out[c] = [o.replace(END, "").strip() for o in outs[i:i + len(ps)]]
            i += len(ps)
        return out


def kit_for(server, cfg: FedCoTConfig) -> str:
    """Build (once, cached on disk) the text-DP kit of the LLM's public tokenizer + input embeddings; the
    clients load it by path (in a deployment each client holds a copy of this public file)."""
    spec = cfg.kit_model or server.cfg.model.llm
    if is_remote(spec):
        raise ValueError("model.llm is an openai: server, whose embeddings fedkt cannot read: set fedcot.kit_model "
                         "to a local model with the same tokenizer (e.g. the SLM) to build the text-DP kit")
    if spec == server.cfg.model.llm:
        model, tok = server.llm.model, server.llm.tokenizer
    else:

        model, tok = load_model(spec)
    kit = EmbeddingKit.for_model(tok, model.get_input_embeddings().weight.detach(), n_neighbors=cfg.kit_neighbors)
    # the public file the clients load (built once per model in the cache; copied into the run directory)
    return str(kit.save(server.out / "public" / "textdp_kit"))


register(MethodSpec(
    name="fedcot", label="FedCoT", rank=40, algorithm=FedCoT, handlers=guard("fedcot", HANDLERS), config=FedCoTConfig,
    needs_llm=True, supports_secure_aggregation=True,
    summary="clients send text-DP-perturbed prompts, the LLM writes rationales, clients decode them and "
            "distil step by step"))
