"""KV-cache helpers of ``fedkt.generate``'s decode loop: growth without copies, row merging and compaction.

* **Growing in place.** transformers' ``DynamicLayer`` appends each decode step's key/value column with
  ``torch.cat``, which copies the whole cache every step (O(steps x length) memory traffic, as much as
  the model's own compute for a batch of 48 rows of ~200 tokens on one CPU thread). :func:`grow` turns
  the layers of a cache into :class:`GrowingLayer` s, whose keys/values are views of a buffer with spare
  columns: a step writes one column into the buffer and a copy happens only when the spare columns run out
  (every ``GROW_COLUMNS`` steps). The attention kernels see the same values in the same shapes (a view
  whose last dimension is contiguous), so outputs do not change.
* **Merging** (:func:`merge`): rows prefilled later join a running batch; every side is padded on the left
  with masked zero columns to a common width (positions are explicit, so column order carries no meaning).
* **Compaction** (:func:`compact`): finished rows leave, and leading columns no live row attends to any
  more are dropped, in one copy (for a growing layer, of its buffers with their spare columns, so the next
  step writes in place instead of copying the compacted cache again).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

GROW_COLUMNS = 64  # spare key/value columns a growing layer allocates at a time


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers with spare columns (see module doc).

    Anything else that replaces ``keys``/``values`` (transformers' own ``batch_select_indices``, ``crop``, a
    merge) is noticed at the next ``update``, which then copies them into a fresh buffer."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None
    _kview: torch.Tensor | None = None

    def _rebuffer(self, need: int) -> None:
        n, (b, h, _, dk), dv = self.keys.shape[-2], self.keys.shape, self.values.shape[-1]
        kb = self.keys.new_empty((b, h, need + GROW_COLUMNS, dk))
        vb = self.values.new_empty((b, h, need + GROW_COLUMNS, dv))
        kb[:, :, :n] = self.keys
        vb[:, :, :n] = self.values
        self._kbuf, self._vbuf = kb, vb

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        n, add = self.keys.shape[-2], key_states.shape[-2]
        if (self._kbuf is None or self.keys is not self._kview or self._kbuf.shape[0] != self.keys.shape[0]
                or n + add > self._kbuf.shape[-2]):
            self._rebuffer(n + add)
        self._kbuf[:, :, n:n + add] = key_states
        self._vbuf[:, :, n:n + add] = value_states
        self.keys, self.values = self._kbuf[:, :, :n + add], self._vbuf[:, :, :n + add]
        self._kview = self.keys
        return self.keys, self.values


def grow(cache) -> None:
    """Make the plain ``DynamicLayer`` s of ``cache`` growing layers (in place; other layer kinds stay)."""
    layers = getattr(cache, "layers", None) or []
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            g = GrowingLayer.__new__(GrowingLayer)
            g.__dict__.update(layer.__dict__)
            layers[i] = g


def mergeable(cache) -> bool:
    """Whether rows can join ``cache``: plain dynamic layers (full attention), whose tensors fedkt can pad
    and concatenate along the batch. Sliding-window, static, quantised or linear-attention caches cannot."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, GrowingLayer) and layer.is_initialized
                                for layer in layers)


def merge(cache, attn: torch.Tensor, others: list) -> torch.Tensor:
    """Append the rows of each (cache, attention mask) of ``others`` to (``cache``, ``attn``), in order; every
    side is padded on the left with masked zero keys/values to the widest. Returns the merged mask."""
    masks = [attn] + [a for _, a in others]
    t = max(m.shape[1] for m in masks)
    pad = torch.nn.functional.pad
    for li, layer in enumerate(cache.layers):
        parts = [layer] + [c.layers[li] for c, _ in others]
        layer.keys = torch.cat([pad(p.keys, (0, 0, t - m.shape[1], 0)) for p, m in zip(parts, masks)], dim=0)
        layer.values = torch.cat([pad(p.values, (0, 0, t - m.shape[1], 0)) for p, m in zip(parts, masks)], dim=0)
    return torch.cat([pad(m, (t - m.shape[1], 0)) for m in masks], dim=0)


def compact(cache, attn: torch.Tensor, keep: torch.Tensor, trim: bool) -> torch.Tensor:
    """Keep rows ``keep`` of (``cache``, ``attn``); with ``trim``, also drop leading columns that none of them
    attends to (padding left behind by rows that finished). Returns the new mask."""
    attn = attn[keep]
    c0 = 0
    if trim:
        used = attn.any(0).nonzero()
        c0 = int(used[0]) if len(used) else 0
    if not trim or not all(type(layer) in (DynamicLayer, GrowingLayer) for layer in cache.layers):
        cache.batch_select_indices(keep)
        return attn
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        if isinstance(layer, GrowingLayer) and layer._kbuf is not None and layer.keys is layer._kview \
                and layer._kbuf.shape[0] == layer.keys.shape[0]:
            # the rows' buffers, spare columns included, in one copy: the next step writes into them
            n = layer.keys.shape[-2] - c0
            layer._kbuf = layer._kbuf.index_select(0, keep)[:, :, c0:]
            layer._vbuf = layer._vbuf.index_select(0, keep)[:, :, c0:]
            layer.keys, layer.values = layer._kbuf[:, :, :n], layer._vbuf[:, :, :n]
            layer._kview = layer.keys
            continue
        layer.keys = layer.keys.index_select(0, keep)[:, :, c0:]
        layer.values = layer.values.index_select(0, keep)[:, :, c0:]
    return attn[:, c0:]
