"""Unit tests of the sdpa plugin's building blocks: packing, mask reading, code verification."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from patchkit_sdpa._masks import key_padding
from patchkit_sdpa._packing import make_packing, pack, unpack, varlen_sdpa
from patchkit_sdpa._verify import same_code


def _keep(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, t, generator=g) > 0.4
    keep[0] = True  # one full row
    keep[1] = False  # one empty row
    return keep


def test_pack_unpack_roundtrip_zeros_at_padding() -> None:
    keep = _keep(4, 9)
    x = torch.randn(4, 9, 5)
    p = make_packing(keep, 4, 9, x.device)
    packed = pack(x, p)
    assert packed.shape == (int(keep.sum()), 5)
    back = unpack(packed, p)
    assert torch.equal(back[keep], x[keep])
    assert torch.count_nonzero(back[~keep]) == 0
    assert sum(e - s for s, e in p.bounds) == int(keep.sum())


def test_all_valid_is_uniform() -> None:
    p = make_packing(torch.ones(3, 4, dtype=torch.bool), 3, 4, torch.device("cpu"))
    assert p.uniform and p.bounds == ((0, 4), (4, 8), (8, 12))


@pytest.mark.parametrize("t", [7, 90], ids=["short-one-grid", "long-per-sequence"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_sdpa_matches_masked_dense(causal: bool, t: int) -> None:
    torch.manual_seed(0)
    b, h, d = 3, 2, 4
    ar = torch.arange(t)
    keep = torch.stack([ar < t, ar < 3, ar >= 2])  # right padding and left padding
    q, k, v = (torch.randn(b, t, h * d) for _ in range(3))
    p = make_packing(keep, b, t, q.device)
    out = unpack(varlen_sdpa(pack(q, p), pack(k, p), pack(v, p), p, h, d, scale=None, causal=causal), p)
    # dense reference, one sequence at a time on its valid tokens
    for i in range(b):
        qi, ki, vi = (z[i][keep[i]].view(-1, h, d).transpose(0, 1) for z in (q, k, v))
        ref = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal).transpose(0, 1).reshape(-1, h * d)
        torch.testing.assert_close(out[i][keep[i]], ref, rtol=1e-5, atol=1e-6)
    # on the CPU: short sequences share one masked grid, longer ones are attended one by one in place
    groups = p.groups(causal)
    assert len(groups) == 1 if t == 7 else (len(groups) == 3 and all(g.span for g in groups))


@pytest.mark.parametrize("grids", [False, True], ids=["cpu-per-sequence", "gpu-style-grids"])
@pytest.mark.parametrize("causal", [False, True])
def test_many_lengths_are_exact_with_either_strategy(causal: bool, grids: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Ten spread lengths (one empty row): per-sequence calls (the CPU's choice) or at most
    MAX_GROUPS masked grids (a GPU's), each exact."""
    from patchkit import varlen

    if grids:
        monkeypatch.setattr(varlen, "cpu_strategy", lambda device, longest: False)
    torch.manual_seed(1)
    lens = [200, 0, 150, 121, 100, 80, 60, 40, 20, 5]
    b, t, h, d = len(lens), 200, 2, 8
    keep = torch.arange(t)[None, :] < torch.tensor(lens)[:, None]
    q, k, v = (torch.randn(b, t, h * d) for _ in range(3))
    p = make_packing(keep, b, t, q.device)
    groups = p.groups(causal)
    if grids:
        assert 1 < len(groups) <= 4 and sum(g.count for g in groups) == 9
    else:
        assert len(groups) == 9 and all(g.span for g in groups)
    out = unpack(varlen_sdpa(pack(q, p), pack(k, p), pack(v, p), p, h, d, scale=None, causal=causal), p)
    for i in range(b):
        if lens[i] == 0:
            assert torch.count_nonzero(out[i]) == 0
            continue
        qi, ki, vi = (z[i][keep[i]].view(-1, h, d).transpose(0, 1) for z in (q, k, v))
        ref = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal).transpose(0, 1).reshape(-1, h * d)
        torch.testing.assert_close(out[i][keep[i]], ref, rtol=1e-5, atol=1e-6)


def test_key_padding_reads_sdpa_and_eager_masks() -> None:
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    bool4d = keep[:, None, None, :].expand(2, 1, 4, 4)
    got, why = key_padding(bool4d, 2, 4)
    assert why is None and torch.equal(got, keep)
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~bool4d, torch.finfo(torch.float32).min)
    got, why = key_padding(additive, 2, 4)
    assert why is None and torch.equal(got, keep)
    assert key_padding(None, 2, 4) == (None, None)
    got, why = key_padding(keep.long(), 2, 4)
    assert why is None and torch.equal(got, keep)


def test_key_padding_refuses_non_padding_masks() -> None:
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None].expand(2, 1, 4, 4)
    assert key_padding(causal, 2, 4)[1] is not None
    bias = torch.randn(2, 1, 4, 4).clamp(-1, 0)
    bias = bias.expand(2, 1, 4, 4).contiguous()
    bias[:, :, 1:] = bias[:, :, :1]  # rows equal, but a soft bias is not padding
    assert key_padding(bias, 2, 4)[1] is not None
    assert key_padding(object(), 2, 4)[1] is not None


def test_same_code_sees_through_names_but_not_changes() -> None:
    def f(x: int) -> int:
        return x + 1

    def g(x: int) -> int:
        return x + 1

    def h(x: int) -> int:
        return x + 2

    assert same_code(f, g)
    assert not same_code(f, h)


@pytest.mark.parametrize("t", [5, 80])  # short runs: one gathered GEMM; long runs: a GEMM per run, in place
@pytest.mark.parametrize("bias", [True, False])
def test_zero_row_skipping_head_equals_linear(t: int, bias: bool) -> None:
    import types

    from patchkit_sdpa._head import skip_zero_rows_forward
    from torch import nn

    torch.manual_seed(0)
    lin = nn.Linear(6, 11, bias=bias)
    head = types.MethodType(skip_zero_rows_forward, lin)
    x = torch.randn(3, t, 6)
    x[0, 3:] = 0  # right padding
    x[2, : t // 2] = 0  # left padding
    for inp in (x, torch.zeros(2, t, 6), torch.randn(2, t, 6)):
        with torch.no_grad():
            exp, got = lin(inp), head(inp)
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)
