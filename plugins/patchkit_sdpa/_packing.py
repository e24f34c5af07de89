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

    def groups(self) -> tuple[Group, ...]:
        """The non-empty sequences sorted by length and cut into a few groups of similar length
        (see :func:`group_bounds`), each laid out left-aligned in its own ``[count, width]`` grid.
        Cached: computed once per forward, shared by every layer."""
        cached = self.__dict__.get("_groups")
        if cached is None:
            short = self.max_len <= DENSE_MAX_LEN  # short sequences: one group (the padding costs little)
            cached = tuple(_group(self, members) for members in group_bounds(self.bounds, 1 if short else MAX_GROUPS))
            object.__setattr__(self, "_groups", cached)
        return cached


@dataclass(frozen=True)
class Group:
    """Sequences attended in one masked SDPA call: packed rows ``tokens`` (``None``: all of them, in
    order) go to rows ``slots`` of a ``[count * width]`` grid; ``keep`` ``[count, width]`` marks real tokens."""

    tokens: torch.Tensor | None
    slots: torch.Tensor
    keep: torch.Tensor
    count: int
    width: int


# At most this many groups per layer: each is one parallel region (a thread that another process
# holds stalls every region), and each sequence pads to its group's longest (wasted attention).
MAX_GROUPS = 4
SHORTEST_SHARE = 0.7  # a sequence joins a group while its length >= this share of the group's longest


def group_bounds(bounds: tuple[tuple[int, int], ...], most: int = MAX_GROUPS) -> list[list[tuple[int, int]]]:
    """``bounds`` cut into at most ``most`` groups of similar length, longest first."""
    ordered = sorted(bounds, key=lambda b: b[0] - b[1])  # longest first, stable
    groups: list[list[tuple[int, int]]] = []
    for b in ordered:
        width = groups[-1][0][1] - groups[-1][0][0] if groups else 0
        if groups and (len(groups) == most or b[1] - b[0] >= SHORTEST_SHARE * width):
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _group(packing: Packing, members: list[tuple[int, int]]) -> Group:
    device = packing.cu_seqlens.device
    if len(members) == len(packing.bounds):  # every sequence, in packed order: all rows, no gather
        members = sorted(members)
        tokens = None
    else:
        tokens = torch.cat([torch.arange(s, e) for s, e in members]).to(device)
    lens = torch.tensor([e - s for s, e in members])
    width = int(lens.max())
    slot = torch.repeat_interleave(torch.arange(len(members)), lens)
    offset = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    keep = torch.arange(width)[None, :] < lens[:, None]
    return Group(tokens, (slot * width + offset).to(device), keep.to(device), len(members), width)


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


# Short ragged sequences: one group for all (call overhead and thread wake-ups dominate, the padding
# inside the grid costs little).
DENSE_MAX_LEN = 64
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
        from patchkit.attention_backends import resolve_backend

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


def _grouped_masked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packing: Packing,
    heads: int,
    head_dim: int,
    scale: float | None,
    causal: bool,
    dropout_p: float,
) -> torch.Tensor:
    """Ragged batches without a varlen kernel: per group of similar-length sequences
    (:meth:`Packing.groups`), one masked SDPA call over them laid out left-aligned (key padding masked).

    Exact (a masked key contributes exp(-inf) = 0). A few parallel regions per layer instead of one
    per sequence: the per-sequence loop lost far more than transformers' own padded SDPA when another
    process shared the cores (every region waits for its slowest thread), and on a GPU it was one
    kernel launch per sequence and layer.
    """
    c = heads * head_dim
    groups = packing.groups()
    out = None if len(groups) == 1 else q.new_empty(q.shape[0], c)
    for g in groups:

        def grid(z: torch.Tensor, g: Group = g) -> torch.Tensor:
            rows = z if g.tokens is None else z.index_select(0, g.tokens)
            return (
                z.new_zeros(g.count * g.width, c)
                .index_copy_(0, g.slots, rows)
                .view(g.count, g.width, heads, head_dim)
                .transpose(1, 2)
            )

        mask = g.keep[:, None, None, :]
        if causal:
            mask = mask & torch.ones(g.width, g.width, dtype=torch.bool, device=q.device).tril()
        o = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), attn_mask=mask, dropout_p=dropout_p, scale=scale)
        o = o.transpose(1, 2).reshape(g.count * g.width, c).index_select(0, g.slots)
        if out is None:
            return o
        assert g.tokens is not None  # several groups: each holds a subset
        out.index_copy_(0, g.tokens, o)
    assert out is not None
    return out


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
    return _grouped_masked(q, k, v, packing, heads, head_dim, scale, causal, dropout_p)
