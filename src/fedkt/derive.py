"""Derive a smaller same-tokenizer model from a larger one: keep a subset of its layers, then heal it by
knowledge distillation from the parent on text the parent writes itself.

This is how FedCoLLM's SLM relates to its LLM (Sheared-LLaMA was pruned from LLaMA2 and trained on):
token-level distillation needs one vocabulary, and the derived model inherits the parent's tokenizer,
embeddings and a subset of its blocks bit for bit.

Steps of :func:`derive`:
  1. select layers (explicit list, or ``num_layers`` by a strategy, e.g. block influence measured on the
     healing text) and copy their weights exactly;
  2. have the parent generate healing text from varied prompts (sampled, seeded); optionally mix in task
     text the user supplies; hold some generated texts out for evaluation;
  3. distil: minimise KL(parent ‖ child) at temperature T on every token of the healing text, updating
     the child's blocks and norms (embeddings stay the parent's), or with ``rank = r`` a rank-r update of
     every linear layer of the blocks (plus the norms; see :mod:`fedkt.derive_delta`); checkpoint every N
     steps, resumable;
  4. save an ordinary HF model directory (``AutoModelForCausalLM.from_pretrained`` loads it) plus a card,
     and with ``rank = r`` the delta (a few MB) that rebuilds it bit for bit from the parent.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fedkt.seeds import derive_seed
from fedkt import progress
from fedkt.config import DeriveConfig
from fedkt.derive_delta import attach, detach_merged, save_delta, state_sha256
from fedkt.losses import kd_kl

DELTA_FILE = "fedkt_delta.safetensors"

# ------------------------------------------------------------------------------------------ selection


def layer_list_name(model) -> str:
    """Dotted name of the model's ModuleList of transformer blocks (model.layers, transformer.h, ...)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name.count(".") <= 2:
            return name
    raise ValueError(f"cannot find the list of {n} transformer blocks in {type(model).__name__}")


def select_layers(num_parent: int, num_layers: int, strategy: str = "spread",
                  importance: list[float] | None = None) -> list[int]:
    """Which parent blocks to keep. ``spread``: evenly spaced, first and last included; ``first``: the
    bottom ``num_layers``; ``ends``: the bottom ceil(n/2) and the top floor(n/2); ``importance``: the
    ``num_layers`` blocks with the largest ``importance`` (see :func:`block_influence`; ties: lower index)."""
    if not 1 <= num_layers <= num_parent:
        raise ValueError(f"num_layers = {num_layers} must be in [1, {num_parent}] (the parent has {num_parent})")
    if strategy == "importance":
        if importance is None or len(importance) != num_parent:
            raise ValueError(f"strategy 'importance' needs one importance score per parent block ({num_parent})")
        ranked = sorted(range(num_parent), key=lambda i: (-importance[i], i))
        return sorted(ranked[:num_layers])
    if strategy == "first":
        return list(range(num_layers))
    if strategy == "ends":
        lo = math.ceil(num_layers / 2)
        return list(range(lo)) + list(range(num_parent - (num_layers - lo), num_parent))
    if strategy == "spread":
        if num_layers == 1:
            return [0]
        return sorted({round(i * (num_parent - 1) / (num_layers - 1)) for i in range(num_layers)})
    raise ValueError(f"strategy = {strategy!r}; allowed values: 'spread', 'first', 'ends', 'importance'")


@torch.no_grad()
def block_influence(parent, tok, texts: list[str], seq_len: int, batch_size: int = 8) -> list[float]:
    """Per block, 1 - cos(input, output) of its hidden states averaged over the tokens of ``texts``
    (ShortGPT's block influence): how much the block changes what flows through it. Blocks that barely
    change it are the cheapest to drop."""
    sums: list[float] = []
    n = 0
    for ids, mask in _batches(tok, texts, seq_len, batch_size):
        hs = parent(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        m = mask.bool()
        cos = [torch.nn.functional.cosine_similarity(hs[i][m].float(), hs[i + 1][m].float(), dim=-1).sum().item()
               for i in range(len(hs) - 1)]
        sums = [a + b for a, b in zip(sums, cos)] if sums else cos
        n += int(m.sum())
    return [1.0 - c / max(1, n) for c in sums]


def build_child(parent, layers: list[int]):
    """A fresh model of the parent's class and config with only ``layers``, weights copied bit-exactly."""
    import copy

    from transformers import AutoModelForCausalLM

    n = parent.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} must be distinct indices in [0, {n - 1}]")
    prefix = layer_list_name(parent) + "."
    config = copy.deepcopy(parent.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    child = AutoModelForCausalLM.from_config(config, dtype=next(parent.parameters()).dtype)
    remap = {src: dst for dst, src in enumerate(layers)}
    pat = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    state = {}
    for key, value in parent.state_dict().items():
        m = pat.match(key)
        if m:
            src = int(m.group(1))
            if src not in remap:
                continue
            key = f"{prefix}{remap[src]}.{m.group(2)}"
        state[key] = value.detach().clone()
    missing, unexpected = child.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    child.tie_weights()
    child.eval()
    return child


# ------------------------------------------------------------------------------------------ healing text

TOPICS = [
    "photosynthesis", "the water cycle", "volcanoes", "the solar system", "electric circuits", "magnets",
    "plate tectonics", "the human heart", "digestion", "cells", "DNA", "evolution", "food chains",
    "ecosystems", "weather and climate", "the moon's phases", "gravity", "friction", "sound waves", "light",
    "chemical reactions", "states of matter", "rocks and minerals", "erosion", "fossils", "energy",
    "renewable energy", "recycling", "the immune system", "bacteria and viruses", "plants", "animals",
    "insects", "birds", "fish", "mammals", "the ocean", "rivers", "deserts", "forests", "earthquakes",
    "simple machines", "heat and temperature", "the atom", "the periodic table", "nutrition", "the brain",
    "muscles and bones", "seasons", "stars", "inventions", "measurement", "the scientific method",
    "fractions", "percentages", "geometry", "money and budgeting", "history of writing", "maps", "cooking",
]
TEMPLATES = [
    "Explain {t} in simple terms.", "Write a short lesson about {t} for a middle-school class.",
    "What are three important facts about {t}?", "Write a multiple-choice science question about {t} and answer it.",
    "Describe how {t} affects everyday life.", "Why is {t} important? Give reasons.",
    "Write a short quiz question on {t}, then explain the correct answer.",
    "Summarise what a student should know about {t}.",
]


def healing_prompts(tok, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        msg = rng.choice(TEMPLATES).format(t=rng.choice(TOPICS))
        if getattr(tok, "chat_template", None):
            prompts.append(tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                                   add_generation_prompt=True))
        else:
            prompts.append(msg + "\n")
    return prompts


def task_texts(spec: str, data_dir: str = "", split: str = "validation") -> list[str]:
    """Task text to mix into healing: comma-separated JSONL files of the supported schemas or task names
    (``name`` or ``name:split``; ``split`` by default, the validation split: clients train on the train
    split, so the default never heals on what a client holds)."""
    from fedkt.data.prompts import training_text
    from fedkt.data.tasks import load_jsonl, load_task

    exs = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item.endswith(".jsonl"):
            exs += load_jsonl(item)
        else:
            name, _, sp = item.partition(":")
            exs += load_task(name, sp or split, data_dir)
    return ["".join(training_text(e)) for e in exs]


# ------------------------------------------------------------------------------------------ distillation


def _batches(tok, texts: list[str], seq_len: int, batch_size: int):
    for s in range(0, len(texts), batch_size):
        enc = tok(texts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                  max_length=seq_len, add_special_tokens=False)
        yield enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def heldout_kd(child, parent, tok, texts: list[str], seq_len: int, temperature: float,
               batch_size: int = 8) -> dict[str, float]:
    """Mean KL(parent ‖ child) per token (at ``temperature``, ×T²) and the child's perplexity on texts."""
    kl_sum = ce_sum = 0.0
    n_tok = 0
    for ids, mask in _batches(tok, texts, seq_len, batch_size):
        s = child(input_ids=ids, attention_mask=mask).logits[:, :-1]
        t = parent(input_ids=ids, attention_mask=mask).logits[:, :-1]
        m = mask[:, 1:].bool()
        k = int(m.sum())
        kl_sum += kd_kl(s, t, m, temperature).item() * k
        ce = torch.nn.functional.cross_entropy(s.reshape(-1, s.size(-1)).float(), ids[:, 1:].reshape(-1),
                                               reduction="none")
        ce_sum += (ce * m.reshape(-1)).sum().item()
        n_tok += k
    return {"kd": kl_sum / max(1, n_tok), "ppl": math.exp(ce_sum / max(1, n_tok)), "tokens": n_tok}


def _set_trainable(child) -> list[torch.nn.Parameter]:
    emb = {p.data_ptr() for p in child.get_input_embeddings().parameters()}
    emb |= {p.data_ptr() for p in child.get_output_embeddings().parameters()}
    params = []
    for p in child.parameters():
        p.requires_grad_(p.data_ptr() not in emb)
        if p.requires_grad:
            params.append(p)
    return params


def derive(cfg: DeriveConfig) -> dict[str, Any]:
    """Build, heal and save a derived model; returns the card (also written to ``OUT/fedkt_derive.json``)."""
    from fedkt.generate import generate
    from fedkt.models import count_parameters, load_model

    out = Path(cfg.out)
    ckdir = out.with_name(out.name + ".partial")
    ckdir.mkdir(parents=True, exist_ok=True)
    cfg_json = json.dumps(cfg.__dict__, sort_keys=True)
    marker = ckdir / "config.json"
    if marker.is_file() and marker.read_text() != cfg_json:
        raise ValueError(f"{ckdir} holds a partial derivation with another config; delete it or use it unchanged")
    marker.write_text(cfg_json)
    t_start = time.perf_counter()

    parent, tok = load_model(cfg.parent)
    n_parent = parent.config.num_hidden_layers

    # healing text (generated once, kept for resume)
    texts_file = ckdir / "texts.json"
    if texts_file.is_file():
        texts = json.loads(texts_file.read_text())
    else:
        prompts = healing_prompts(tok, cfg.num_prompts + cfg.eval_texts, seed=derive_seed(cfg.seed, "derive", "prompts"))
        gens = generate(parent, tok, prompts, max_new_tokens=cfg.gen_tokens, batch_size=32, do_sample=True,
                        temperature=0.8, top_p=0.95, seed=derive_seed(cfg.seed, "derive", "sample"), desc="derive: parent writes healing text")
        texts = [p + g for p, g in zip(prompts, gens)]
        texts_file.write_text(json.dumps(texts))
    heldout, train_texts = texts[:cfg.eval_texts], texts[cfg.eval_texts:]
    n_task = 0
    if cfg.task_texts:
        extra = task_texts(cfg.task_texts, cfg.data_dir, cfg.task_split)
        n_task = int(round(len(train_texts) * cfg.task_fraction / max(1e-9, 1 - cfg.task_fraction)))
        rng = random.Random(derive_seed(cfg.seed, "derive", "task-mix"))
        train_texts = train_texts + [rng.choice(extra) for _ in range(n_task)]

    influence = None
    if not cfg.layers and cfg.strategy == "importance":
        influence = block_influence(parent, tok, train_texts[:256], cfg.seq_len)
        progress.log("derive: block influence " + " ".join(f"{x:.3f}" for x in influence))
    layers = list(cfg.layers) or select_layers(n_parent, cfg.num_layers, cfg.strategy, influence)
    child = build_child(parent, layers)
    progress.log(f"derive: keeping parent layers {layers} of {n_parent}: "
                 f"{count_parameters(child) / 1e6:.1f}M of {count_parameters(parent) / 1e6:.1f}M params")

    before = heldout_kd(child, parent, tok, heldout, cfg.seq_len, cfg.temperature) if heldout else {}
    if before:
        progress.log(f"derive: held-out KD {before['kd']:.4f}, child ppl {before['ppl']:.2f} before healing")

    if cfg.rank:
        params = attach(child, layer_list_name(child) + ".", cfg.rank, derive_seed(cfg.seed, "derive", "delta-init"))
    else:
        params = _set_trainable(child)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / max(1, cfg.steps)))
    step, tokens, last_loss, losses = 0, 0, float("nan"), []
    state_file = ckdir / "state.pt"
    if state_file.is_file():
        st = torch.load(state_file, weights_only=False)
        child.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step, tokens, losses = st["step"], st["tokens"], st["losses"]
        progress.log(f"derive: resuming healing at step {step}/{cfg.steps}")

    rng = random.Random(derive_seed(cfg.seed, "derive", "order", cfg.steps, len(train_texts)))
    order: list[int] = []
    while len(order) < cfg.steps * cfg.batch_size:
        perm = list(range(len(train_texts)))
        rng.shuffle(perm)
        order += perm
    child.train()
    with progress.bar("derive: distil parent -> child", cfg.steps) as pb:
        pb.advance(step)
        while step < cfg.steps:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            ids, mask = next(_batches(tok, [train_texts[i] for i in idx], cfg.seq_len, len(idx)))
            with torch.no_grad():
                t_logits = parent(input_ids=ids, attention_mask=mask).logits[:, :-1]
            s_logits = child(input_ids=ids, attention_mask=mask).logits[:, :-1]
            loss = kd_kl(s_logits, t_logits, mask[:, 1:].bool(), cfg.temperature)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += int(mask.sum())
            last_loss = loss.item()
            losses.append(last_loss)
            pb.advance(kd=last_loss)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                tmp = state_file.with_suffix(".tmp")
                torch.save({"model": child.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "step": step, "tokens": tokens, "losses": losses}, tmp)
                os.replace(tmp, state_file)
    child.eval()
    delta = detach_merged(child) if cfg.rank else None
    for p in child.parameters():
        p.requires_grad_(False)
    after = heldout_kd(child, parent, tok, heldout, cfg.seq_len, cfg.temperature) if heldout else {}
    if after:
        progress.log(f"derive: held-out KD {after['kd']:.4f}, child ppl {after['ppl']:.2f} after healing")
    parent_ppl = heldout_kd(parent, parent, tok, heldout, cfg.seq_len, cfg.temperature)["ppl"] if heldout else None

    card = {
        "parent": cfg.parent, "parent_layers": n_parent, "layers_kept": layers,
        "params": count_parameters(child), "parent_params": count_parameters(parent),
        "healing_steps": cfg.steps, "healing_tokens": tokens, "task_texts": cfg.task_texts or None,
        "task_examples_mixed": n_task, "temperature": cfg.temperature,
        "final_kd_loss": (sum(losses[-20:]) / len(losses[-20:])) if losses else None,
        "heldout_before": before, "heldout_after": after, "parent_heldout_ppl": parent_ppl,
        "strategy": None if cfg.layers else cfg.strategy, "block_influence": influence, "rank": cfg.rank,
        "delta_bytes": sum(v.numel() * v.element_size() for v in delta.values()) if delta else None,
        "parent_sha256": state_sha256(parent), "sha256": state_sha256(child), "seed": cfg.seed,
        "build_seconds": round(time.perf_counter() - t_start, 1),
    }
    tmp_out = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    child.save_pretrained(tmp_out)
    tok.save_pretrained(tmp_out)
    if delta:
        save_delta(delta, tmp_out / DELTA_FILE)
    (tmp_out / "fedkt_derive.json").write_text(json.dumps(card, indent=2))
    (tmp_out / "README.md").write_text(_card_markdown(card))
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)
    shutil.rmtree(ckdir, ignore_errors=True)
    return card


def _card_markdown(card: dict[str, Any]) -> str:
    b, a = card.get("heldout_before") or {}, card.get("heldout_after") or {}
    lines = [
        "# Derived model (fedkt derive-slm)", "",
        f"- parent: `{card['parent']}` ({card['parent_params'] / 1e6:.1f}M params, {card['parent_layers']} layers)",
        f"- layers kept: {card['layers_kept']} -> {card['params'] / 1e6:.1f}M params "
        f"({100 * card['params'] / card['parent_params']:.1f}% of the parent)",
        f"- healing: {card['healing_steps']} distillation steps on {card['healing_tokens']} tokens of parent-written text"
        + (f" mixed with {card['task_examples_mixed']} examples of {card['task_texts']}" if card["task_texts"] else ""),
        f"- final KD loss (last 20 steps): {card['final_kd_loss']}",
    ]
    if card.get("rank"):
        lines.append(f"- healed through a rank-{card['rank']} delta on every linear layer of the kept blocks "
                     f"(plus norms): `fedkt_delta.safetensors`, {card['delta_bytes'] / 2**20:.1f} MiB; weights sha256 "
                     f"`{card['sha256']}`")
    if b and a:
        lines.append(f"- held-out KD loss {b['kd']:.4f} -> {a['kd']:.4f}; perplexity {b['ppl']:.2f} -> {a['ppl']:.2f} "
                     f"(parent {card['parent_heldout_ppl']:.2f})")
    lines.append(f"- build time: {card['build_seconds']} s")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ rebuild


class RebuildError(RuntimeError):
    pass


def rebuild(recipe: Path, out: Path) -> dict[str, Any]:
    """Rebuild a derived model from its card and delta (``recipe`` holds ``fedkt_derive.json`` and
    ``fedkt_delta.safetensors``): cut the parent, merge the delta exactly, check the weights' sha256 against
    the card, save an HF directory at ``out``. Takes seconds; the result is the measured model bit for bit."""
    from fedkt.derive_delta import apply_delta, load_delta
    from fedkt.models import load_model

    card = json.loads((recipe / "fedkt_derive.json").read_text())
    if not card.get("rank"):
        raise RebuildError(f"{recipe}: the card has no delta (derived with rank = 0); copy the model directory instead")
    parent, tok = load_model(card["parent"])
    got = state_sha256(parent)
    if got != card["parent_sha256"]:
        raise RebuildError(f"parent {card['parent']}: weights sha256 {got} differ from the {card['parent_sha256']} "
                           f"the delta was made on; rebuild needs the exact parent")
    child = build_child(parent, card["layers_kept"])
    apply_delta(child, load_delta(recipe / DELTA_FILE))
    got = state_sha256(child)
    if got != card["sha256"]:
        raise RebuildError(f"rebuilt model's weights sha256 {got} differ from the recorded {card['sha256']}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    child.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.copy(recipe / DELTA_FILE, tmp / DELTA_FILE)
    (tmp / "fedkt_derive.json").write_text(json.dumps(card, indent=2))
    (tmp / "README.md").write_text(_card_markdown(card))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return card


# ------------------------------------------------------------------------------------------ default pair

DEFAULT_SLM = DeriveConfig(parent="builtin:smollm2-135m", num_layers=16, strategy="importance", rank=16, steps=300,
                           lr=2e-3, num_prompts=256, task_texts="arc_easy:validation,arc_challenge:validation",
                           task_fraction=0.75, checkpoint_every=25, seed=0)
"""The recipe of ``builtin:smollm2-slm`` (examples/derive_smollm2_slm.toml). fedkt ships its result as the
card + delta in ``BUNDLED_SLM``; this recipe re-derives it only where they are missing (it needs
ARC-Challenge's validation split under ``../shared/assets/data``), and such a build is a new draw, not the
measured model."""


BUNDLED_SLM = Path(__file__).parent / "data" / "bundled" / "smollm2-slm"


def ensure_default_slm() -> Path:
    """The cached default client SLM (builtin:smollm2-slm): rebuilt on first use from the recipe and delta
    that ship inside fedkt (seconds), or derived from scratch when they are missing (a source tree without
    them)."""
    from fedkt.builtin import cache_dir

    out = cache_dir() / "smollm2-slm"
    if (BUNDLED_SLM / "fedkt_derive.json").is_file():
        want = json.loads((BUNDLED_SLM / "fedkt_derive.json").read_text())["sha256"]
        card = out / "fedkt_derive.json"
        if (out / "config.json").is_file() and card.is_file() and json.loads(card.read_text()).get("sha256") == want:
            return out
        progress.log("[bold]fedkt[/]: building the default SLM from SmolLM2-135M-Instruct and fedkt's shipped delta (once)")
        rebuild(BUNDLED_SLM, out)
        return out
    if (out / "config.json").is_file():
        return out
    progress.log("[bold]fedkt[/]: deriving the default SLM from SmolLM2-135M-Instruct (once; see docs/derive-slm.md)")
    cfg = DeriveConfig(**{**DEFAULT_SLM.__dict__, "out": str(out)})
    derive(cfg)
    return out
