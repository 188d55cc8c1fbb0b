"""The FedCoT client's own check of the text-DP kit it perturbs with.

The kit (``text_dp_kit.EmbeddingKit``) defines the exponential mechanism's utilities; an edited kit can
switch the DP off (a token alone in its class, a neighbour listed twice, utilities outside [-1, 0]). So
the client never trusts a server-named kit file: it either builds the kit itself from a local model
(``policy.fedcot_kit_model``) or loads the server's file, checks its sha256 against the policy's pins
(``policy.fedcot_kit_sha256``) and validates it against its own tokenizer (:func:`validate_kit`).

What :func:`validate_kit` establishes is exactly what the DP proof (``text_dp``'s docstring) uses:
sensitivity 1 with every utility finite and in [-1, 0]; for every covered token, its neighbour list
starts with itself at u = 0, holds no token twice, and only covered tokens of its own class; with the
rank utility, the utilities are exactly -j/N (so Z(t) is the same for every token of a class); the
classes and the covered set are the ones the client computes from its own tokenizer (covered may only
shrink, never grow, and no class may be empty). Then the mechanism is ε-DP whatever neighbours the
kit lists: a bad neighbour list costs utility, not privacy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fedkt.models import load_model
from fedkt.privacy.policy import PolicyViolation
from fedkt.privacy.text_dp_kit import (
    CLASS_SCHEMES,
    KIT_FORMAT,
    SENSITIVITY,
    UTILITIES,
    EmbeddingKit,
    token_classes,
    tokenizer_fingerprint,
)

from fedkt.models import load_model
from fedkt.privacy.policy import PolicyViolation


class KitValidationError(ValueError):
    """A text-DP kit that does not give the DP guarantee it claims; the client refuses to use it."""


def kit_sha256(path: str | Path) -> str:
    """sha256 of a kit directory's two files (``kit.json`` then ``kit.safetensors``)."""
    h = hashlib.sha256()
    for name in ("kit.json", "kit.safetensors"):
        with open(Path(path) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def validate_kit(kit: EmbeddingKit, tok, where: str = "the kit") -> None:
    """Raise :class:`KitValidationError` unless ``kit`` gives ε-DP with this tokenizer (module docstring)."""
    def fail(reason: str):
        raise KitValidationError(f"{where} fails validation: {reason}; the client refuses to perturb with it "
                                 "(an edited kit can switch the text DP off): use the kit built for this "
                                 "model, or set policy.fedcot_kit_model to build it locally")

    m = kit.meta
    if m.get("format") != KIT_FORMAT:
        fail(f"format {m.get('format')!r}, expected {KIT_FORMAT!r}")
    if m.get("sensitivity") != SENSITIVITY:
        fail(f"sensitivity {m.get('sensitivity')!r}, the mechanism needs {SENSITIVITY}")
    if m.get("utility") not in UTILITIES or m.get("classes") not in CLASS_SCHEMES:
        fail(f"utility {m.get('utility')!r} / classes {m.get('classes')!r} are not fedkt's")
    V, N = kit.neighbors.shape if kit.neighbors.dim() == 2 else (0, 0)
    shapes = {"neighbors": (kit.neighbors, (V, N), torch.int32), "utility": (kit.utility, (V, N), torch.float32),
              "radius": (kit.radius, (V,), torch.float32), "token_class": (kit.token_class, (V,), torch.int8),
              "covered": (kit.covered, (V,), torch.bool)}
    for name, (t, shape, dtype) in shapes.items():
        if tuple(t.shape) != shape or t.dtype != dtype:
            fail(f"{name} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
    if V == 0 or N < 1 or V != m.get("vocab_size") or N != m.get("n_neighbors"):
        fail(f"a {V} x {N} table, but kit.json says {m.get('vocab_size')} x {m.get('n_neighbors')}")
    if tok is None:
        fail("no tokenizer to check it against")
    if m.get("tokenizer_sha256") != tokenizer_fingerprint(tok):
        fail("it was built for another tokenizer (tokenizer_sha256 differs from this client's)")
    if not torch.isfinite(kit.utility).all() or kit.utility.min() < -1 or kit.utility.max() > 0:
        fail("utilities are not all finite and in [-1, 0] (the sensitivity bound)")
    own_cls, own_cov = token_classes(tok, V, m["classes"])
    if not torch.equal(kit.token_class, own_cls):
        fail(f"token classes differ from this tokenizer's ({int((kit.token_class != own_cls).sum())} tokens)")
    if (kit.covered & ~own_cov).any():
        fail(f"{int((kit.covered & ~own_cov).sum())} tokens are covered that this tokenizer does not cover")
    rows = torch.nonzero(kit.covered).flatten()
    n_cls = int(own_cls.max()) + 1
    sizes = torch.stack([(kit.covered & (kit.token_class == k)).sum() for k in range(n_cls)])
    if (sizes == 0).any():
        fail("a token class has no covered token")
    nb, u = kit.neighbors[rows].long(), kit.utility[rows]
    if (nb < 0).any() or (nb >= V).any():
        fail("neighbour ids outside the vocabulary")
    if not (torch.equal(nb[:, 0], rows) and (u[:, 0] == 0).all()):
        fail("a covered token's first neighbour is not itself at utility 0")
    valid = u > -1
    nbv = torch.where(valid, nb, -1 - torch.arange(N).expand_as(nb))  # invalid entries: distinct sentinels
    srt = torch.sort(nbv, dim=1).values
    if (srt[:, 1:] == srt[:, :-1]).any():
        fail("a neighbour list names the same token twice (its weight would be counted twice)")
    cls_row = kit.token_class[rows][:, None].expand_as(nb)
    if (valid & ((kit.token_class[nb] != cls_row) | ~kit.covered[nb])).any():
        fail("a neighbour list holds an uncovered token or a token of another class")
    if m["utility"] == "rank":
        size = sizes[kit.token_class[rows].long()]
        j = torch.arange(N)[None, :]
        want = torch.where(j < torch.clamp(size, max=N)[:, None], -j.float() / N, torch.tensor(-1.0))
        if not torch.equal(u, want):
            fail("rank utilities are not exactly -j/N (the normaliser would differ between tokens)")


def client_kit(ctx, meta: dict) -> EmbeddingKit:
    """The kit this client perturbs with, per its policy (module docstring); raises PolicyViolation or
    KitValidationError when the server's kit is not acceptable."""
    p, tok = ctx.policy, ctx.slm.tokenizer
    if p.fedcot_kit_model:  # built here from the client's own copy of the model
        model, mtok = load_model(p.fedcot_kit_model)
        kit = EmbeddingKit.for_model(mtok, model.get_input_embeddings().weight.detach(),
                                     n_neighbors=int(meta.get("kit_neighbors", 64)))
        validate_kit(kit, tok, where=f"the kit built from {p.fedcot_kit_model}")
        return kit
    path = str(meta.get("kit", ""))
    if not path or not (Path(path) / "kit.json").is_file():
        raise FileNotFoundError(f"the server named the text-DP kit {path!r}, which this client does not hold; "
                                "copy the run's public/textdp_kit here or set policy.fedcot_kit_model")
    if p.fedcot_kit_sha256:
        digest = kit_sha256(path)
        if digest not in p.fedcot_kit_sha256:
            raise PolicyViolation("fedcot_kit_sha256", [h[:12] + "…" for h in p.fedcot_kit_sha256], "fedcot.kit",
                                  f"{path} (sha256 {digest})", "the kit is not one this client pinned")
    kit = EmbeddingKit.load(path)
    validate_kit(kit, tok, where=f"the text-DP kit {path}")
    return kit
