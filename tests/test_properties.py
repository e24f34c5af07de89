"""Property-based tests: random module trees (nesting, containers, shared modules, hooks)."""

from __future__ import annotations

import pytest
import torch
from helpers import ScaledLinear, registry_with, scaled_linear_patcher, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import patchkit

leaf = st.sampled_from(["linear", "relu", "dropout"])


def trees(max_leaves: int = 12):
    return st.recursive(
        leaf,
        lambda children: st.tuples(
            st.sampled_from(["seq", "list", "dict"]), st.lists(children, min_size=1, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def build(spec, pool: list[nn.Module], share: list[bool]) -> nn.Module:
    """Turn a spec into modules; ``share`` decides per leaf whether to reuse an earlier Linear."""
    if isinstance(spec, str):
        if spec == "linear":
            if pool and share and share.pop():
                return pool[-1]
            module = nn.Linear(3, 3)
            pool.append(module)
            return module
        return nn.ReLU() if spec == "relu" else nn.Dropout(0.1)
    kind, children = spec
    built = [build(c, pool, share) for c in children]
    if kind == "seq":
        return nn.Sequential(*built)
    if kind == "list":
        return nn.ModuleList(built)
    return nn.ModuleDict({f"m{i}": m for i, m in enumerate(built)})


def make(spec, share_bits, hook_bits) -> nn.Module:
    torch.manual_seed(0)
    root = nn.ModuleDict({"root": build(spec, [], list(share_bits))})
    for module, bit in zip(root.modules(), hook_bits, strict=False):
        if bit:
            module.register_forward_hook(lambda m, i, o: o)
            module.register_forward_pre_hook(lambda m, i: None)
    return root


def n_linears(model: nn.Module) -> int:
    return len({id(m) for m in model.modules() if isinstance(m, nn.Linear)})


common = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@common
@given(trees(), st.lists(st.booleans(), max_size=12), st.lists(st.booleans(), max_size=30))
def test_apply_then_reverse_is_exact(spec, share_bits, hook_bits):
    model = make(spec, share_bits, hook_bits)
    before = snapshot(model)
    linears = n_linears(model)
    report = patchkit.apply(model, patch="scale", strict=False, registry=registry_with(scaled_linear_patcher()))
    assert len(report.swaps) == linears
    assert all(isinstance(m, ScaledLinear) for m in model.modules() if isinstance(m, nn.Linear))
    assert patchkit.is_patched(model) == bool(linears)  # a no-op apply leaves no trace
    if linears:
        patchkit.reverse(model)
    assert snapshot(model) == before


@common
@given(trees(), st.lists(st.booleans(), max_size=12), st.integers(min_value=1, max_value=12))
def test_fault_at_kth_swap_leaves_model_unchanged(spec, share_bits, k):
    model = make(spec, share_bits, [])
    before = snapshot(model)
    registry = registry_with(scaled_linear_patcher(fail_at=k))
    if k > n_linears(model):
        patchkit.apply(model, patch="scale", strict=False, registry=registry)
        if patchkit.is_patched(model):
            patchkit.reverse(model)
    else:
        with pytest.raises(RuntimeError, match="injected failure"):
            patchkit.apply(model, patch="scale", strict=False, registry=registry)
    assert snapshot(model) == before and not patchkit.is_patched(model)


@common
@given(trees(), st.lists(st.booleans(), max_size=12))
def test_patching_one_model_leaves_another_untouched(spec, share_bits):
    a, b = make(spec, share_bits, []), make(spec, share_bits, [])
    before_b = snapshot(b)
    patchkit.apply(a, patch="scale", strict=False, registry=registry_with(scaled_linear_patcher()))
    assert snapshot(b) == before_b
    x = torch.randn(2, 3)
    for la, lb in zip(
        [m for m in a.modules() if isinstance(m, nn.Linear)],
        [m for m in b.modules() if isinstance(m, nn.Linear)],
        strict=False,
    ):
        assert torch.allclose(la(x), 2 * lb(x))
