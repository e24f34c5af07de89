"""Packed (padding-free) token layout: unpad once, attend per sequence, re-pad once.

A batch ``[B, T, C]`` with a boolean ``keep`` mask ``[B, T]`` becomes ``[N, C]`` (N = valid
tokens, row-major order), plus the sequence boundaries. Attention runs per sequence, so no
score is ever computed against a padding key: the result equals the masked dense computation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from patchkit.toolkit import Group, grouped_sdpa, plan_groups


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
    kernels: Mapping[str, Any] | None = None  # the registry's attention kernels (see varlen_sdpa)

    @property
    def uniform(self) -> bool:
        return self.index is None

    def groups(self, causal: bool) -> tuple[Group, ...]:
        """The masked-call groups of these sequences (:func:`patchkit.varlen.plan_groups`), planned
        once per forward and shared by every layer."""
        key = f"_groups_{causal}"
        cached = self.__dict__.get(key)
        if cached is None:
            cu = self.cu_seqlens.tolist()
            cached = plan_groups(cu, cu, causal=causal, device=self.cu_seqlens.device)
            object.__setattr__(self, key, cached)
        return cached


def make_packing(
    keep: torch.Tensor | None,
    batch: int,
    length: int,
    device: torch.device,
    kernels: Mapping[str, Any] | None = None,
) -> Packing:
    """The packing of a ``[batch, length]`` batch whose valid tokens are ``keep`` (``None``: all);
    ``kernels``: the attention kernels ragged batches may use (see :func:`varlen_sdpa`)."""
    if keep is not None and bool(keep.all()):
        keep = None
    if keep is None:
        bounds = tuple((b * length, (b + 1) * length) for b in range(batch))
        cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
        return Packing(batch, length, None, bounds, cu, length, kernels)
    lens = keep.sum(dim=1)
    index = keep.reshape(-1).nonzero().squeeze(1)
    ends = lens.cumsum(0).tolist()  # one host sync per forward, shared by every layer
    starts = [0, *ends[:-1]]
    bounds = tuple((s, e) for s, e in zip(starts, ends, strict=True) if e > s)
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return Packing(batch, length, index, bounds, cu, int(max(e - s for s, e in bounds)) if bounds else 0, kernels)


def pack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """``[B, T, C]`` -> ``[N, C]``: the valid tokens only."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if packing.index is None else flat.index_select(0, packing.index)


def unpack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """``[N, C]`` -> ``[B, T, C]``; padded positions hold zeros (a defined value, documented)."""
    if packing.index is None:
        return x.reshape(packing.batch, packing.length, x.shape[-1])
    out = x.new_zeros(packing.batch * packing.length, x.shape[-1]).index_copy_(0, packing.index, x)
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


KERNELS_ATTR = "_patchkit_kernels"  # on the patched encoder/decoder: the registry's attention kernels
# (kernels, device, dtype, needs) -> (the kernels, backend or None): a pure lookup; holding the
# kernels keeps their ids from being reused by other objects. Keyed on the kernels' names and ids
# and the device's string: a key on id() of the mapping and the device object missed under
# torch.compile (tests/test_compile.py), and dynamo then traced resolve_backend's metadata reads.
_CHOSEN: dict[tuple[Any, ...], tuple[Any, Any]] = {}
_WARNED: set[str] = set()


def kernels_of(module: Any) -> Mapping[str, Any] | None:
    """The attention kernels recorded on a patched module at apply time (``ctx.registry``'s)."""
    found = getattr(module, "__dict__", {}).get(KERNELS_ATTR)
    return found if isinstance(found, Mapping) else None


def _kernel(kernels: Mapping[str, Any] | None, q: torch.Tensor, causal: bool, dropout_p: float) -> Any:
    """The registry's ``backend="auto"`` kernel for these tensors (flash_attn, torch's varlen_attn, a
    third party's), or ``None``: then grouped masked SDPA calls run (exact)."""
    if not kernels:
        return None
    needs = frozenset({"dropout"} if dropout_p else ()) | frozenset({"backward"} if q.requires_grad else ())
    key = (tuple(sorted((n, id(b)) for n, b in kernels.items())), str(q.device), q.dtype, needs)
    if key not in _CHOSEN:
        from patchkit import UnsupportedError
        from patchkit.toolkit import resolve_backend

        try:
            chosen = resolve_backend(dict(kernels), "auto", q.device, q.dtype, needs)
        except UnsupportedError:
            chosen = None
        _CHOSEN[key] = (tuple(kernels.values()), chosen)
    return _CHOSEN[key][1]


def _warn_once(backend: Any, exc: BaseException) -> None:
    import warnings

    from patchkit import PatchkitWarning

    if backend.name not in _WARNED:
        _WARNED.add(backend.name)
        warnings.warn(
            f"sdpa: attention kernel {backend.name!r} failed ({type(exc).__name__}: {exc}); "
            "these calls run grouped masked SDPA calls instead (exact, slower)",
            PatchkitWarning,
            stacklevel=4,
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

    Uniform batches run as one batched SDPA call. Ragged ones run the registry's automatic varlen
    kernel for the tensors' device and dtype (``packing.kernels``: flash_attn or torch's varlen_attn
    on CUDA, or a third party's), and a few masked SDPA calls over groups of similar-length sequences
    where none fits (exact: a masked key weighs exactly 0). A kernel that raises is reported once
    (PatchkitWarning) and the grouped calls take over.
    """
    n = q.shape[0]
    if packing.uniform:
        b, t = packing.batch, packing.length
        qb, kb, vb = (z.reshape(b, t, heads, head_dim).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p, is_causal=causal, scale=scale)
        return o.transpose(1, 2).reshape(n, heads * head_dim)
    backend = _kernel(packing.kernels, q, causal, dropout_p)
    if backend is not None:
        qv, kv, vv = (z.reshape(n, heads, head_dim) for z in (q, k, v))
        cu = packing.cu_seqlens
        try:
            packed = backend.varlen(
                qv,
                kv,
                vv,
                cu_seqlens_q=cu,
                cu_seqlens_k=cu,
                max_seqlen_q=packing.max_len,
                max_seqlen_k=packing.max_len,
                scale=scale if scale is not None else head_dim**-0.5,
                causal=causal,
                dropout=dropout_p,
            )
            return packed.reshape(n, heads * head_dim)
        except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a head size the kernel lacks
            _warn_once(backend, exc)
    groups = packing.groups(causal)
    qv, kv, vv = (z.view(n, heads, head_dim) for z in (q, k, v))
    return grouped_sdpa(qv, kv, vv, groups, scale=scale, dropout=dropout_p).reshape(n, heads * head_dim)
