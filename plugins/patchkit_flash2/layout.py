"""Where the valid tokens are: turn a padding mask, restarting position ids or explicit
``cu_seq_lens`` into the packed layout a varlen kernel takes, and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Layout:
    """Packed layout of a ``[batch, q_len]`` query / ``[batch, k_len]`` key block.

    ``q_index`` / ``k_index``: flat indices (into ``batch * len``) of the tokens kept, ``None``
    when every token is kept (already packed, or no padding).
    """

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    q_index: torch.Tensor | None = None
    k_index: torch.Tensor | None = None
    holes: bool = False  # some row's keys are not one contiguous run (not pure left/right padding)
    full: bool = False  # plain [batch, len] rows: no padding, no packed sequences


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def from_mask(mask: torch.Tensor, q_len: int) -> Layout:
    """Layout of a 2D padding mask ``[batch, k_len]`` (True/1 = token); queries are its last ``q_len``
    columns (a decode step against a longer cache: assumes left padding, as generate does)."""
    mask = mask.bool()
    q_mask = mask[:, -q_len:]
    k_len_each = mask.sum(-1, dtype=torch.int32)
    q_len_each = q_mask.sum(-1, dtype=torch.int32)
    holes = _holes_per_row(mask).any()
    stats = torch.stack([q_len_each.max(), k_len_each.max(), holes, mask.all()]).tolist()  # one host sync
    max_q, max_k, any_holes, full = stats
    if full:
        return dense(mask.shape[0], q_len, mask.shape[-1], mask.device)
    return Layout(
        cu_q=_cu(q_len_each),
        cu_k=_cu(k_len_each),
        max_q=int(max_q),
        max_k=int(max_k),
        q_index=q_mask.flatten().nonzero().squeeze(1),
        k_index=mask.flatten().nonzero().squeeze(1),
        holes=bool(any_holes),
    )


def _holes_per_row(mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[batch]``: the row's tokens do not form one contiguous run."""
    mask = mask.bool()
    length = mask.shape[-1]
    count = mask.sum(-1)
    first = mask.int().argmax(-1)
    last = length - 1 - mask.flip(-1).int().argmax(-1)
    return (count > 0) & (count < last - first + 1)


def has_holes(mask: torch.Tensor) -> bool:
    """Whether some row of a 2D padding mask is neither full nor pure left/right/both-sided padding."""
    return bool(_holes_per_row(mask).any())


def padded_window_mask(mask: torch.Tensor, q_len: int, window_left: int, causal: bool) -> torch.Tensor:
    """Boolean ``[batch, 1, q_len, k_len]`` (True = attend) on *original* positions: key ``j`` is a
    token of ``mask`` and, for query ``i`` at key position ``p = i + k_len - q_len``, ``j <= p``
    (when causal) and ``j >= p - window_left`` (transformers' sliding-window causal mask)."""
    k_len = mask.shape[-1]
    qpos = torch.arange(q_len, device=mask.device).unsqueeze(1) + (k_len - q_len)
    kpos = torch.arange(k_len, device=mask.device).unsqueeze(0)
    ok = kpos >= qpos - window_left
    if causal:
        ok = ok & (kpos <= qpos)
    return (mask.bool()[:, None, :] & ok.unsqueeze(0)).unsqueeze(1)


def packed_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[len]`` for one row of ``position_ids``: True where a packed sequence starts.

    transformers' FlashAttention-2 rule (``prepare_fa_kwargs_from_position_ids``): a sequence starts
    wherever the position equals the row's minimum, i.e. where the ids restart. Gaps and strides
    (``0..5, 10..15``; ``0, 2, 4, ...``) are not boundaries. The first token always starts one
    (transformers would leave tokens before the first minimum uncovered).
    """
    pos = position_ids.reshape(-1)
    starts = pos == pos.min()
    starts[0] = True
    return starts


def from_position_ids(position_ids: torch.Tensor, batch: int) -> Layout | None:
    """Layout of sequences packed in one row and marked by restarting ``position_ids``.

    As transformers' FA2 path (``_is_packed_sequence``): only a batch of one row of more than one
    token can hold packed sequences; returns None otherwise, and when the row holds one sequence
    (then plain causal attention over each row is exact).
    """
    if batch != 1 or position_ids.shape[-1] <= 1 or position_ids.numel() != position_ids.shape[-1]:
        return None
    starts = packed_starts(position_ids)
    begin = starts.nonzero().squeeze(1)
    if begin.numel() == 1:  # one host sync
        return None
    total = starts.numel()
    lengths = torch.diff(begin, append=begin.new_tensor([total])).to(torch.int32)
    cu = _cu(lengths)
    max_len = int(lengths.max())
    return Layout(cu_q=cu, cu_k=cu, max_q=max_len, max_k=max_len)


def dense(batch: int, q_len: int, k_len: int, device: torch.device) -> Layout:
    """Layout of ``batch`` full rows (no padding, no packing)."""
    rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return Layout(cu_q=rows * q_len, cu_k=rows * k_len, max_q=q_len, max_k=k_len, full=True)


def explicit(cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int | torch.Tensor, max_k: int | torch.Tensor) -> Layout:
    """Layout given by the caller through ``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs."""
    return Layout(cu_q=cu_q.to(torch.int32), cu_k=cu_k.to(torch.int32), max_q=int(max_q), max_k=int(max_k))


def unpad(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``[batch, heads, len, dim]`` -> packed ``[tokens, heads, dim]``.

    With an ``index``, one gather straight from the ``[batch, len, heads, dim]`` view (no full
    contiguous copy first: a decode step reads the whole KV cache here, every layer)."""
    b, h, n, d = x.shape
    if index is None:
        return x.transpose(1, 2).reshape(b * n, h, d)
    return x.transpose(1, 2)[index // n, index % n]


def repad(out: torch.Tensor, index: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """Packed ``[tokens, heads, dim]`` -> ``[batch, length, heads, dim]`` with zeros on padding."""
    if index is not None:
        out = out.new_zeros(batch * length, *out.shape[1:]).index_copy_(0, index, out)
    return out.reshape(batch, length, *out.shape[1:])


def dense_mask(layout: Layout, batch: int, q_len: int, k_len: int, window_left: int = -1) -> torch.Tensor:
    """Boolean ``[batch, 1, q_len, k_len]`` mask (True = attend) equivalent to ``layout`` with
    bottom-right causal alignment; lets a non-varlen implementation run a varlen-shaped call."""
    device = layout.cu_q.device

    def seq_and_rel(cu: torch.Tensor, index: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        total = int(cu[-1])
        token = torch.arange(total, device=device)
        seq = torch.searchsorted(cu[1:].long(), token, right=True)
        rel = token - cu[:-1].long()[seq]
        seq_full = torch.full((batch * length,), -1, device=device, dtype=torch.long)
        rel_full = torch.zeros(batch * length, device=device, dtype=torch.long)
        where = token if index is None else index
        seq_full[where], rel_full[where] = seq, rel
        return seq_full.view(batch, length), rel_full.view(batch, length)

    sq, rq = seq_and_rel(layout.cu_q, layout.q_index, q_len)
    sk, rk = seq_and_rel(layout.cu_k, layout.k_index, k_len)
    lq = (layout.cu_q[1:] - layout.cu_q[:-1]).long()
    lk = (layout.cu_k[1:] - layout.cu_k[:-1]).long()
    rq = rq + (lk - lq)[sq.clamp(min=0)]  # bottom-right: query sits at key position rel + nk - nq
    ok = (sq.unsqueeze(-1) == sk.unsqueeze(-2)) & (sq.unsqueeze(-1) >= 0)
    ok &= rk.unsqueeze(-2) <= rq.unsqueeze(-1)
    if window_left >= 0:
        ok &= rk.unsqueeze(-2) >= rq.unsqueeze(-1) - window_left
    return ok.unsqueeze(1)
