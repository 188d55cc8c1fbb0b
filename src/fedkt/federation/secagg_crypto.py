"""Cryptographic randomness for Flower's SecAgg+ (flwr 1.41), applied identically on clients and server.

flwr 1.41 (and 1.42, the newest release on the index) expands every mask seed with
``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen``: it XOR-folds the 32-byte seed (a
client's private mask seed ``rd_seed``, or a pairwise ECDH+HKDF key) into a **32-bit** integer and seeds
numpy's Mersenne Twister with it (flwr issue #7522). A mask therefore has at most 2^32 possible values: a
server holding a masked vector can try every 32-bit seed, and the masks are not even computationally
pseudo-random (MT19937 is predictable from its output). It also draws from ``[0, num_range - 1)``, never
``num_range - 1``.

:func:`mask_prg` replaces it: AES-256 in counter mode keyed by SHA-256(domain || the full seed) yields 8
bytes per mask element, reduced modulo ``num_range`` (exactly uniform when ``num_range`` is a power of two, as
fedkt's ``secagg_modulus_range`` must be). Client (``secaggplus_mod``) and server (``SecAggPlusWorkflow``) must
expand the same seed to the same mask, so :func:`install` patches the name in both flwr modules; fedkt's
secure-aggregation messages carry :data:`PRG_ID` and a node that does not run this PRG refuses to take part
(``flower_secagg``), so a mismatch fails loudly instead of returning a garbage mean.

Stochastic rounding (``flwr...quantization._stochastic_round``, numpy's global generator, which fedkt used
to seed from a public per-round seed) is replaced by :func:`stochastic_round`: uniforms from ``os.urandom``,
fresh on every call, so the rounding noise of a round is neither reproducible nor derivable from any seed.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # comes with flwr

from fedkt.federation import flower_codec  # noqa: F401  (sets FLOWER_ENV before flwr is imported)

from flwr.common.secure_aggregation import quantization, secaggplus_utils  # noqa: E402

PRG_ID = "aes256ctr-sha256-v1"
"""Names the mask expansion; sent with every secure-aggregation request and checked by the node."""
_DOMAIN = b"fedkt-secagg-mask-v1"


def mask_prg(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks uniform in ``[0, num_range)`` for each shape in ``dimensions_list``, expanded from the whole
    ``seed`` with AES-256-CTR (drop-in for flwr's ``pseudo_rand_gen``)."""
    if not 1 < num_range <= 2**62:
        raise ValueError(f"mask range {num_range} must be in (1, 2^62]")
    key = hashlib.sha256(_DOMAIN + bytes(seed)).digest()
    sizes = [int(np.prod(d, dtype=np.int64)) if len(d) else 1 for d in dimensions_list]
    total = sum(sizes)
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    stream = enc.update(b"\0" * (8 * total)) + enc.finalize()
    values = (np.frombuffer(stream, dtype="<u8") % np.uint64(num_range)).astype(np.int64)
    out, pos = [], 0
    for d, n in zip(dimensions_list, sizes):
        chunk = values[pos:pos + n]
        out.append(np.array(chunk[0], dtype=np.int64) if len(d) == 0 else chunk.reshape(d))
        pos += n
    return out


def uniform01(shape: tuple[int, ...]) -> np.ndarray:
    """Uniforms in [0, 1) from the OS CSPRNG (53 random bits each)."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    bits = np.frombuffer(os.urandom(8 * n), dtype="<u8") >> np.uint64(11)
    u = bits.astype(np.float64) * 2.0**-53
    return u.reshape(shape) if shape else u[0]


def stochastic_round(arr: Any) -> np.ndarray:
    """flwr's stochastic rounding (``ceil``, minus 1 with probability ``ceil(x) - x``) with CSPRNG uniforms."""
    ret = np.ceil(arr).astype(np.int32)
    rand = uniform01(tuple(np.shape(ret)))
    if ret.ndim == 0:
        if rand < ret - arr:
            ret -= 1
    else:
        ret[rand < ret - arr] -= 1
    return ret


def flwr_pseudo_rand_gen(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """flwr 1.41's own mask expansion (kept to show the weakness in tests and docs)."""
    return _ORIGINAL["prg"](seed, num_range, dimensions_list)


_ORIGINAL: dict[str, Any] = {}


def _modules() -> tuple[Any, Any]:
    """flwr's SecAgg+ client-mod and server-workflow *modules* (the packages re-export functions and
    classes under the same names, so the modules are taken from ``importlib``)."""
    return (importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod"),
            importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow"))


def install() -> None:
    """Patch flwr's SecAgg+ client mod and server workflow to :func:`mask_prg` and the rounding to
    :func:`stochastic_round` (idempotent; both sides of a fedkt deployment run it on import of
    ``fedkt.federation.flower_secagg``)."""
    client_mod, server_mod = _modules()
    _ORIGINAL.setdefault("prg", secaggplus_utils.pseudo_rand_gen)
    _ORIGINAL.setdefault("round", quantization._stochastic_round)
    for mod in (client_mod, server_mod, secaggplus_utils):
        mod.pseudo_rand_gen = mask_prg
    quantization._stochastic_round = stochastic_round


def installed() -> bool:
    """Whether this process runs fedkt's PRG in both flwr modules (checked before a node takes part)."""
    client_mod, server_mod = _modules()
    return (client_mod.pseudo_rand_gen is mask_prg and server_mod.pseudo_rand_gen is mask_prg
            and quantization._stochastic_round is stochastic_round)
