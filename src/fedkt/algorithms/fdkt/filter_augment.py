"""FDKT steps 2 and 3 (server): the LLM filters the clients' DP synthetic samples per cluster and writes new
ones from few-shot prompts of the kept ones.

Both steps talk to the server LLM through a :class:`~fedkt.text_generators.TextGenerator` (a local model with
batched KV-cache generation, or an OpenAI-compatible server), and both treat what the LLM writes as
untrusted input:

* **Filter** (:func:`filter_clusters`). Each cluster of similar samples (k-means on embeddings, see
  :mod:`fedkt.clustering`) is shown to the LLM as a numbered list, at most ``batch`` samples per prompt
  (larger clusters are split in order). The LLM answers with the numbers of the eligible samples; the
  answer is read by :func:`fedkt.data.synthetic.read_indices`. An answer that cannot be read with
  certainty keeps *nothing* from that prompt and is counted as malformed; "None" keeps nothing and is
  counted as such. Greedy decoding: the judgement is deterministic.
* **Scored filter** (:func:`filter_scored`). The same judgement read from the LLM's likelihoods instead
  of its text: each sample is one yes/no question, scored by log p(Yes) − log p(No), and each cluster
  keeps its best ⌈keep × size⌉ samples. Nothing to parse, so a small LLM that cannot write a list of
  numbers (SmolLM2-135M: every list answer malformed) still ranks the samples. Local LLMs only.
* **Augment** (:func:`augment`). For each task, ``ceil(per_kept × kept)`` prompts, each showing
  ``shots`` kept samples of that task drawn with a seeded RNG, ask the LLM for one new question in the
  same format (the prompt ends with ``Question:``, so the answer starts in the template). Each output is
  validated by :func:`validate_generated`: it must parse as exactly one valid multiple-choice example
  (``parse_mc``: answer among the choices, 3–5 distinct non-empty choices, no leaked markers), must not
  copy a few-shot example shown in its own prompt (same question, up to case and whitespace), and must
  not duplicate a kept sample or an earlier augmented one. Every rejection is counted by reason.

Nothing here sees private data: the inputs are DP synthetic samples (post-processing of the clients'
DP-trained adapters), so the outputs carry the clients' (ε, δ).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fedkt import generate as G
from fedkt.algorithms.fdkt import template_fill
from fedkt.algorithms.fdkt.samples import question_key, topic
from fedkt.data.synthetic import ParseStats, fill_mc_template, parse_mc, read_indices, render_mc
from fedkt.data.collate import encode_pairs
from fedkt.data.tasks import Example
from fedkt.evaluate import loglikelihoods
from fedkt.seeds import derive_seed
from fedkt.text_generators import HFGenerator

FILTER_SYSTEM = ("You are a strict exam editor. You check candidate multiple-choice questions and keep only "
                 "the good ones.")
AUGMENT_SYSTEM = "You are an exam writer. You write new multiple-choice questions in a fixed format."
FILTER_STOP = ["\n\n", "<|im_end|>", "<|endoftext|>"]
AUGMENT_STOP = ["\n\n", "\nQuestion", "<|im_end|>", "<|endoftext|>"]


# ---------------------------------------------------------------------------------------------- filter
def filter_prompt(gen, examples: Sequence[Example]) -> str:
    topics = ", ".join(dict.fromkeys(topic(e.task) for e in examples))
    listing = "\n\n".join(f"Sample {i + 1}:\n{render_mc(e)}" for i, e in enumerate(examples))
    user = (f"Below are {len(examples)} candidate questions for a {topics} test.\n\n{listing}\n\n"
            f"A sample is eligible if its question is clear and on topic, exactly one of its choices is correct, "
            f"and its Answer line names that choice. Reply with the numbers of the eligible samples separated by "
            f"commas (for example: 1, 3), or None if no sample is eligible.")
    return gen.chat_prompt(FILTER_SYSTEM, user)


@dataclass
class FilterStats:
    candidates: int = 0
    clusters: int = 0
    prompts: int = 0
    malformed: int = 0
    """Answers that could not be read with certainty: nothing kept from those prompts."""
    answered_none: int = 0
    kept: int = 0
    malformed_samples: list[str] = field(default_factory=list)
    margins: dict = field(default_factory=dict)
    """Scored filter: log p(Yes) − log p(No) over the candidates (mean, min, max, positive count, kept mean)."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def filter_clusters(gen, examples: Sequence[Example], clusters: Sequence[Sequence[int]], batch: int = 8,
                    max_new_tokens: int = 48, n_samples: int = 3) -> tuple[list[int], FilterStats]:
    """Indices (into ``examples``, ascending) the LLM keeps; one prompt per cluster chunk of ≤ ``batch``."""
    if batch < 1:
        raise ValueError(f"filter batch must be >= 1, got {batch}")
    chunks = [list(c[i:i + batch]) for c in clusters for i in range(0, len(c), batch)]
    stats = FilterStats(candidates=len(examples), clusters=len(clusters), prompts=len(chunks))
    if not chunks:
        return [], stats
    outs = gen.generate([filter_prompt(gen, [examples[i] for i in ch]) for ch in chunks],
                        max_new_tokens=max_new_tokens, stop=FILTER_STOP, temperature=0.0)
    kept: list[int] = []
    for ch, out in zip(chunks, outs):
        sel = read_indices(out, len(ch))
        if sel is None:
            stats.malformed += 1
            if len(stats.malformed_samples) < n_samples:
                stats.malformed_samples.append(out[:300])
            continue
        if not sel:
            stats.answered_none += 1
        kept += [ch[j] for j in sel]
    kept.sort()
    stats.kept = len(kept)
    return kept, stats


def score_prompt(gen, ex: Example) -> str:
    user = (f"Candidate question for a {topic(ex.task)} test:\n\n{render_mc(ex)}\n\nIs it eligible: the question is "
            f"clear and on topic, exactly one of its choices is correct, and its Answer line names that choice? "
            f"Reply Yes or No.")
    return gen.chat_prompt(FILTER_SYSTEM, user)


def filter_scored(gen, model, tok, examples: Sequence[Example], clusters: Sequence[Sequence[int]],
                  keep: float = 0.5, batch_size: int = 16, min_margin: float = -math.inf
                  ) -> tuple[list[int], FilterStats]:
    """Indices (ascending) kept by the LLM's *likelihood* judgement: each sample is put to the LLM as a
    yes/no question (``score_prompt``), its margin is log p(Yes) − log p(No) (no text to parse, so no
    malformed answer), and each cluster keeps its ⌈``keep`` × size⌉ samples of highest margin (ties:
    the earlier sample) among those whose margin is above ``min_margin`` (the quality bar: a cluster the
    LLM rejects entirely keeps nothing). Which samples a cluster contributes is the LLM's judgement.
    Needs the LLM's weights (a local model)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    stats = FilterStats(candidates=len(examples), clusters=len(clusters), prompts=len(examples))
    if not examples:
        return [], stats
    margins = yes_no_margins(model, tok, [score_prompt(gen, e) for e in examples], batch_size)
    kept: list[int] = []
    for c in clusters:
        ranked = sorted(c, key=lambda i: (-margins[i], i))
        kept += [i for i in ranked[:math.ceil(keep * len(c))] if margins[i] > min_margin]
    kept.sort()
    stats.kept = len(kept)
    stats.margins = {"mean": sum(margins) / len(margins), "positive": sum(m > 0 for m in margins),
                     "min_margin": min_margin, "below_bar": sum(m <= min_margin for m in margins),
                     "min": min(margins), "max": max(margins),
                     "kept_mean": sum(margins[i] for i in kept) / max(1, len(kept))}
    return kept, stats


def yes_no_margins(model, tok, prompts: Sequence[str], batch_size: int = 16,
                   answers: tuple[str, str] = ("Yes", "No")) -> list[float]:
    """log p(Yes) − log p(No) (``answers``) after each prompt, the continuations split from the prompt as
    ``fedkt.evaluate.loglikelihoods`` splits them (a chat template ends the prompt with the assistant header,
    whose newline then leads both continuations; plain "Assistant:" wants a space).

    When the two continuations of every prompt differ in their last token only (a shared lead such as that
    newline has the same log-probability in both and cancels), the margin is read at one position: the
    context plus the lead. If those share a prefix of at least ``fedkt.generate.MIN_SHARED_PREFIX`` tokens
    (the scoring prompts' system turn and instruction: ~44 of ~130 tokens), the prefix runs once and each
    prompt's rest is prefilled after it, left-padded, in batches of ``batch_size`` (``fedkt.generate._prefill``):
    the margins ``loglikelihoods`` gives, up to float rounding. Otherwise (or with no local model) through
    ``loglikelihoods``."""
    reqs = [(p, c if p[-1:].isspace() else " " + c) for p in prompts for c in answers]
    pairs = encode_pairs(tok, reqs) if model is not None and tok is not None else []
    ctxs, yes, no = [], [], []
    for (c, ky), (c2, kn) in zip(pairs[::2], pairs[1::2]):
        if c != c2 or len(ky) != len(kn) or ky[:-1] != kn[:-1]:
            break
        ctxs.append(c + ky[:-1])
        yes.append(ky[-1])
        no.append(kn[-1])
    plen = G.shared_prefix_len(ctxs)
    if len(ctxs) < len(prompts) or plen < G.MIN_SHARED_PREFIX or max(map(len, ctxs)) >= 1024:
        # (loglikelihoods cuts inputs over its max_length of 1024 from the left)
        lls = loglikelihoods(model, tok, reqs, batch_size=batch_size, desc="fdkt filter (scored)")
        return [lls[2 * i] - lls[2 * i + 1] for i in range(len(prompts))]
    pad = tok.pad_token_id if tok.pad_token_id is not None else G.eos_token_ids(model, tok)[0]
    order = sorted(range(len(ctxs)), key=lambda i: -len(ctxs[i]))
    margins = [0.0] * len(ctxs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dev = G._device(model)
            prefix = (G.prefix_cache(model, ctxs[0], plen, dev), plen)
            for b0 in range(0, len(order), batch_size):
                idx = order[b0:b0 + batch_size]
                logits = G._prefill(model, [ctxs[i][plen:] for i in idx], pad, prefix)[3]
                logp = torch.log_softmax(logits.float(), dim=-1)
                rows = torch.arange(len(idx), device=dev)
                m = logp[rows, torch.tensor([yes[i] for i in idx], device=dev)] - \
                    logp[rows, torch.tensor([no[i] for i in idx], device=dev)]
                for i, v in zip(idx, m.tolist()):
                    margins[i] = v
    finally:
        model.train(was_training)
    return margins


# ---------------------------------------------------------------------------------------------- augment
def augment_prompt(gen, shots: Sequence[Example], n_choices: int | None = None) -> str:
    """The few-shot prompt for one new question of ``shots``' task, with ``n_choices`` choices (default:
    the most any shot has)."""
    demo = "\n\n".join(render_mc(e) for e in shots)
    n_choices = n_choices or max(len(e.choices) for e in shots)
    last = chr(ord("A") + n_choices - 1)
    user = (f"Here are example questions from a {topic(shots[0].task)} test:\n\n{demo}\n\n"
            f"Write one new question on the same topic, different from the examples, in exactly the same format: "
            f"a line 'Question: ...', {n_choices} choices labelled A to {last}, and a line 'Answer: ' with the "
            f"letter of the correct choice.")
    return gen.chat_prompt(AUGMENT_SYSTEM, user) + "Question:"


def validate_generated(text: str, task: str, shots: Sequence[Example], seen: set[str], stats: ParseStats,
                       id: str = "") -> Example | None:
    """One augmented output (the text after the prompt's ``Question:``) as a valid new example, or None
    with the reason counted: parse failures by ``parse_mc``'s reasons, ``copy_of_shot``, ``duplicate``.
    A valid example's key is added to ``seen``."""
    if not isinstance(text, str):
        stats.add("not_text")
        return None
    body = text if text.lstrip().lower().startswith("question") else "Question:" + text
    one = ParseStats()
    ex = parse_mc(body, task=task, id=id, stats=one)
    if ex is None:
        stats.merge(one)
        return None
    key = question_key(ex)
    if key in {question_key(s) for s in shots}:
        stats.add("copy_of_shot")
        return None
    if key in seen:
        stats.add("duplicate")
        return None
    seen.add(key)
    stats.add(None)
    return ex


@dataclass
class AugmentStats:
    prompts: int = 0
    tasks_without_shots: list[str] = field(default_factory=list)
    validation: ParseStats = field(default_factory=ParseStats)
    raw_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "tasks_without_shots": self.tasks_without_shots,
                "valid": self.validation.accepted, "rejected": self.validation.to_dict()["rejected"],
                "raw_samples": self.raw_samples}


def augment(gen, kept: Sequence[Example], tasks: Sequence[str], per_kept: float, shots: int, seed: int,
            max_new_tokens: int = 160, temperature: float = 0.7, n_samples: int = 3, sampling: str = "free",
            question_tokens: int = 64, choice_tokens: int = 24, choices: dict[str, int] | None = None
            ) -> tuple[list[Example], AugmentStats]:
    """New examples written by the LLM from few-shot prompts of kept samples, validated and de-duplicated.
    ``sampling = "template"``: the LLM fills the template field by field (``fill_mc_template``; the task's
    number of choices from ``choices``, else as many as the shots' longest list; the answer letter its
    own pick); ``"free"``: one continuation."""
    stats = AugmentStats()
    prompts: list[str] = []
    plan: list[tuple[str, list[Example]]] = []
    for task in tasks:
        pool = [e for e in kept if e.task == task]
        if not pool:
            stats.tasks_without_shots.append(task)
            continue
        for j in range(math.ceil(per_kept * len(pool))):
            rng = random.Random(derive_seed(seed, "fdkt-shots", task, j))
            chosen = rng.sample(pool, min(shots, len(pool)))
            plan.append((task, chosen))
            prompts.append(augment_prompt(gen, chosen, (choices or {}).get(task)))
    stats.prompts = len(prompts)
    if not prompts:
        return [], stats
    if sampling == "template":
        outs = [""] * len(prompts)
        by_n: dict[int, list[int]] = {}
        for j, (task, chosen) in enumerate(plan):
            by_n.setdefault((choices or {}).get(task) or max(len(e.choices) for e in chosen), []).append(j)
        for n, idx in sorted(by_n.items()):
            if isinstance(gen, HFGenerator):  # a local LLM: one prefill per prompt, fields continue its KV cache
                filled = template_fill.fill_mc_template_cached(
                    gen.model, gen.tok, [prompts[j] for j in idx], n_choices=n, question_tokens=question_tokens,
                    choice_tokens=choice_tokens, batch_size=gen.batch_size, temperature=temperature,
                    top_p=gen.top_p, top_k=gen.top_k, greedy=("answer",),
                    seed_for=lambda tag, n=n: derive_seed(seed, "fdkt-augment", n, tag))
                for j, o in zip(idx, filled):
                    outs[j] = o
                continue

            def complete(ps, max_new, stop, tag, n=n):
                return gen.generate(ps, max_new_tokens=max_new, stop=stop, temperature=0.0 if tag == "answer" else temperature,
                                    seed=derive_seed(seed, "fdkt-augment", n, tag))

            for j, o in zip(idx, fill_mc_template(complete, [prompts[j] for j in idx], n_choices=n,
                                                  question_tokens=question_tokens, choice_tokens=choice_tokens)):
                outs[j] = o
    elif sampling == "free":
        outs = gen.generate(prompts, max_new_tokens=max_new_tokens, stop=AUGMENT_STOP, temperature=temperature,
                            seed=derive_seed(seed, "fdkt-augment"))
    else:
        raise ValueError(f"sampling must be 'template' or 'free', got {sampling!r}")
    stats.raw_samples = [o[:400] for o in outs[:n_samples]]
    seen = {question_key(e) for e in kept}
    valid = []
    for j, ((task, chosen), out) in enumerate(zip(plan, outs)):
        ex = validate_generated(out, task, chosen, seen, stats.validation, id=f"aug-{j}")
        if ex is not None:
            valid.append(ex)
    return valid, stats
