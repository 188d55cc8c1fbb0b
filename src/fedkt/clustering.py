"""Text embeddings from a causal LM and seeded k-means, in plain torch (no scikit-learn dependency).

FDKT's server groups the clients' synthetic samples by content before its LLM judges them, so that each
judging prompt shows similar samples side by side (the judge compares like with like, and one prompt per
group keeps the number of LLM calls at about n / cluster size).

* :func:`mean_pooled_embeddings`: the mean over a text's tokens of the model's last hidden layer
  (padding masked out), L2-normalised by default so that Euclidean k-means ranks by cosine similarity
  (raw LM hidden states are strongly anisotropic: a few large directions dominate unnormalised
  distances). Texts are sorted by length and batched, so little compute goes to padding; one forward
  per batch, the logits of only the last position are computed.
* :func:`kmeans`: Lloyd's algorithm from a k-means++ initialisation drawn from a ``torch.Generator``
  seeded with ``seed``: the same inputs and seed give the same clusters bit for bit. Ties in the
  nearest-centre assignment go to the lower centre index (``argmin``). A centre that loses all its
  points keeps its position (it can win points back later; the number of clusters never silently
  changes). Iteration stops when no assignment changes, or after ``max_iter`` rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fedkt.generate import _forward


@torch.no_grad()
def mean_pooled_embeddings(model, tok, texts: Sequence[str], batch_size: int = 16, max_length: int = 256,
                           normalize: bool = True) -> torch.Tensor:
    """[len(texts), hidden] float32: mean of the last hidden layer over each text's tokens."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = tok(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    for i, r in enumerate(ids):
        if not r:
            ids[i] = [tok.bos_token_id if tok.bos_token_id is not None else pad]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: torch.Tensor | None = None
    dev = next(model.parameters()).device  # the batches follow the model; the embeddings come back to the cpu
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):  # right padding: with a causal mask no real token sees a pad
                x[j, :len(ids[i])] = torch.tensor(ids[i])
                mask[j, :len(ids[i])] = 1
            h = _forward(model, input_ids=x.to(dev), attention_mask=mask.to(dev), output_hidden_states=True,
                         logits_to_keep=1).hidden_states[-1].float()
            m = mask.to(dev).unsqueeze(-1).float()
            pooled = ((h * m).sum(1) / m.sum(1)).cpu()
            if out is None:
                out = torch.empty((len(ids), pooled.shape[-1]), dtype=torch.float32)
            out[torch.tensor(idx)] = pooled
    finally:
        model.train(was_training)
    if out is None:
        return torch.empty((0, 0))
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


@dataclass
class KMeans:
    assign: torch.Tensor
    """[n] cluster index of each point (long)."""
    centers: torch.Tensor
    """[k, d] cluster centres."""
    iterations: int
    inertia: float
    """Sum of squared distances of points to their centres."""

    def clusters(self) -> list[list[int]]:
        """Member indices of each non-empty cluster, clusters in index order, members ascending."""
        k = self.centers.shape[0]
        groups: list[list[int]] = [[] for _ in range(k)]
        for i, c in enumerate(self.assign.tolist()):
            groups[c].append(i)
        return [g for g in groups if g]


def kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007): the first centre uniformly, each next one with probability
    proportional to the squared distance to the nearest centre chosen so far."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # every point sits on a chosen centre: take the first unchosen index
            nxt = next(i for i in range(n) if i not in set(chosen))
        else:
            nxt = int(torch.multinomial(d2 / total, 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return x[torch.tensor(chosen)].clone()


def kmeans(x: torch.Tensor, k: int, seed: int, max_iter: int = 100) -> KMeans:
    """Seeded k-means of the rows of ``x`` ([n, d]) into ``min(k, n)`` clusters."""
    if x.dim() != 2:
        raise ValueError(f"kmeans expects an [n, d] matrix, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("kmeans needs at least one point")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    centers = kmeans_pp_init(x, k, gen)
    assign = torch.full((n,), -1, dtype=torch.long)
    it = 0
    for it in range(1, max_iter + 1):
        new = torch.cdist(x, centers).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled].unsqueeze(1)
    inertia = float(((x - centers[assign]) ** 2).sum())
    return KMeans(assign=assign, centers=centers, iterations=it, inertia=inertia)
