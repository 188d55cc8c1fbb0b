"""The text-DP kit: the top-N neighbour table of the server LLM's public token embeddings that *defines* the
exponential mechanism's utilities (:mod:`fedkt.privacy.text_dp` samples from it).

**N.** ``N = 64`` by default. Memory: 64 (int32 index, float32 utility) pairs per token, 24 MB for
SmolLM2's 49,152 tokens. Semantics: with the rank utility, neighbour ``j`` weighs ``exp(-eps j / N)``
relative to the token itself, so N sets how far down the neighbour list the mass spreads; with N = 64
at eps = 10-15 most of it falls on the first ~10 neighbours, which on SmolLM2 are still near synonyms
or inflections (further down they drift off topic). N is part of the utility's definition and of the
kit's cache key.

**Classes (word boundaries).** Byte-level BPE vocabularies hold word-start pieces (``Ġthe`` = " the")
and continuation pieces (``ing``). Replacing one by the other glues or splits words, so by default
(``classes="word_start"``) a token is replaced only by a token of the same class: the output stays
readable, and the price is that the class pattern (where words start, i.e. the word segmentation) is
disclosed, as is the number of tokens. ``classes="none"`` gives one class: DP between any two tokens.

**Coverage (nothing passes through verbatim).** The covered vocabulary ``C`` (the only possible outputs)
holds the tokens that decode on their own to non-empty valid UTF-8 text without control characters
(newline and tab allowed) and have a finite embedding;
special tokens (BOS/EOS/pad, chat markers, every ``special`` added token) and lone UTF-8 byte pieces are
uncovered, so they are never emitted. An input token that is uncovered (a special token typed into the
text, a byte piece of a non-Latin character, a row past the tokenizer) has no meaningful utility; it is
given the constant utility -1, which makes the mechanism draw uniformly from its class: still the same
eps-DP mechanism, and its output says nothing about it. Numbers, names and rare words are ordinary
covered tokens and are perturbed like any other; at finite eps no token is exempt.

**Neighbour search.** The kit is built in row chunks (never a V x V matrix): a bfloat16 matmul proposes
``N + 1 + margin`` candidates per token, and exact float32 distances re-rank them. Whatever the search
returns, the kit *defines* ``u`` (tokens outside the stored list have u = -1), so the DP guarantee does
not depend on the search being exact; the benchmark measures its recall against exact search.

Files: a kit is ``kit.safetensors`` (neighbours, utilities, radius, class, coverage) plus ``kit.json``
(fingerprint of the embedding matrix and tokenizer, N, the utility's definition).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

KIT_FORMAT = "fedkt-textdp-kit/1"
DEFAULT_N = 64
SENSITIVITY = 1.0
UTILITIES = {
    "rank": ("u(t, t_j) = -j/N for t_j the j-th nearest covered token of class(t) by euclidean distance "
             "(j = 0..N-1, t_0 = t), else -1; u in [-1, 0]"),
    "distance": ("u(t,t') = -min(||e_t - e_t'||_2 / r(t), 1) for t' among the N nearest covered tokens of "
                 "class(t) (t itself included), else -1; r(t) = distance to the (N+1)-th nearest; u in [-1, 0]"),
}
CLASS_SCHEMES = ("word_start", "none")
_WORD_START_MARKS = ("Ġ", "▁", "Ċ", "ĉ")


class KitMismatchError(ValueError):
    """A kit was built for another embedding matrix or tokenizer."""


# --------------------------------------------------------------------------------------------- paths


def textdp_cache_dir() -> Path:
    """``$FEDKT_CACHE/textdp`` (default ``~/.cache/fedkt/textdp``), created if missing."""
    d = Path(os.environ.get("FEDKT_CACHE", Path.home() / ".cache" / "fedkt")) / "textdp"
    d.mkdir(parents=True, exist_ok=True)
    return d


# -------------------------------------------------------------------------------------- fingerprints


def embedding_fingerprint(embeddings: torch.Tensor) -> str:
    """sha256 of the shape and a fixed sample of rows (every 7th row and the last 256, float32 bytes).

    Sampling keeps the check at ~0.1 s for a 49k x 576 matrix (hashing all of it takes ~0.7 s); it
    tells apart different models and retrained embeddings, not an adversarial edit of a single row."""
    e = _as_f32(embeddings)
    h = hashlib.sha256(f"{tuple(e.shape)}|float32|".encode())
    h.update(e[::7].contiguous().numpy().tobytes())
    h.update(e[-256:].contiguous().numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the token strings in id order and the special-token ids."""
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    h = hashlib.sha256("\x00".join(p if p is not None else "" for p in pieces).encode())
    h.update(json.dumps(sorted(_special_ids(tok))).encode())
    return h.hexdigest()


def _as_f32(embeddings: torch.Tensor) -> torch.Tensor:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise TypeError("embeddings must be a 2-D tensor (vocab x dim), e.g. model.get_input_embeddings().weight")
    return embeddings.detach().to("cpu", torch.float32).contiguous()


def _special_ids(tok) -> set[int]:
    ids = set(int(i) for i in (tok.all_special_ids or []))
    for i, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def _readable(text: str) -> bool:
    """Non-empty, valid UTF-8 on its own (no U+FFFD from a lone byte piece), no control characters."""
    return bool(text) and "\ufffd" not in text and all(c.isprintable() or c in "\n\t" for c in text)


def token_classes(tok, vocab_size: int, classes: str = "word_start") -> tuple[torch.Tensor, torch.Tensor]:
    """(class int8 [V], covered bool [V]) for the first ``vocab_size`` ids (see the module docstring)."""
    if classes not in CLASS_SCHEMES:
        raise ValueError(f"classes = {classes!r} is not allowed; allowed values: {CLASS_SCHEMES}")
    cls = torch.zeros(vocab_size, dtype=torch.int8)
    covered = torch.zeros(vocab_size, dtype=torch.bool)
    if tok is None:  # bare embedding space (tests, toy spaces): one class, every row covered
        covered[:] = True
        return cls, covered
    n = min(len(tok), vocab_size)
    texts = tok.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    special = _special_ids(tok)
    for i, (text, piece) in enumerate(zip(texts, pieces)):  # build time only, once per tokenizer
        covered[i] = i not in special and _readable(text)
        if classes == "word_start":
            cls[i] = int(text[:1].isspace() or (piece or "").startswith(_WORD_START_MARKS))
    return cls, covered


# ---------------------------------------------------------------------------------------------- kit


@dataclass
class EmbeddingKit:
    """Top-N neighbour table of an embedding matrix: everything the mechanism needs, O(V N) memory.

    ``neighbors`` int32 [V, N] (row t: the N nearest covered tokens of t's class, nearest first, t first
    when t is covered; rows of uncovered tokens are unused), ``utility`` float32 [V, N] in [-1, 0],
    ``radius`` float32 [V] (r(t)), ``token_class`` int8 [V], ``covered`` bool [V], ``meta`` (fingerprint)."""

    neighbors: torch.Tensor
    utility: torch.Tensor
    radius: torch.Tensor
    token_class: torch.Tensor
    covered: torch.Tensor
    meta: dict[str, Any]
    _members: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    # ---- properties

    @property
    def vocab_size(self) -> int:
        return int(self.neighbors.shape[0])

    @property
    def n_neighbors(self) -> int:
        return int(self.neighbors.shape[1])

    @property
    def exponent_scale(self) -> float:
        """``c`` in ``P(t'|t) ∝ exp(c * eps * u(t, t'))``: 1 for the rank utility, 1/2 for distance."""
        return 1.0 if self.meta.get("utility", "rank") == "rank" else 0.5

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.neighbors, self.utility, self.radius, self.token_class, self.covered))

    def class_members(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(members int64: covered ids grouped by class, offsets [n_classes], sizes [n_classes])."""
        if self._members is None:
            n_cls = int(self.token_class.max()) + 1 if self.vocab_size else 1
            groups = [torch.nonzero(self.covered & (self.token_class == k)).flatten() for k in range(n_cls)]
            sizes = torch.tensor([len(g) for g in groups], dtype=torch.long)
            offsets = torch.cumsum(sizes, 0) - sizes
            self._members = (torch.cat(groups), offsets, sizes)
        return self._members

    # ---- build

    @classmethod
    def build(cls, embeddings: torch.Tensor, tok=None, n_neighbors: int = DEFAULT_N, classes: str = "word_start",
              utility: str = "rank",
              search_dtype: torch.dtype = torch.bfloat16, margin: int = 64, chunk: int = 1024) -> "EmbeddingKit":
        """Build the kit from an input-embedding matrix [V, d] and its tokenizer (``tok=None``: one class,
        every finite row covered). ``search_dtype=torch.float32`` makes the candidate search exact."""
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
        if utility not in UTILITIES:
            raise ValueError(f"utility = {utility!r} is not allowed; allowed values: {tuple(UTILITIES)}")
        t0 = time.perf_counter()
        emb = _as_f32(embeddings)
        V, d = emb.shape
        if tok is not None and len(tok) > V:
            raise ValueError(f"the tokenizer has {len(tok)} tokens but the embedding matrix only {V} rows; "
                             "pass the input embeddings of the model this tokenizer belongs to")
        tclass, covered = token_classes(tok, V, classes)
        covered &= torch.isfinite(emb).all(dim=1)
        N = n_neighbors
        neighbors = torch.arange(V, dtype=torch.int32)[:, None].repeat(1, N)  # unused rows: self, u = -1
        util = torch.full((V, N), -1.0)
        radius = torch.zeros(V)
        for k in range(int(tclass.max()) + 1):
            members = torch.nonzero(covered & (tclass == k)).flatten()
            if len(members) == 0:
                raise ValueError(f"token class {k} has no covered token; build with classes='none'")
            nb, ut, rad = _class_neighbors(emb[members], N, utility, search_dtype, margin, chunk)
            neighbors[members] = members[nb].to(torch.int32)
            util[members] = ut
            radius[members] = rad
        kit = cls(neighbors, util, radius, tclass, covered, {})
        sizes = kit.class_members()[2].tolist()
        kit.meta = {
            "format": KIT_FORMAT, "vocab_size": V, "dim": d,
            "embedding_sha256": embedding_fingerprint(emb),
            "tokenizer_sha256": tokenizer_fingerprint(tok) if tok is not None else None,
            "n_neighbors": N, "classes": classes, "utility": utility, "utility_def": UTILITIES[utility],
            "sensitivity": SENSITIVITY,
            "n_covered": int(covered.sum()), "class_sizes": sizes,
            "search": (f"{str(search_dtype).replace('torch.', '')} prefilter of N+1+{margin} candidates, "
                       "float32 re-rank"),
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        return kit

    @classmethod
    def for_model(cls, tok, embeddings: torch.Tensor, n_neighbors: int = DEFAULT_N, classes: str = "word_start",
                  utility: str = "rank", cache_dir: str | Path | None = None) -> "EmbeddingKit":
        """The kit for this (tokenizer, embeddings), loaded from the cache or built once and cached there."""
        fp = embedding_fingerprint(embeddings)
        tfp = tokenizer_fingerprint(tok) if tok is not None else "none"
        root = Path(cache_dir) if cache_dir is not None else textdp_cache_dir()
        path = root / f"{fp[:16]}-{tfp[:8]}-n{n_neighbors}-{classes}-{utility}"
        if (path / "kit.json").is_file():
            return cls.load(path, tok=tok, embeddings=embeddings)
        kit = cls.build(embeddings, tok, n_neighbors=n_neighbors, classes=classes, utility=utility)
        kit.save(path)
        return kit

    # ---- save / load

    def save(self, path: str | Path) -> Path:
        """Write ``kit.safetensors`` + ``kit.json`` into directory ``path`` (atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({"neighbors": self.neighbors.contiguous(), "utility": self.utility.contiguous(),
                   "radius": self.radius.contiguous(), "token_class": self.token_class.contiguous(),
                   "covered": self.covered.contiguous()}, str(tmp / "kit.safetensors"))
        (tmp / "kit.json").write_text(json.dumps(self.meta, indent=1) + "\n")
        if path.exists():
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, path: str | Path, tok=None, embeddings: torch.Tensor | None = None) -> "EmbeddingKit":
        """Load a saved kit; with ``tok`` / ``embeddings`` given, refuse a kit built for another model."""
        path = Path(path)
        if not (path / "kit.json").is_file() or not (path / "kit.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not a text-DP kit (needs kit.json + kit.safetensors); "
                                    "build one with EmbeddingKit.build(...).save(path) or EmbeddingKit.for_model")
        meta = json.loads((path / "kit.json").read_text())
        if meta.get("format") != KIT_FORMAT:
            raise KitMismatchError(f"{path}/kit.json has format {meta.get('format')!r}, expected {KIT_FORMAT!r}; "
                                   "rebuild the kit")
        t = load_file(str(path / "kit.safetensors"))
        kit = cls(t["neighbors"], t["utility"], t["radius"], t["token_class"], t["covered"], meta)
        kit.check_model(tok=tok, embeddings=embeddings, where=str(path))
        return kit

    def check_model(self, tok=None, embeddings: torch.Tensor | None = None, where: str = "the kit") -> None:
        """Raise KitMismatchError unless the kit was built for these embeddings / this tokenizer."""
        m = self.meta
        if embeddings is not None:
            shape = tuple(embeddings.shape)
            if shape != (m["vocab_size"], m["dim"]):
                raise KitMismatchError(
                    f"{where} was built for a {m['vocab_size']} x {m['dim']} embedding matrix, this model's is "
                    f"{shape[0]} x {shape[1]}: it belongs to another model; build a kit for this model "
                    "(EmbeddingKit.for_model(tok, model.get_input_embeddings().weight))")
            if embedding_fingerprint(embeddings) != m["embedding_sha256"]:
                raise KitMismatchError(
                    f"{where} was built for other embeddings (embedding_sha256 differs; same shape "
                    f"{shape[0]} x {shape[1]}): build a kit for this model with EmbeddingKit.for_model")
        if tok is not None and m.get("tokenizer_sha256") is not None:
            if tokenizer_fingerprint(tok) != m["tokenizer_sha256"]:
                raise KitMismatchError(f"{where} was built with another tokenizer (tokenizer_sha256 differs); "
                                       "build a kit for this tokenizer with EmbeddingKit.for_model")

    # ---- the distribution (dense; for tests and audits on small vocabularies)

    def transition_probs(self, token: int, epsilon: float) -> torch.Tensor:
        """P(t' | token) over the whole vocabulary as a float64 [V] tensor."""
        members, offsets, sizes = self.class_members()
        k = int(self.token_class[token])
        grp = members[offsets[k]: offsets[k] + sizes[k]]
        p = torch.zeros(self.vocab_size, dtype=torch.float64)
        if math.isinf(epsilon):
            p[token] = 1.0
            return p
        logw = torch.full((self.vocab_size,), -math.inf, dtype=torch.float64)
        a = epsilon * self.exponent_scale
        logw[grp] = -a
        if self.covered[token]:
            u = self.utility[token].double()
            nb = self.neighbors[token].long()
            valid = u > -1
            logw[nb[valid]] = a * u[valid]
        return torch.softmax(logw, 0)


def _class_neighbors(e: torch.Tensor, N: int, utility: str, search_dtype: torch.dtype, margin: int, chunk: int):
    """Top-N (by euclidean distance) within the rows of ``e`` [M, d], chunked over rows.

    Returns local indices [M, N] int64, utilities [M, N] float32, radius [M] float32. Score buffers are
    allocated once and reused (fresh ~100 MB allocations per chunk cost more in page faults than the
    matmul itself on a small machine)."""
    M = e.shape[0]
    n_keep = min(N + 1, M)  # N stored + the (N+1)-th that defines r(t)
    n_cand = min(N + 1 + margin, M)
    m = min(N, n_keep)
    es = e.to(search_dtype)
    half_sq = -0.5 * (e * e).sum(1)
    idx_out = torch.empty((M, N), dtype=torch.long)
    ut_out = torch.full((M, N), -1.0)
    rad_out = torch.empty(M)
    chunk = min(chunk, M)
    buf_s = torch.empty((chunk, M), dtype=search_dtype)
    buf_f = torch.empty((chunk, M), dtype=torch.float32) if search_dtype != torch.float32 else buf_s
    rank_u = -torch.arange(m, dtype=torch.float32) / N
    for s in range(0, M, chunk):
        rows = torch.arange(s, min(s + chunk, M))
        n = len(rows)
        # score_j = e_i . e_j - |e_j|^2 / 2 = (|e_i|^2 - |e_i - e_j|^2) / 2: larger is nearer
        torch.matmul(es[rows], es.T, out=buf_s[:n])
        score = buf_f[:n]
        if score is not buf_s[:n]:
            score.copy_(buf_s[:n])
        score.add_(half_sq)
        score[torch.arange(n), rows] = math.inf  # the token itself always comes first
        cand = torch.topk(score, n_cand, dim=1, sorted=False).indices
        for s2 in range(0, n, 64):  # exact float32 re-rank, in sub-chunks to bound memory
            r2 = rows[s2: s2 + 64]
            c2 = cand[s2: s2 + 64]
            d2 = (e[c2] - e[r2][:, None, :]).pow_(2).sum(-1)
            d2[c2 == r2[:, None]] = -1.0  # self first, even before an identical embedding
            d2, order = torch.sort(d2, dim=1, stable=True)
            d2.clamp_(min=0.0)
            c2 = torch.gather(c2, 1, order)[:, :n_keep]
            dist = d2[:, :n_keep].sqrt()
            # r(t): distance to the (N+1)-th; a class of <= N tokens stores them all, the farthest at u = -1
            r = (dist[:, N] if n_keep == N + 1 else dist[:, -1]).clamp_min(1e-12)
            idx_out[r2, :m] = c2[:, :m]
            if m < N:  # padding: self with u = -1 (weight 0 in the neighbour component)
                idx_out[r2, m:] = r2[:, None]
            if utility == "rank":
                ut_out[r2, :m] = rank_u
            else:
                ut_out[r2, :m] = -(dist[:, :m] / r[:, None]).clamp(max=1.0)
            rad_out[r2] = r
    return idx_out, ut_out, rad_out
