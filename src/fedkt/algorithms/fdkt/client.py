"""FDKT's client steps: 1 (DP-SGD on private data, sample from the DP model, parse) and 4 (train on
private + synthetic data, evaluate locally). Only DP outputs and metrics leave a client."""

from __future__ import annotations

import math
import time

from fedkt import generate as generation
from fedkt import progress
from fedkt.algorithms.baselines import train_and_evaluate_locally
from fedkt.algorithms.fdkt import template_fill
from fedkt.algorithms.fdkt.samples import generation_text, question_key, read_synthetic, sampling_plan, synth_prefix
from fedkt.clients import ClientContext
from fedkt.data.collate import make_sft_example
from fedkt.data.synthetic import LETTERS, MAX_CHOICES, MIN_CHOICES, ParseStats, parse_mc, render_mc
from fedkt.federation.base import Message
from fedkt.models import get_adapter_state
from fedkt.privacy.dp_sgd import DPConfig, dp_train_loop
from fedkt.seeds import derive_seed

STOP = ["\n\n", "\nQuestion", "<|im_end|>", "<|endoftext|>"]
PUBLIC_DP_FIELDS = ("epsilon_spent", "target_epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                    "planned_steps", "examples", "max_grad_norm", "accountant")
"""DPStats fields that may leave a client (``mean_loss`` etc. are computed from private data without noise)."""


def sample_generations(model, tok, prompts: list[str], meta: dict, seed: int, desc: str) -> list[str]:
    """Step 1b: sample continuations of the prefixes from the DP model: the template filled field by field
    (answer = the letter of the sampling plan, ``meta["letters"]``; one KV cache per prompt from field to
    field, :mod:`fedkt.algorithms.fdkt.template_fill`; each field's draws seeded by its tag), or free
    continuations."""
    if meta.get("sampling", "free") == "template":
        # each task's own number of choices (meta["n_choices"] per prompt; 4 if absent): one group per count
        ns = meta.get("n_choices") or [4] * len(prompts)
        groups: dict[int, list[int]] = {}
        for j, n in enumerate(ns):
            groups.setdefault(int(n), []).append(j)
        out = [""] * len(prompts)
        for n, idx in sorted(groups.items()):
            group_seed = seed if len(groups) == 1 else derive_seed(seed, "choices", n)
            filled = template_fill.fill_mc_template_cached(
                model, tok, [prompts[j] for j in idx], [meta["letters"][j] for j in idx], n_choices=n,
                question_tokens=meta["question_tokens"], choice_tokens=meta["choice_tokens"],
                batch_size=meta["gen_batch_size"], temperature=meta["temperature"], top_p=meta["top_p"],
                seed_for=lambda tag, g=group_seed: derive_seed(g, tag))
            for j, o in zip(idx, filled):
                out[j] = o
        return out
    return generation.generate(model, tok, prompts, max_new_tokens=meta["sample_tokens"], batch_size=meta["gen_batch_size"],
                    do_sample=True, temperature=meta["temperature"], top_p=meta["top_p"], seed=seed, stop=STOP,
                    desc=desc)


def parse_samples(plan: list[tuple[str, str]], raw: list[str]) -> tuple[list[str], list[str], ParseStats, int]:
    """Step 1c: the valid, unique samples (rendered), their tasks, the parse counts, and how many samples'
    answer is the letter the plan asked for."""
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
    return texts, tasks, pstats, agree


def client_synthesize(ctx: ClientContext, msg: Message) -> Message:
    """Step 1: DP-SGD on private data, sample from the DP model, parse. Only DP outputs leave."""
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
    choices = {t: int(n) for t, n in (m.get("choices") or {}).items()}
    if any(not MIN_CHOICES <= n <= MAX_CHOICES for n in choices.values()):
        raise ValueError(f"client {ctx.cid}: the request's choices per task {choices} must lie in "
                         f"{MIN_CHOICES}..{MAX_CHOICES} (what a valid synthetic example may have)")
    # 1a: DP-SGD on the private examples rendered as "write a question" tasks
    model, tok = ctx.slm.use(None), ctx.slm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = [make_sft_example(tok, *generation_text(ex), ctx.train.max_length) for ex in ctx.data]
    dp = DPConfig(target_epsilon=eps if math.isfinite(eps) else 1.0, delta=m["delta"],
                  max_grad_norm=m["max_grad_norm"], epochs=m["dp_epochs"], batch_size=m["dp_batch_size"],
                  lr=m["dp_lr"], max_length=ctx.train.max_length,
                  noise_multiplier=None if math.isfinite(eps) else 0.0)
    t0 = time.perf_counter()
    rng = ctx.secret_rng("fdkt-dp")  # an int in simulation; the client's own source otherwise
    stats = dp_train_loop(model, data, dp, seed=rng if isinstance(rng, int) else rng.int_seed("dropout"), pad_id=pad_id,
                          desc=f"{ctx.cid} DP-SGD", rng=None if isinstance(rng, int) else rng)
    ctx.state.tensors["dp_adapter"] = get_adapter_state(model)  # client-owned; never sent
    # 1b: sample from the DP model on the public plan's prefixes; 1c: parse
    t1 = time.perf_counter()
    plan = sampling_plan(list(m["tasks"]), int(m["samples"]), choices)
    raw = sample_generations(model, tok, [synth_prefix(t, l) for t, l in plan],
                             {**m, "letters": [l for _, l in plan], "n_choices": [choices.get(t, 4) for t, _ in plan]},
                             ctx.secret_seed_for("fdkt-sample"), desc=f"{ctx.cid} sample")
    t2 = time.perf_counter()
    texts, tasks, pstats, agree = parse_samples(plan, raw)
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


def client_train_and_evaluate(ctx: ClientContext, msg: Message) -> Message:
    """Step 4: fine-tune on the synthetic set the server sent (after the private data for ``train_on =
    "private+synthetic"``), evaluate locally; only metrics leave. Standalone's training and evaluation
    (same seed, same epochs): a paired comparison."""
    m = msg.meta
    synthetic = read_synthetic(msg.texts, m["tasks"])
    data = (list(ctx.data) if m["train_on"] == "private+synthetic" else []) + synthetic
    metrics, correct = train_and_evaluate_locally(ctx, data, m["epochs"], "fdkt")
    return Message(meta={"metrics": metrics, "trained_on": len(data), "synthetic": len(synthetic), **correct})


CLIENT_HANDLERS = {"synthesize": client_synthesize}
"""What another method's clients answer to let :func:`fedkt.algorithms.fdkt.synthesize` run (FedCoLLM
with ``aux_source = "fdkt"``)."""
HANDLERS = {**CLIENT_HANDLERS, "train_and_evaluate": client_train_and_evaluate}
