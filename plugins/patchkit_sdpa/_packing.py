"""Packed (padding-free) token layout: unpad once, attend per sequence, re-pad once.

A batch ``[B, T, C]`` with a boolean ``keep`` mask ``[B, T]`` becomes ``[N, C]`` (N = valid
tokens, row-major order), plus the sequence boundaries. Attention runs per sequence, so no
score is ever computed against a padding key: the result equals the masked dense computation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Packing:
    """Where the valid tokens of a padded ``[B, T]`` batch went in the packed ``[N]`` layout.

    ``index``: flat positions (into ``B * T``) of the valid tokens, ``None`` when nothing is padded.
    ``bounds``: ``(start, end)`` of every sequence in the packed layout (empty sequences omitted).
    ``uniform``: every sequence has length ``T`` (no padding): attention can run as one batch.
    """

    batch: int
    length: int
    index: torch.Tensor | None
    bounds: tuple[tuple[int, int], ...]
    cu_seqlens: torch.Tensor
    max_len: int

    @property
    def uniform(self) -> bool:
        return self.index is None


def make_packing(keep: torch.Tensor | None, batch: int, length: int, device: torch.device) -> Packing:
    """The packing of a ``[batch, length]`` batch whose valid tokens are ``keep`` (``None``: all)."""
    if keep is not None and bool(keep.all()):
        keep = None
    if keep is None:
        bounds = tuple((b * length, (b + 1) * length) for b in range(batch))
        cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
        return Packing(batch, length, None, bounds, cu, length)
    lens = keep.sum(dim=1)
    index = keep.reshape(-1).nonzero().squeeze(1)
    ends = lens.cumsum(0).tolist()  # one host sync per forward, shared by every layer
    starts = [0, *ends[:-1]]
    bounds = tuple((s, e) for s, e in zip(starts, ends, strict=True) if e > s)
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return Packing(batch, length, index, bounds, cu, int(max(e - s for s, e in bounds)) if bounds else 0)


def pack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """``[B, T, C]`` -> ``[N, C]``: the valid tokens only."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if packing.index is None else flat.index_select(0, packing.index)


def unpack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """``[N, C]`` -> ``[B, T, C]``; padded positions hold zeros (a defined value, documented)."""
    if packing.index is None:
        return x.reshape(packing.batch, packing.length, x.shape[-1])
    out = x.new_zeros(packing.batch * packing.length, x.shape[-1]).index_copy(0, packing.index, x)
    return out.view(packing.batch, packing.length, x.shape[-1])


LayerFn = Callable[[Any, torch.Tensor, Packing], torch.Tensor]


def run_layers(
    layers: Iterable[Any],
    x: torch.Tensor,
    packing: Packing,
    *,
    packed: LayerFn,
    inference: LayerFn,
    inference_ok: Callable[[Any, torch.Tensor], bool],
) -> torch.Tensor:
    """Run ``layers`` on packed tokens ``x``, choosing per layer: ``packed`` under gradient
    checkpointing (``model.gradient_checkpointing_enable()``, honoured while training), the fused
    ``inference`` kernels where ``inference_ok``, the module-calling ``packed`` path otherwise."""
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            x = checkpoint(packed, layer, x, packing, use_reentrant=False)
        elif inference_ok(layer, x):
            x = inference(layer, x, packing)
        else:
            x = packed(layer, x, packing)
    return x


@lru_cache(maxsize=1)
def _varlen_kernel() -> tuple[Any, str] | None:
    """torch's built-in varlen flash kernel (torch >= 2.10, CUDA) and how it spells causality."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    style = "window_size" if "window_size" in params else "is_causal" if "is_causal" in params else ""
    return (varlen_attn, style) if style else None


def _use_varlen(q: torch.Tensor, dropout_p: float) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and dropout_p == 0.0
        and _varlen_kernel() is not None
        and torch.cuda.get_device_capability(q.device)[0] >= 8
    )


def varlen_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packing: Packing,
    heads: int,
    head_dim: int,
    *,
    scale: float | None,
    causal: bool,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of packed ``[N, heads * head_dim]`` q/k/v within each sequence; returns ``[N, heads * head_dim]``.

    Uniform batches run as one batched SDPA call; ragged ones use torch's varlen flash kernel on
    CUDA (fp16/bf16, sm80+) and one SDPA call per sequence otherwise (exact: no padding key exists).
    """
    n = q.shape[0]
    if packing.uniform:
        b, t = packing.batch, packing.length
        qb, kb, vb = (z.reshape(b, t, heads, head_dim).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p, is_causal=causal, scale=scale)
        return o.transpose(1, 2).reshape(n, heads * head_dim)
    if _use_varlen(q, dropout_p):
        kernel, style = _varlen_kernel()  # type: ignore[misc]
        extra = {"window_size": (-1, 0) if causal else (-1, -1)} if style == "window_size" else {"is_causal": causal}
        qv, kv, vv = (z.reshape(n, heads, head_dim) for z in (q, k, v))
        cu = packing.cu_seqlens
        try:
            packed = kernel(qv, kv, vv, cu, cu, packing.max_len, packing.max_len, scale=scale, **extra)
            return packed.reshape(n, heads * head_dim)
        except (RuntimeError, TypeError, ValueError):  # e.g. a head size the kernel lacks: the loop is exact too
            pass
    out = q.new_empty(n, heads * head_dim)
    for s, e in packing.bounds:
        ln = e - s
        qs, ks, vs = (z[s:e].view(1, ln, heads, head_dim).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p, is_causal=causal, scale=scale)
        out[s:e].view(ln, heads, head_dim).copy_(o[0].transpose(0, 1))
    return out
