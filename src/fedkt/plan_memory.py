"""The memory model of ``fedkt plan``: bytes of weights, activations and KV caches from a model's shape.

Estimates, not measurements (``benchmarks/plan_vs_measured.py`` checks them; docs/gpu.md states the
formulas):

* weights: parameters × bytes of the dtype; with ``load_in_4bit`` the decoder's linear layers take NF4 with
  double quantisation, 4.127 bits per parameter (QLoRA, Dettmers et al. 2023, §3), the rest stays in the dtype;
* training activations of a frozen base with LoRA, per token and layer: ``10·h + 3·i + 2·kv`` values in the
  activation dtype (norm inputs and outputs, the LoRA inputs after dropout, rotary q/k, attention output,
  residual adds; the MLP's gate, up and activation: 3·i; the frozen linears save only their weights). Torch's
  saved-tensor hooks count 10,672 per token and layer in a SmolLM2 block (h 576, i 1536, kv 192), the
  formula 10,752. With gradient checkpointing: ``h`` per layer plus one layer recomputed. Attention by a
  fused kernel (no s² term);
* logits: ``copies`` fp32 [positions × vocab] tensors alive at the loss's peak (4 for cross-entropy, in its
  backward: the saved log-softmax, its gradient, the gradient through the shift's copy and the slice's
  zero-filled full-size gradient; 6 per model for FedCoLLM's mutual distillation, whose
  KL keeps both sides' log-probabilities, the teacher's probabilities and their difference). The positions
  are every token of the batch, except for fedkt's answer-only SFT (``train.answer_loss``: FedAvg's,
  standalone's and FedCoLLM's clients, centralized), whose LM head runs only on the supervised positions:
  batch × ``Options.answer_len`` (the most supervised tokens of one training example) when the data was read;
* inference: the KV cache ``2·layers·kv`` values per token plus one layer's transient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp32": "fp32", "bf16": "bf16",
           "fp16": "fp16", "auto": "fp32"}
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
"""Bytes per 4-bit parameter: 4-bit NF4 + one 8-bit absmax per 64-block + one fp32 per 256 absmax blocks."""
SFT_LOGIT_COPIES = 4
KD_LOGIT_COPIES = 6


def dtype_name(value: str) -> str:
    """``"bf16"`` / ``"bfloat16"`` ... -> the short name; ``"auto"`` plans as fp32 (what CPU runs pick)."""
    if value not in ALIASES:
        # deferred: plan_memory is core-layer arithmetic; config is imported only to raise its error type
        from fedkt.config import ConfigError

        raise ConfigError(f"dtype {value!r} is not a dtype; allowed values: {', '.join(ALIASES)}")
    return ALIASES[value]


def dtype_bytes(value: str) -> int:
    return DTYPES[dtype_name(value)]


@dataclass
class Arch:
    """The shape numbers of a decoder that the memory model needs."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int

    @classmethod
    def from_hf(cls, hf) -> "Arch":
        h = hf.hidden_size
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or h // heads
        inter = (getattr(hf, "intermediate_size", None) or getattr(hf, "ffn_dim", None)
                 or getattr(hf, "n_inner", None) or 4 * h)
        kv = (getattr(hf, "num_key_value_heads", None) or heads) * head_dim
        return cls(hf.model_type, hf.num_hidden_layers, h, inter, kv, hf.vocab_size)


@dataclass
class Options:
    """What the plan assumes beyond the TOML: dtype per role, 4-bit roles, checkpointing, sequence length."""

    dtype: dict[str, str] = field(default_factory=lambda: {"slm": "fp32", "llm": "fp32"})
    load_in_4bit: list[str] = field(default_factory=list)
    """Roles ("slm", "llm") whose base weights are 4-bit (QLoRA)."""
    gradient_checkpointing: bool = False
    seq_len: int = 0
    """Tokens per training sequence; 0: the longest tokenized training example (``plan.data_seq_len``)."""
    seq_len_source: str = "--seq-len"
    aux_seq_len: int = 0
    """Tokens per sequence of the server's auxiliary set (FedCoLLM's distillation); 0: ``seq_len``."""
    answer_len: int = 0
    """Supervised (answer) tokens of the training example with the most, read with ``seq_len`` from the data;
    0: unknown, answer-only SFT's logits are counted at every position (an upper bound)."""

    def dtype_of(self, role: str) -> str:
        return dtype_name(self.dtype.get(role, "fp32"))

    def four_bit(self, role: str) -> bool:
        return role in self.load_in_4bit

    def to_dict(self) -> dict[str, Any]:
        d = {r: self.dtype_of(r) for r in self.dtype}
        return {"dtype": d["slm"] if len(set(d.values())) == 1 else d, "load_in_4bit": list(self.load_in_4bit),
                "gradient_checkpointing": self.gradient_checkpointing, "seq_len": self.seq_len,
                "seq_len_source": self.seq_len_source, "aux_seq_len": self.aux_seq_len or self.seq_len,
                "answer_len": self.answer_len}

    @classmethod
    def from_config(cls, cfg, dtype: str | None = None, load_in_4bit: bool | None = None,
                    gradient_checkpointing: bool | None = None, seq_len: int | None = None) -> "Options":
        """From the experiment's ``[model]`` and ``[train]`` keys, with the command line's overrides on top.

        MERGE POINT: the per-role ``[model]`` device/dtype, ``load_in_4bit`` and ``gradient_checkpointing``
        keys are read here by ``getattr`` (absent keys: fp32, off); a per-role dtype key maps to ``dtype[role]``."""
        m = cfg.model
        base = dtype_name(dtype or getattr(m, "dtype", "float32"))
        dt = {"slm": dtype_name(dtype or getattr(m, "slm_dtype", None) or base),
              "llm": dtype_name(dtype or getattr(m, "llm_dtype", None) or base)}
        four = getattr(m, "load_in_4bit", "none") if load_in_4bit is None else load_in_4bit
        roles = {"none": [], "llm": ["llm"], "all": ["slm", "llm"]}[four] if isinstance(four, str) \
            else (["llm"] if four else [])  # [model] load_in_4bit = "none" | "llm" | "all"; --4bit: the LLM
        ckpt = getattr(m, "gradient_checkpointing", False) if gradient_checkpointing is None else gradient_checkpointing
        return cls(dt, roles, bool(ckpt), seq_len or 0)


def weight_bytes(m, opts: Options) -> int:
    """Bytes of ``m``'s (a ``plan.ModelFacts``) base weights in memory."""
    if m.served:
        return 0
    b = dtype_bytes(opts.dtype_of(m.role))
    if opts.four_bit(m.role):
        return int(m.quantizable * NF4_BYTES + (m.params - m.quantizable) * b)
    return m.params * b


def activation_bytes(arch: Arch, tokens: int, act_bytes: int, checkpointing: bool, logit_copies: int,
                     logit_tokens: int | None = None) -> int:
    """Training activations of ``tokens`` tokens (batch × sequence) through a frozen base with LoRA; the LM
    head's logits at ``logit_tokens`` positions (None: every token)."""
    per_layer = 10 * arch.hidden + 3 * arch.intermediate + 2 * arch.kv_dim
    if checkpointing:
        layers = arch.layers * arch.hidden + per_layer
    else:
        layers = arch.layers * per_layer
    logits = (tokens if logit_tokens is None else logit_tokens) * arch.vocab * (4 * logit_copies
                                                                                + (act_bytes if act_bytes < 4 else 0))
    return tokens * layers * act_bytes + logits


def kv_cache_bytes(arch: Arch, batch: int, length: int, act_bytes: int) -> int:
    return 2 * arch.layers * batch * length * arch.kv_dim * act_bytes


def inference_bytes(arch: Arch, batch: int, length: int, act_bytes: int) -> int:
    """Scoring or generating ``batch`` sequences of ``length`` tokens: KV cache + one layer's transient + the
    last position's logits (fp32, with their log-softmax)."""
    transient = batch * length * (4 * arch.hidden + 2 * arch.intermediate) * act_bytes
    return kv_cache_bytes(arch, batch, length, act_bytes) + transient + 2 * batch * arch.vocab * 4
