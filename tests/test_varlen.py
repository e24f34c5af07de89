"""patchkit.varlen: grouped masked SDPA equals one SDPA call per sequence (both plugins' fallback)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patchkit.varlen import MAX_GROUPS, group_sequences, grouped_sdpa, plan_groups


def per_sequence(q, k, v, cu_q, cu_k, causal, window_left):  # type: ignore[no-untyped-def]
    """The definition: each sequence alone, bottom-right causal alignment, GQA by repetition."""
    out = torch.zeros_like(q)
    for i in range(len(cu_q) - 1):
        a, b, c, d = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if b == a or d == c:
            continue
        qi, ki, vi = q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)
        ki, vi = (z.repeat_interleave(q.shape[1] // k.shape[1], 0) for z in (ki, vi))
        pos = torch.arange(b - a)[:, None] + (d - c) - (b - a)
        j = torch.arange(d - c)[None, :]
        ok = torch.ones(b - a, d - c, dtype=torch.bool)
        if causal:
            ok &= j <= pos
        if window_left >= 0:
            ok &= j >= pos - window_left
        out[a:b] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=ok).transpose(0, 1)
    return out


def cumulative(lengths: list[int]) -> list[int]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


CASES = {
    "prefill-spread": ([200, 0, 150, 121, 100, 80, 60, 40, 20, 5], None),
    "prefill-short": ([30, 7, 12, 1], None),
    "decode": ([1, 1, 1, 0], [90, 17, 120, 0]),
    "chunked-prefill": ([8, 3, 16], [40, 3, 100]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("causal,window_left", [(True, -1), (False, -1), (True, 9)])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("in_place", [False, True])
def test_grouped_equals_per_sequence(case: str, causal: bool, window_left: int, kv_heads: int, in_place: bool) -> None:
    lq, lk = CASES[case]
    lk = lk or lq
    cu_q, cu_k = cumulative(lq), cumulative(lk)
    torch.manual_seed(0)
    q = torch.randn(cu_q[-1], 4, 8)
    k, v = (torch.randn(cu_k[-1], kv_heads, 8) for _ in range(2))
    groups = plan_groups(cu_q, cu_k, causal=causal, window_left=window_left, per_sequence=in_place)
    if in_place and max(lk) > 64:
        assert all(g.span for g in groups) and len(groups) == sum(1 for a, b in zip(lq, lk, strict=True) if a and b)
    else:
        assert 1 <= len(groups) <= MAX_GROUPS
    got = grouped_sdpa(q, k, v, groups, scale=None)
    want = per_sequence(q, k, v, cu_q, cu_k, causal, window_left)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_grouping_is_longest_first_and_capped() -> None:
    assert group_sequences([10, 0, 100, 95, 71, 69, 3]) == [[2, 3, 4], [5], [0], [6]]
    assert len(group_sequences(list(range(1, 200)))) == MAX_GROUPS
    assert group_sequences([50, 40, 5], most=1) == [[0, 1, 2]]


def test_backward_has_no_nan_when_a_window_empties_padding_rows() -> None:
    """Gradients through the grouped calls equal the per-sequence computation's, also where a window
    leaves grid rows past a sequence's queries without any key (some SDPA kernels give NaN rows there,
    which 0 * NaN would carry into the gradients; the plan gives such rows one key)."""
    lq = [120, 40, 90]
    cu = cumulative(lq)
    torch.manual_seed(1)
    base = [torch.randn(cu[-1], 2, 8) for _ in range(3)]
    grads = []
    for fn in ("grouped", "reference"):
        q, k, v = (t.clone().requires_grad_() for t in base)
        if fn == "grouped":
            out = grouped_sdpa(q, k, v, plan_groups(cu, cu, causal=True, window_left=4, per_sequence=False), scale=None)
        else:
            out = per_sequence(q, k, v, cu, cu, True, 4)
        out.square().sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for got, want in zip(*grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
