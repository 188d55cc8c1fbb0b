"""Randomness the server cannot know: where a client's privacy noise comes from.

A DP mechanism protects only if its random draws are unknown to the attacker: whoever knows the seed
of FedCoT's sampler can replay it and read the original tokens back (``tests/test_replay.py`` does). So
every privacy-relevant draw of a client (text-DP sampling, DP-SGD's Gaussian noise and Poisson
sampling) comes from one of three sources, and the client's replies say which (``meta.randomness``):

* ``csprng`` (a deployed client, the default): the OS CSPRNG (``os.urandom``; 64 bits of fresh entropy
  per uniform draw, far above 128 bits per call). Not reproducible, by design.
* ``secret_seed`` (a deployed client that pins ``secret_seed``, at least 64 bits): torch generators
  seeded with 64 bits derived (sha256) from the secret and the draw's purpose. Reproducible by whoever
  holds the secret, and only by them.
* ``simulation`` (the in-process simulator): seeds derived from the experiment seed, exactly as before
  (the golden runs stay bit-identical). The server knows them: the run's privacy figures are the
  mechanism's, not a deployment's, and the report says so.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import numpy as np
import torch

MIN_SECRET_BITS = 64
MODES = ("csprng", "secret_seed", "simulation")


def check_secret_seed(seed: Any) -> int:
    """A pinned ``secret_seed`` as an int: a hex string of at least 16 digits (``0x`` allowed) or an int of
    at least 64 bits. Anything shorter is refused (a 31-bit seed is brute-forced in minutes)."""
    hint = ("pin a random value of at least 64 bits, e.g. secret_seed = \"<output of python -c 'import secrets; "
            "print(secrets.token_hex(16))'>\" (128 bits), or remove secret_seed to draw from the OS CSPRNG")
    if isinstance(seed, str):
        s = seed.strip().lower().removeprefix("0x")
        if not s or any(c not in "0123456789abcdef" for c in s):
            raise ValueError(f"secret_seed = {seed!r} is not a hex string; {hint}")
        if len(s) * 4 < MIN_SECRET_BITS:
            raise ValueError(f"secret_seed = {seed!r} has {len(s) * 4} bits (< {MIN_SECRET_BITS}); {hint}")
        return int(s, 16)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"secret_seed = {seed!r} must be a hex string; {hint}")
    if seed < 0 or seed.bit_length() < MIN_SECRET_BITS:
        raise ValueError(f"secret_seed = {seed} has {max(seed, 0).bit_length()} bits (< {MIN_SECRET_BITS}); {hint}")
    return seed


def derive64(secret: int, *purpose: Any) -> int:
    """64 bits derived from a pinned secret and a purpose (sha256): a torch.Generator's full seed range."""
    h = hashlib.sha256(f"fedkt-secret/{secret:x}/".encode() + "/".join(map(str, purpose)).encode()).digest()
    return int.from_bytes(h[:8], "little")


class PinnedRandom:
    """The ``secret_seed`` source: torch generators seeded with 64 bits derived from the secret."""

    mode = "secret_seed"

    def __init__(self, secret: int, *purpose: Any):
        self.secret, self.purpose = secret, purpose

    def generator(self, *sub: Any) -> torch.Generator:
        return torch.Generator().manual_seed(derive64(self.secret, *self.purpose, *sub))

    def int_seed(self, *sub: Any) -> int:
        """A 63-bit int seed (for APIs that take an int, e.g. sampling from a DP model)."""
        return derive64(self.secret, *self.purpose, *sub) >> 1


class SecureRandom:
    """The ``csprng`` source: uniforms and normals built from ``os.urandom``."""

    mode = "csprng"

    def rand(self, shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Uniform in [0, 1): 53 random bits per value from the OS CSPRNG."""
        shape = tuple(shape) if not isinstance(shape, int) else (shape,)
        n = math.prod(shape)
        raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) if n else np.zeros(0, dtype=np.uint64)
        u = (raw >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
        return torch.from_numpy(u.reshape(shape)).to(dtype)

    def normal(self, shape, std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, std²): Box–Muller over CSPRNG uniforms in float64, as the sum of four draws / 2 (the
        floating-point-attack mitigation Opacus's secure_mode uses), cast to ``dtype``."""
        shape = tuple(shape)
        acc = torch.zeros(shape, dtype=torch.float64)
        for _ in range(4):
            u1, u2 = self.rand(shape), self.rand(shape)
            acc += torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)
        return (acc * (std / 2)).to(dtype)

    def int_seed(self, *sub: Any) -> int:
        return int.from_bytes(os.urandom(8), "little") >> 1

    def generator(self, *sub: Any) -> torch.Generator:
        """A torch generator with a fresh 64-bit CSPRNG seed (for draws outside the privacy argument)."""
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def describe(mode: str) -> str:
    """One sentence for the report."""
    return {"csprng": "drawn from the client's OS CSPRNG: unknown to the server, not reproducible",
            "secret_seed": "drawn from the client's pinned secret_seed: reproducible by whoever holds that secret",
            "simulation": "derived from the experiment seed (simulation): known to the server, reproducible; "
                          "a deployment draws from the OS CSPRNG"}[mode]
