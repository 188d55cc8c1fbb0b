"""Devices and precision: resolving a role's ``Placement`` on the machine that loads the model, loading
arguments (dtype, 4-bit quantisation, ``device_map``), autocast and fp16 grad scaling for the training loop.

A placement is resolved where the model is loaded (a Flower client resolves ``"auto"`` on its own machine).
LoRA adapters stay fp32 whatever the base dtype (peft's default: fp32 master weights, so AdamW's small
updates are not rounded away); under autocast their matmuls run in the base dtype.
See docs/devices.md.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

from fedkt.config import DEVICE_SPELLING, Placement

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
GPU_EXTRA = "pip install 'fedkt[gpu]'"


class DeviceError(RuntimeError):
    """A device or precision setting that this machine cannot honour; the message names the key."""


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(spec: str, key: str = "model.device") -> torch.device:
    """``"auto"`` -> cuda, else mps, else cpu; an explicit accelerator must exist here."""
    if not DEVICE_SPELLING.fullmatch(spec):
        raise DeviceError(f"{key} = {spec!r} is not a device; allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{key} = {spec!r}: cuda requested but torch.cuda.is_available() is False on this "
                              f"machine (torch {torch.__version__}); set {key} = \"auto\" or \"cpu\"")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{key} = {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if spec == "mps" and not _mps_available():
        raise DeviceError(f"{key} = 'mps': torch.backends.mps.is_available() is False on this machine; "
                          f"set {key} = \"auto\" or \"cpu\"")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device, key: str = "model.dtype") -> torch.dtype:
    """``"auto"`` -> bf16 on a CUDA GPU that supports it, fp16 on other CUDA GPUs, fp32 elsewhere."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if spec not in DTYPES:
        raise DeviceError(f"{key} = {spec!r} is not a dtype; allowed: auto, bf16, fp16, fp32")
    dtype = DTYPES[spec]
    if dtype == torch.float16 and device.type == "cpu":
        raise DeviceError(f"{key} = {spec!r} on the cpu: fp16 needs a GPU (cuda or mps); use \"bf16\" on a cpu")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{key} = {spec!r}: {torch.cuda.get_device_name(device)} has no bf16 support; use \"fp16\"")
    return dtype


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16): there bf16 matmuls run several
    times faster than fp32 (measured 7x on a Sapphire Rapids core, docs/devices.md); without them torch
    emulates bf16 and it runs 4-60x *slower* than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(c()) for c in checks if c is not None)


_warned_bf16 = False


def _warn_emulated_bf16(key: str) -> None:
    global _warned_bf16
    if not _warned_bf16 and not cpu_has_native_bf16():
        _warned_bf16 = True
        warnings.warn(f"{key} = bf16 on a CPU without bf16 hardware (no AMX or AVX512-BF16): torch emulates it, "
                      f"several times slower than fp32; set {key} = \"fp32\" (or \"auto\") on this machine",
                      stacklevel=3)


def load_kwargs(p: Placement, role: str = "slm") -> tuple[dict[str, Any], torch.device, torch.dtype]:
    """``from_pretrained`` arguments for a placement, with the device the inputs go to and the base dtype."""
    dkey, tkey = ("model.llm_device (or model.device)", "model.llm_dtype (or model.dtype)") if role == "llm" \
        else ("model.device", "model.dtype")
    device = resolve_device(p.device, dkey)
    dtype = resolve_dtype(p.dtype, device, tkey)
    if dtype == torch.bfloat16 and device.type == "cpu":
        _warn_emulated_bf16(tkey)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if p.load_in_4bit:
        if device.type != "cuda":
            raise DeviceError(f"model.load_in_4bit for the {role}: 4-bit (bitsandbytes) needs a CUDA device, "
                              f"the {role} resolves to {device}")
        try:
            import bitsandbytes  # noqa: F401  (optional [gpu] extra)
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise ImportError(f"model.load_in_4bit needs bitsandbytes ({e}): {GPU_EXTRA}") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0}
    if p.device_map:
        if device.type != "cuda":
            raise DeviceError(f"model.device_map = {p.device_map!r} spreads the LLM over GPUs, but the LLM "
                              f"resolves to {device}; remove device_map or run on a CUDA machine")
        try:
            # deferred: accelerate is the optional [gpu] extra, needed only by device_map
            import accelerate  # noqa: F401
        except ImportError as e:
            raise ImportError(f"model.device_map = 'auto' needs accelerate ({e}): {GPU_EXTRA}") from None
        kwargs["device_map"] = p.device_map
    return kwargs, device, dtype


def input_device(model) -> torch.device:
    """Where a model's inputs go: its input embeddings' device (the first shard under ``device_map``)."""
    return model.get_input_embeddings().weight.device


def compute_dtype(model) -> torch.dtype:
    """The dtype a model's base weights compute in (the input embeddings' dtype; 4-bit models: the
    compute dtype bitsandbytes was given)."""
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    if q is not None and getattr(q, "bnb_4bit_compute_dtype", None) is not None:
        return q.bnb_4bit_compute_dtype
    return model.get_input_embeddings().weight.dtype


def autocast(model) -> contextlib.AbstractContextManager:
    """Autocast to the model's compute dtype when that is bf16/fp16; a no-op in fp32 (bit-identical to no
    autocast at all)."""
    dtype = compute_dtype(model)
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(input_device(model).type, dtype=dtype)


def grad_scaler(models) -> torch.amp.GradScaler | None:
    """A GradScaler when any model computes in fp16 (its gradients would underflow); else None."""
    for m in models:
        if compute_dtype(m) == torch.float16:
            return torch.amp.GradScaler(input_device(m).type)
    return None


@contextlib.contextmanager
def train_mode(*models) -> Iterator[None]:
    """The models in train mode inside the block, in eval mode after (fedkt keeps idle models in eval)."""
    for m in models:
        m.train()
    try:
        yield
    finally:
        for m in models:
            m.eval()
