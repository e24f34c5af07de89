"""Varlen attention without a varlen kernel: a few masked SDPA calls over groups of similar-length sequences.

Packed attention plugins hand tokens of many sequences as one ``[tokens, heads, dim]`` tensor plus
cumulative lengths (``cu_seqlens``), as FlashAttention's varlen kernels take them. Where no such
kernel fits (the CPU, fp32 on a GPU, a kernel that failed), the plugins fall back to this module:
sequences are sorted by length and cut into at most :data:`MAX_GROUPS` groups; each group is laid
out left-aligned in a ``[count, width]`` grid and attended in **one** masked
``scaled_dot_product_attention`` call. Exact: a masked key weighs exactly 0.

Why groups and not one call per sequence: every call is a parallel region on the CPU (one thread
that another process holds stalls each region) and a kernel launch on a GPU; a busy 2-core machine
lost more to one call per sequence than transformers' padded attention did. Why not one call for
all: the padding inside the grid is attention work the packing was meant to skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_GROUPS = 4  # most masked calls per attention
SHORTEST_SHARE = 0.7  # a sequence joins a group while its key length >= this share of the group's longest
ONE_GROUP_UP_TO = 64  # sequences this short go into one group: call overhead dominates their padding


@dataclass(frozen=True)
class Group:
    """Sequences attended in one masked call. Packed query rows ``q_tokens`` (``None``: all, in order)
    go to rows ``q_slots`` of a ``[count * wq]`` grid, keys likewise; ``mask`` ``[count, 1, wq, wk]``
    (True = attend) holds padding, causality and the window."""

    q_tokens: torch.Tensor | None
    q_slots: torch.Tensor
    k_tokens: torch.Tensor | None
    k_slots: torch.Tensor
    mask: torch.Tensor | None
    count: int
    wq: int
    wk: int
    # one sequence attended in place: (q start, q end, k start, k end) of packed rows, no grid copies
    span: tuple[int, int, int, int] | None = None
    is_causal: bool = False  # with span and no mask: plain causal (nq == nk, no window)


def group_sequences(lengths: Sequence[int], most: int = MAX_GROUPS) -> list[list[int]]:
    """Indices of the non-empty sequences, longest first, cut into at most ``most`` groups of similar length."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups) == most or lengths[i] >= SHORTEST_SHARE * lengths[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _slots(
    starts: list[int], lens: list[int], width: int, everything: bool, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(packed rows to gather, or None for all; their rows in the ``[len(lens) * width]`` grid)."""
    n = torch.tensor(lens)
    slot = torch.repeat_interleave(torch.arange(len(lens)), n)
    offset = torch.arange(int(n.sum())) - torch.repeat_interleave(n.cumsum(0) - n, n)
    tokens = None
    if not everything:
        tokens = torch.cat([torch.arange(s, s + m) for s, m in zip(starts, lens, strict=True)]).to(device)
    return tokens, (slot * width + offset).to(device)


def plan_groups(
    cu_q: Sequence[int],
    cu_k: Sequence[int],
    *,
    causal: bool,
    window_left: int = -1,
    device: torch.device | str = "cpu",
    per_sequence: bool | None = None,
) -> tuple[Group, ...]:
    """The groups for sequences with cumulative query/key lengths ``cu_q``/``cu_k`` (host lists).

    Causal attention is aligned bottom-right, as FlashAttention's: query ``i`` of a sequence with
    ``nq`` queries and ``nk`` keys sits at key position ``i + nk - nq``; ``window_left >= 0`` keeps
    keys at most that far behind it. Sequences with no query or no key are left out (their rows stay
    zero). Plan once per forward; every layer reuses it.

    ``per_sequence=True``: one in-place call per sequence instead (no grid copies), for sequences
    longer than :data:`ONE_GROUP_UP_TO` (shorter ones still share one grid): on an idle CPU the
    copies into and out of the grids cost more than the calls they save. ``None`` (the default)
    decides by :func:`cpu_strategy` from ``device`` and the longest sequence.
    """
    device = torch.device(device)
    nq = [cu_q[i + 1] - cu_q[i] for i in range(len(cu_q) - 1)]
    nk = [cu_k[i + 1] - cu_k[i] for i in range(len(cu_k) - 1)]
    usable = [k if q > 0 else 0 for q, k in zip(nq, nk, strict=True)]
    longest = max(usable, default=0)
    if per_sequence is None:
        per_sequence = cpu_strategy(device, longest)
    if per_sequence and longest > ONE_GROUP_UP_TO:
        return tuple(
            _in_place(cu_q[s], nq[s], cu_k[s], nk[s], causal, window_left, device) for s in range(len(nq)) if usable[s]
        )
    most = 1 if longest <= ONE_GROUP_UP_TO else MAX_GROUPS
    members = group_sequences(usable, most)
    # one group holding every token, in packed order: grid rows come straight from q/k (no gather)
    everything = (
        len(members) == 1
        and sum(nq[s] for s in members[0]) == cu_q[-1] - cu_q[0]
        and sum(nk[s] for s in members[0]) == cu_k[-1] - cu_k[0]
    )
    out = []
    for seqs in members:
        seqs = sorted(seqs) if everything else seqs  # all sequences in packed order: no gather needed
        lq, lk = [nq[s] for s in seqs], [nk[s] for s in seqs]
        wq, wk = max(lq), max(lk)
        q_tokens, q_slots = _slots([cu_q[s] for s in seqs], lq, wq, everything, device)
        k_tokens, k_slots = _slots([cu_k[s] for s in seqs], lk, wk, everything, device)
        tq, tk = torch.tensor(lq, device=device)[:, None, None], torch.tensor(lk, device=device)[:, None, None]
        i = torch.arange(wq, device=device)[None, :, None]
        j = torch.arange(wk, device=device)[None, None, :]
        mask = j < tk
        pos = i + (tk - tq)
        if causal:
            mask = mask & (j <= pos)
        if window_left >= 0:
            mask = mask & (j >= pos - window_left)
        # Grid rows past a sequence's queries are discarded; give them one key so that no row is
        # fully masked (a NaN row would poison the backward pass through 0 * NaN).
        mask = mask | ((i >= tq) & (j == 0))
        out.append(Group(q_tokens, q_slots, k_tokens, k_slots, mask[:, None], len(seqs), wq, wk))
    return tuple(out)


def _in_place(q0: int, nq: int, k0: int, nk: int, causal: bool, window_left: int, device: torch.device) -> Group:
    """One sequence attended on views of the packed rows (the plain per-sequence call)."""
    plain = window_left < 0 and (not causal or nq == nk)
    mask = None
    if not plain:
        pos = torch.arange(nq, device=device)[:, None] + (nk - nq)
        j = torch.arange(nk, device=device)[None, :]
        mask = torch.ones(nq, nk, dtype=torch.bool, device=device)
        if causal:
            mask = mask & (j <= pos)
        if window_left >= 0:
            mask = mask & (j >= pos - window_left)
    empty = torch.empty(0, dtype=torch.long, device=device)
    span = (q0, q0 + nq, k0, k0 + nk)
    return Group(empty, empty, empty, empty, mask, 1, nq, nk, span=span, is_causal=plain and causal)


def cpu_strategy(device: torch.device, longest: int) -> bool:
    """Whether :func:`plan_groups` plans ``per_sequence`` calls by default: on the CPU for sequences
    over :data:`ONE_GROUP_UP_TO`.

    Measured on the 2-core VM (MiniLM 32 x 256, 45% padding): the per-sequence calls beat grouped
    grids there (the grids' gather/scatter copies cost more than the parallel regions they save);
    on a GPU every call is a launch, so grouped grids win.
    """
    return device.type == "cpu" and longest > ONE_GROUP_UP_TO


def grouped_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: Sequence[Group],
    *,
    scale: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of packed ``q`` ``[Nq, heads, dim]`` against ``k``/``v`` ``[Nk, kv_heads, dim]`` within
    each sequence of ``groups`` (:func:`plan_groups`); returns ``[Nq, heads, dim]`` (rows of sequences
    without keys are zeros). GQA when ``kv_heads`` divides ``heads``."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    only = len(groups) == 1 and groups[0].q_tokens is None and groups[0].span is None
    out = None if only else q.new_zeros(q.shape[0], heads, dim)

    def grid(z: torch.Tensor, tokens: torch.Tensor | None, slots: torch.Tensor, count: int, width: int) -> torch.Tensor:
        rows = z if tokens is None else z.index_select(0, tokens)
        full = z.new_zeros(count * width, z.shape[1], dim).index_copy_(0, slots, rows)
        return full.view(count, width, z.shape[1], dim).transpose(1, 2)

    for g in groups:
        if g.span is not None:
            assert out is not None
            a, b, c, d = g.span
            qs, ks, vs = (z[x:y].transpose(0, 1).unsqueeze(0) for z, x, y in ((q, a, b), (k, c, d), (v, c, d)))
            if kv_heads != heads:
                ks, vs = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (ks, vs))
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=g.mask, dropout_p=dropout, is_causal=g.is_causal, scale=scale
            )
            out[a:b].copy_(o[0].transpose(0, 1))
            continue
        qg = grid(q, g.q_tokens, g.q_slots, g.count, g.wq)
        kg = grid(k, g.k_tokens, g.k_slots, g.count, g.wk)
        vg = grid(v, g.k_tokens, g.k_slots, g.count, g.wk)
        if kv_heads != heads:
            kg, vg = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (kg, vg))
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, dropout_p=dropout, scale=scale)
        o = o.transpose(1, 2).reshape(g.count * g.wq, heads, dim).index_select(0, g.q_slots)
        if out is None:
            return o
        assert g.q_tokens is not None  # several groups: each holds a subset
        out.index_copy_(0, g.q_tokens, o)
    assert out is not None
    return out
