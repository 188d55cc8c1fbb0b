"""A derived model as a compact, exactly reproducible delta on its parent.

``fedkt derive-slm --rank R`` heals the cut model through a rank-R update of every linear layer of the
kept blocks (plus their RMS/LayerNorm weights) instead of changing every weight. At the end the factors
are quantised to int16 and merged into the weights with integer arithmetic, so the delta that ships
(a few MB) rebuilds the *same bits* on any machine:

    W' = fp32( fp64(W) + fp64(Bq @ Aq) * sB[:, None] * sA[None, :] )

``Bq @ Aq`` is an int64 matrix product (exact, whatever the BLAS or summation order); everything after it
is element-wise IEEE arithmetic, which is deterministic. The model that is evaluated and saved is this
merged one, so the figures measured on it hold for every rebuild; :func:`state_sha256` checks that.

Files: ``fedkt_delta.safetensors`` holds, per healed linear layer ``NAME``, ``NAME.Aq`` (int16, r x in),
``NAME.sA`` (fp32, in), ``NAME.Bq`` (int16, out x r), ``NAME.sB`` (fp32, out), and the healed norm
weights verbatim (fp32); ``fedkt_derive.json`` (the card) holds the parent, the kept layers, the rank and
the sha256 of the parent's and of the merged model's weights.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

QMAX = 32767


class DeltaLinear(nn.Module):
    """``base(x) + (x Aᵀ) Bᵀ``: a frozen linear layer plus a trainable rank-r update (B starts at 0)."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5), generator=generator)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def _is_norm(name: str, module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() or name.rsplit(".", 1)[-1].endswith("norm")


def attach(model: nn.Module, block_prefix: str, rank: int, seed: int) -> list[nn.Parameter]:
    """Freeze ``model`` and wrap every ``nn.Linear`` under ``block_prefix`` in a :class:`DeltaLinear`;
    norm weights under the prefix train too. Returns the trainable parameters (in a fixed order)."""
    if rank < 1:
        raise ValueError(f"rank = {rank} must be >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    targets = [(n, m) for n, m in model.named_modules() if n.startswith(block_prefix) and isinstance(m, nn.Linear)]
    for name, lin in targets:
        parent_name, attr = name.rsplit(".", 1)
        wrapped = DeltaLinear(lin, min(rank, lin.in_features, lin.out_features), g)
        setattr(model.get_submodule(parent_name), attr, wrapped)
        params += [wrapped.a, wrapped.b]
    for name, m in model.named_modules():
        if name.startswith(block_prefix) and _is_norm(name, m):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
                params.append(p)
    if not targets:
        raise ValueError(f"no nn.Linear layers under {block_prefix!r}")
    return params


def quantise(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """int16 factors with per-input-column (A) and per-output-row (B) fp32 scales."""
    a, b = a.detach().float(), b.detach().float()
    sa = (a.abs().amax(0) / QMAX).clamp_min(1e-30)
    sb = (b.abs().amax(1) / QMAX).clamp_min(1e-30)
    return {"Aq": torch.round(a / sa).to(torch.int16), "sA": sa,
            "Bq": torch.round(b / sb[:, None]).to(torch.int16), "sB": sb}


def merged_weight(weight: torch.Tensor, q: dict[str, torch.Tensor]) -> torch.Tensor:
    """The exact, machine-independent merge of quantised factors into ``weight`` (see module doc)."""
    prod = q["Bq"].long() @ q["Aq"].long()
    delta = prod.double() * q["sB"].double()[:, None] * q["sA"].double()[None, :]
    return (weight.double() + delta).to(weight.dtype)


def detach_merged(model: nn.Module) -> dict[str, torch.Tensor]:
    """Replace every :class:`DeltaLinear` by its base layer with the quantised update merged in; returns
    the delta (factors and healed norm weights) as a flat tensor dict, keyed by module name."""
    delta: dict[str, torch.Tensor] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, DeltaLinear):
            q = quantise(m.a, m.b)
            with torch.no_grad():
                m.base.weight.copy_(merged_weight(m.base.weight, q))
            parent_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr, m.base)
            delta.update({f"{name}.{k}": v.contiguous() for k, v in q.items()})
    for name, p in model.named_parameters():
        if p.requires_grad:
            delta[name] = p.detach().clone().contiguous()
        p.requires_grad_(False)
    return delta


def apply_delta(model: nn.Module, delta: dict[str, torch.Tensor]) -> None:
    """Rebuild a healed model from its unhealed cut and a delta written by :func:`detach_merged`."""
    params = dict(model.named_parameters())
    factors = {k.rsplit(".", 1)[0] for k in delta if k.endswith(".Aq")}
    with torch.no_grad():
        for name in sorted(factors):
            w = params.get(f"{name}.weight")
            if w is None:
                raise ValueError(f"delta names layer {name!r}, which the model does not have")
            q = {k: delta[f"{name}.{k}"] for k in ("Aq", "sA", "Bq", "sB")}
            w.copy_(merged_weight(w, q))
        for key, value in delta.items():
            if key.rsplit(".", 1)[0] in factors:
                continue
            if key not in params or params[key].shape != value.shape:
                raise ValueError(f"delta entry {key!r} does not match the model")
            params[key].copy_(value)


def state_sha256(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict (sorted names, raw bytes): equal hashes, equal bits."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_delta(delta: dict[str, torch.Tensor], path: Path) -> None:
    save_file(delta, str(path))


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
