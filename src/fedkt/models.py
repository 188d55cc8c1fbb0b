"""Loading causal LMs and tokenizers; LoRA adapters through peft.

A model spec is one of:
  * ``builtin:NAME``   a built-in offline model (``fedkt models`` lists them; fetched once into the cache)
  * a local Hugging Face model directory
  * a ``.gguf`` file (dequantised by transformers; needs the ``gguf`` package)
  * ``hf:ORG/NAME``    a hub id; needs network access, never used by tests or examples
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from fedkt import devices
from fedkt.builtin_models import ensure_builtin
from fedkt.config import LoraSettings, Placement


class ModelLoadError(RuntimeError):
    pass


def _clear_quantizer(model) -> None:
    """A GGUF-loaded model is an ordinary dequantised fp32 model, but transformers marks it quantised,
    which peft and save_pretrained reject. Clear the marks."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def prepare_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_gguf(path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _clear_quantizer(model)
    return model, prepare_tokenizer(tok)


def resolve(spec: str) -> str | Path:
    """Turn a spec into something ``from_pretrained`` takes (building a built-in model if needed)."""
    if not spec:
        raise ModelLoadError("empty model spec; give builtin:NAME, a local directory, a .gguf file or hf:ORG/NAME")
    if spec.startswith("builtin:"):
        return ensure_builtin(spec.split(":", 1)[1], load_model)
    if spec.startswith("hf:"):
        return spec[3:]
    if spec.startswith("openai:"):
        raise ModelLoadError(f"model {spec!r} is an OpenAI-compatible server: fedkt can only ask it for text (FedCoT's "
                             f"rationales); methods that score or train the LLM need a local model")
    p = Path(spec).expanduser()
    if p.exists():
        return p
    raise ModelLoadError(
        f"model {spec!r} is neither an existing path nor builtin:NAME / hf:ORG/NAME "
        f"(built-ins: builtin:smollm2-135m, builtin:smollm2-slm)"
    )


def load_model(spec: str, dtype: str = "float32", placement: Placement | None = None, role: str = "slm"):
    """Load (model, tokenizer) in eval mode with all weights frozen, on ``placement``'s device and dtype
    (default: the cpu in ``dtype``); see ``fedkt.devices`` and docs/devices.md."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    placement = placement or Placement(device="cpu", dtype=dtype)
    kwargs, device, torch_dtype = devices.load_kwargs(placement, role)
    target = resolve(spec)
    try:
        if isinstance(target, Path) and target.suffix == ".gguf":
            if len(kwargs) > 1:
                raise ModelLoadError(f"model {spec!r}: a .gguf file is dequantised on load; load_in_4bit and "
                                     f"device_map need a Hugging Face model directory")
            model, tok = load_gguf(target)
        else:
            model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
            tok = prepare_tokenizer(AutoTokenizer.from_pretrained(target))
    except OSError as e:
        raise ModelLoadError(
            f"could not load model {spec!r}: {e}\nOffline, hub ids cannot be fetched: download the model "
            f"where the hub is reachable and pass its local directory instead."
        ) from None
    if "device_map" not in kwargs:  # placed by accelerate / bitsandbytes otherwise
        model.to(device=device, dtype=torch_dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if placement.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=placement.gradient_checkpointing)
    elif placement.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tok


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (tied weights counted once) in their current dtype."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


# --------------------------------------------------------------------------------------------------
# LoRA


def add_lora(model, cfg: LoraSettings, seed: int = 0):
    """Wrap ``model`` with a fresh LoRA adapter (peft). Only the adapter's parameters train."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(
            model,
            LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                       target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"),
        )
    return peft_model


_ADAPTER_MAP = "_fedkt_adapter_params"  # attribute of a peft model holding its cached name -> parameter map


def _adapter_signature(model) -> tuple:
    """What the adapter layout depends on besides the parameter objects: the adapters and the active one."""
    cfg = getattr(model, "peft_config", None) or {}
    return (id(cfg), tuple((k, id(v)) for k, v in cfg.items()), str(getattr(model, "active_adapter", None)))


def _adapter_params(model) -> dict[str, torch.nn.Parameter] | None:
    """peft's adapter state-dict keys -> the model's own LoRA parameters, cached on the model.

    ``get_peft_model_state_dict`` walks the whole ``state_dict()`` of the model on every call (hundreds of
    base tensors for a handful of LoRA ones); the map is built from it once and reused while the same
    adapters are active and every cached parameter is still the one its module holds (a reloaded or
    replaced adapter rebuilds it). None when a key is not a parameter (peft's path is used then)."""
    from peft import get_peft_model_state_dict

    cached = model.__dict__.get(_ADAPTER_MAP)
    sig = _adapter_signature(model)
    if cached is not None and cached[0] == sig and all(getattr(m, a, None) is p for m, a, p in cached[2]):
        return cached[1]
    by_ptr = {}
    for name, p in model.named_parameters():
        by_ptr.setdefault((p.data_ptr(), tuple(p.shape), p.stride()), (name, p))
    params, slots = {}, []
    for key, t in get_peft_model_state_dict(model).items():
        hit = by_ptr.get((t.data_ptr(), tuple(t.shape), t.stride()))
        if hit is None:
            model.__dict__.pop(_ADAPTER_MAP, None)
            return None
        name, p = hit
        mod, _, attr = name.rpartition(".")
        params[key] = p
        slots.append((model.get_submodule(mod), attr, p))
    model.__dict__[_ADAPTER_MAP] = (sig, params, slots)
    return params


def get_adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's weights as a dict of detached CPU tensors (peft key names), copied from the cached
    key -> parameter map (equal to ``get_peft_model_state_dict``, tested)."""
    params = _adapter_params(model)
    if params is None:
        from peft import get_peft_model_state_dict

        params = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", copy=True) for k, v in params.items()}


def set_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (peft key names) into the adapter's parameters in place (``copy_``, casting to each
    parameter's device and dtype): what ``set_peft_model_state_dict`` does, without its state-dict walk."""
    params = _adapter_params(model)
    if params is None:
        from peft import get_peft_model_state_dict

        params = get_peft_model_state_dict(model)
    missing = set(params) - set(state)
    unexpected = set(state) - set(params)
    if missing or unexpected:
        raise ValueError(f"adapter state does not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    bad = [k for k, p in params.items() if tuple(state[k].shape) != tuple(p.shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"adapter state does not match the model: {k} has shape {tuple(state[k].shape)}, the "
                         f"model's is {tuple(params[k].shape)} (a different LoRA rank or target?)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


@dataclass
class LoadedModel:
    """A loaded causal LM with a LoRA adapter: what a role (server LLM, server SLM, a client's SLM) holds.

    ``init_adapter`` is the fresh adapter the model was wrapped with (B = 0: the identity), from the seed
    the caller chose; two loads of the same spec with the same LoRA settings and seed have equal ones."""

    spec: str
    model: Any
    """peft model; base weights frozen, only the adapter trains."""
    tokenizer: Any
    init_adapter: dict[str, torch.Tensor]

    @property
    def base_params(self) -> int:
        """The base model's own parameters (peft's injected adapter weights taken out again)."""
        return count_parameters(self.model.get_base_model()) - sum(v.numel() for v in self.init_adapter.values())

    @property
    def base_nbytes(self) -> int:
        return model_nbytes(self.model.get_base_model()) - adapter_nbytes(self.init_adapter)

    def use(self, state: dict[str, torch.Tensor] | None) -> Any:
        """Set ``state`` (None: the initial adapter) into the model and return the model."""
        set_adapter_state(self.model, self.init_adapter if state is None else state)
        return self.model

    def describe(self) -> dict[str, Any]:
        adapter = adapter_nbytes(self.init_adapter)
        return {"spec": self.spec, "params": self.base_params, "model_bytes": self.base_nbytes,
                "adapter_params": sum(v.numel() for v in self.init_adapter.values()),
                "adapter_bytes": adapter, "adapter_fraction": adapter / self.base_nbytes,
                "device": str(devices.input_device(self.model)),
                "dtype": str(devices.compute_dtype(self.model)).removeprefix("torch.")}


def load_lora_model(spec: str, placement: Placement | str, lora: LoraSettings, seed: int,
                    role: str = "slm") -> LoadedModel:
    """``load_model`` + a fresh LoRA adapter initialised from ``seed``; ``placement`` may be a bare dtype
    name (on the cpu)."""
    if isinstance(placement, str):
        placement = Placement(device="cpu", dtype=placement)
    model, tok = load_model(spec, placement=placement, role=role)
    model = add_lora(model, lora, seed=seed)
    return LoadedModel(spec, model, tok, get_adapter_state(model))


def adapter_nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def save_adapter(model, state: dict[str, torch.Tensor] | None, path: str | Path) -> None:
    """Save an adapter in peft format (loadable with ``PeftModel.from_pretrained``)."""
    if state is not None:
        set_adapter_state(model, state)
    model.save_pretrained(str(path))


def load_adapter_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a peft adapter directory's weights (peft key names, as ``get_adapter_state`` gives)."""
    f = Path(path) / "adapter_model.safetensors"
    if not f.is_file():
        raise ModelLoadError(f"{path} holds no adapter_model.safetensors (not a peft adapter directory)")
    return load_file(str(f))
