"""Packed rows re-padded for a KV cache, one zeroed buffer pair per forward.

A padding-free prefill hands every layer's keys and values to the host's cache in the padded
``[batch, length, ...]`` layout the unpatched model writes (zeros on padding). Allocating and
zero-filling those buffers per layer cost as much as the cache's own copy; where the cache copies
what it is given (transformers' ``DynamicLayer`` concatenates), the next layer can rewrite the
same buffers' valid rows instead: the padding stays zero. A cache that keeps the tensors it is
given gets fresh buffers for every layer. Attention plugins use this; it knows no cache class:
the plugin says which class copies.
"""

from __future__ import annotations

import torch


class PaddedBuffers:
    """Re-pads packed rows into reusable ``[batch, length, ...]`` buffers for ``cache.update``.

    ``index``: flat positions (into ``batch * length``) of the packed rows, ``None`` when nothing is
    padded (the rows are returned as a view). ``copying``: the cache-layer class known to copy what
    ``update`` receives; buffers are reused only after an update by a layer of exactly that class
    which holds none of them (checked on its tensor attributes).
    """

    def __init__(self, index: torch.Tensor | None, batch: int, length: int, copying: type | None) -> None:
        self.index, self.batch, self.length, self.copying = index, batch, length, copying
        self.buffers: list[torch.Tensor | None] = [None, None]

    def padded(self, slot: int, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` ``[tokens, ...]`` as ``[batch, length, ...]``, zeros on padding, in buffer ``slot``."""
        if self.index is None:
            return rows.reshape(self.batch, self.length, *rows.shape[1:])
        compiling = torch.compiler.is_compiling()  # a traced graph gets fresh buffers and keeps no state
        buffer = None if compiling else self.buffers[slot]
        if buffer is None or buffer.shape[2:] != rows.shape[1:] or buffer.dtype != rows.dtype:
            buffer = rows.new_zeros(self.batch * self.length, *rows.shape[1:])
            buffer = buffer.view(self.batch, self.length, *rows.shape[1:])
        buffer.view(-1, *rows.shape[1:]).index_copy_(0, self.index, rows)
        if not compiling:
            self.buffers[slot] = buffer
        return buffer

    def updated(self, cache: object, layer_idx: int) -> None:
        """Call after ``cache.update(..., layer_idx)``: keeps the buffers for the next layer only if
        the layer it wrote (``cache.layers[layer_idx]``, as in transformers' caches) copied them."""
        if torch.compiler.is_compiling():
            return
        layers = getattr(cache, "layers", None)
        layer = layers[layer_idx] if isinstance(layers, list) and 0 <= layer_idx < len(layers) else None
        held = [b for b in self.buffers if b is not None]
        ptrs = {b.untyped_storage().data_ptr() for b in held}
        copied = self.copying is not None and type(layer) is self.copying
        if copied:
            tensors = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
            copied = all(t.untyped_storage().data_ptr() not in ptrs for t in tensors)
        if not copied:
            self.buffers = [None, None]
