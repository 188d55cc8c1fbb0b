"""A derived model: which parent blocks it keeps, how they are cut out, its card, and its rebuild.

``fedkt derive-slm`` (:mod:`fedkt.derive`) makes one; the card (``fedkt_derive.json``) and, for a
rank-r healing, the delta (``fedkt_delta.safetensors``, :mod:`fedkt.derive_delta`) rebuild it bit for bit
from the parent: :func:`rebuild` cuts the parent (:func:`build_child`), merges the delta and checks the
weights' sha256. Built-in models rebuild through here without importing the derivation pipeline.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from fedkt.derive_delta import apply_delta, load_delta, state_sha256

DELTA_FILE = "fedkt_delta.safetensors"
Loader = Callable[[str], tuple[Any, Any]]
"""``load(spec) -> (model, tokenizer)``, e.g. ``fedkt.models.load_model``."""


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
def build_child(parent, layers: list[int]):
    """A fresh model of the parent's class and config with only ``layers``, weights copied bit-exactly."""
    # deferred: transformers takes seconds to import; resolving a built-in model rarely cuts one
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


def card_markdown(card: dict[str, Any]) -> str:
    """The README.md of a derived model's directory, from its card."""
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


class RebuildError(RuntimeError):
    pass


def rebuild(recipe: Path, out: Path, load: Loader) -> dict[str, Any]:
    """Rebuild a derived model from its card and delta (``recipe`` holds ``fedkt_derive.json`` and
    ``fedkt_delta.safetensors``): cut the parent, merge the delta exactly, check the weights' sha256 against
    the card, save an HF directory at ``out``. Takes seconds; the result is the measured model bit for bit.
    ``load(spec) -> (model, tokenizer)`` loads the parent (``fedkt.models.load_model``)."""

    card = json.loads((recipe / "fedkt_derive.json").read_text())
    if not card.get("rank"):
        raise RebuildError(f"{recipe}: the card has no delta (derived with rank = 0); copy the model directory instead")
    parent, tok = load(card["parent"])
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
    (tmp / "README.md").write_text(card_markdown(card))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return card
