"""apply / reverse / plan on plain PyTorch trees with a test patcher registered through pluggy."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import ScaledLinear, registry_with, scaled_linear_patcher, snapshot
from torch import nn

import patchkit
from patchkit import ConflictError, NotPatchedError, Patcher, UnsupportedError


def small_model() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    return nn.Sequential(
        nn.Linear(4, 4),
        nn.ModuleDict({"a": shared, "b": nn.ModuleList([nn.ReLU(), shared])}),
        nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)),
    )


def test_apply_swaps_and_reverse_restores_exactly():
    model = small_model()
    model[0].register_forward_hook(lambda m, i, o: o)
    model[0].register_forward_pre_hook(lambda m, i: None)
    model[2][0].weight.requires_grad_(False)
    before = snapshot(model)
    x = torch.randn(2, 4)
    reference = model[0](x)

    report = patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))

    assert patchkit.is_patched(model)
    assert isinstance(model[0], ScaledLinear) and model[0].weight is not None
    assert torch.allclose(model[0](x), 2 * reference)
    assert len(report.swaps) == 3
    assert ["1.a", "1.b.1"] in [s.paths for s in report.swaps]
    assert "ScaledLinear" in str(report)
    patchkit.reverse(model)
    assert snapshot(model) == before
    assert not patchkit.is_patched(model)
    assert not hasattr(model[0], "patched_marker")


def test_shared_module_gets_one_replacement_everywhere():
    model = small_model()
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))
    assert model[1]["a"] is model[1]["b"][1]
    assert isinstance(model[1]["a"], ScaledLinear)


def test_replacement_shares_parameters_so_training_updates_user_tensors():
    model = small_model()
    weight = model[0].weight
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))
    assert model[0].weight is weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = weight.detach().clone()
    model[0](torch.randn(3, 4)).sum().backward()
    opt.step()
    patchkit.reverse(model)
    assert model[0].weight is weight and not torch.equal(weight, before)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_fault_injection_leaves_model_unchanged(fail_at):
    model = small_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher(fail_at=fail_at)))
    assert snapshot(model) == before
    assert not patchkit.is_patched(model)


def test_failure_in_setup_undoes_everything():
    def setup(root, ctx):
        ctx.set_attr(root, "flag", True)
        raise RuntimeError("setup failed")

    patcher = scaled_linear_patcher()
    patcher = Patcher(**{**patcher.__dict__, "setup": setup, "plugin": ""})
    model = small_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="setup failed"):
        patchkit.apply(model, patch="scale", registry=registry_with(patcher))
    assert snapshot(model) == before and not hasattr(model, "flag")


def test_check_runs_before_any_mutation_and_strict_false_skips():
    def check(module, ctx):
        if ctx.path == "2.0":
            raise UnsupportedError("this one is unsupported")
        return None

    registry = registry_with(scaled_linear_patcher(check=check))
    model = small_model()
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match=r"2\.0.*this one is unsupported"):
        patchkit.apply(model, patch="scale", registry=registry)
    assert snapshot(model) == before
    with pytest.warns(patchkit.PatchkitWarning, match=r"2\.0 \(Linear\): scaled-linear: this one is unsupported"):
        report = patchkit.apply(model, patch="scale", registry=registry, strict=False)
    assert [s.path for s in report.skipped] == ["2.0"]
    assert isinstance(model[0], ScaledLinear) and type(model[2][0]) is nn.Linear


def test_check_must_not_mutate():
    def check(module, ctx):
        ctx.set_attr(module, "x", 1)

    model = small_model()
    with pytest.raises(patchkit.PluginError, match="tried to change the model in check"):
        patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher(check=check)))
    assert not patchkit.is_patched(model)


def test_only_and_skip_patterns():
    registry = registry_with(scaled_linear_patcher())
    model = small_model()
    report = patchkit.apply(model, patch="scale", registry=registry, only=["2"])
    assert [s.paths for s in report.swaps] == [["2.0"]]
    patchkit.reverse(model)
    report = patchkit.apply(model, patch="scale", registry=registry, skip=[re.compile(r"1\..*"), "0"])
    assert [s.paths for s in report.swaps] == [["2.0"]]
    assert {s.path for s in report.skipped} == {"0", "1.a"}
    patchkit.reverse(model)
    # prefix only at a module boundary: "1.b" must not select "1.bb"
    plan = patchkit.plan(model, patch="scale", registry=registry, only=["re:0|2\\.0"])
    assert [p.paths for p in plan.patches] == [["0"], ["2.0"]]


def test_plan_changes_nothing_and_lists_skips():
    model = small_model()
    before = snapshot(model)
    plan = patchkit.plan(model, patch="scale", registry=registry_with(scaled_linear_patcher()), skip="0")
    assert snapshot(model) == before
    assert len(plan.patches) == 2 and plan.skipped[0].path == "0"
    assert "skip pattern" in str(plan)


def test_same_kind_twice_is_a_conflict_and_reverse_unpatched_raises():
    registry = registry_with(scaled_linear_patcher())
    model = small_model()
    patchkit.apply(model, patch="scale", registry=registry)
    with pytest.raises(ConflictError, match="already applied"):
        patchkit.apply(model, patch="scale", registry=registry)
    patchkit.reverse(model)
    with pytest.raises(NotPatchedError):
        patchkit.reverse(model)


def test_second_kind_extends_the_journal_and_reverse_undoes_both():
    attn = scaled_linear_patcher(name="attn-like", kind="attention", family="fake", fail_at=None)

    class Marked(nn.Dropout):
        pass

    drop = Patcher(
        name="drop", kind="quantize", family="q", match=nn.Dropout, build=lambda m, ctx: patchkit.share_as(m, Marked)
    )
    registry = registry_with(attn, drop)
    model = small_model()
    before = snapshot(model)
    patchkit.apply(model, attention="fake", registry=registry)
    patchkit.apply(model, quantize="q", registry=registry)
    assert patchkit.applied(model) == {"attention": "fake", "quantize": "q"}
    assert isinstance(model[2][1], Marked) and isinstance(model[0], ScaledLinear)
    patchkit.reverse(model)
    assert snapshot(model) == before


def test_priority_decides_and_equal_priority_conflicts():
    low = scaled_linear_patcher(name="low", priority=0)

    class Other(nn.Linear):
        pass

    high = Patcher(
        name="high",
        kind="other",
        family="scale",
        match=nn.Linear,
        priority=5,
        build=lambda m, ctx: patchkit.share_as(m, Other),
    )
    model = small_model()
    patchkit.apply(model, patch="scale", registry=registry_with(low, high))
    assert isinstance(model[0], Other)
    patchkit.reverse(model)
    tie = Patcher(name="tie", kind="other", family="scale", match=nn.Linear, priority=0, build=lambda m, ctx: m)
    with pytest.raises(ConflictError, match=r"'low'.*'tie'|'tie'.*'low'"):
        patchkit.apply(model, patch="scale", registry=registry_with(low, tie))
    assert type(model[0]) is nn.Linear


def test_patched_context_manager_reverses_on_error():
    model = small_model()
    before = snapshot(model)
    with pytest.raises(ValueError):
        with patchkit.patched(model, patch="scale", registry=registry_with(scaled_linear_patcher())):
            assert isinstance(model[0], ScaledLinear)
            raise ValueError("user code failed")
    assert snapshot(model) == before


def test_reverse_through_a_wrapper():
    model = small_model()
    before = snapshot(model)
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))
    wrapper = nn.Sequential(nn.Identity(), model)  # e.g. a PEFT / value-head wrapper made after patching
    patchkit.reverse(wrapper)
    assert snapshot(model) == before


def test_per_instance_other_model_untouched():
    a, b = small_model(), small_model()
    before_b = snapshot(b)
    patchkit.apply(a, patch="scale", registry=registry_with(scaled_linear_patcher()))
    assert snapshot(b) == before_b
    assert nn.Linear.forward is not ScaledLinear.forward


def test_train_eval_while_patched_carries_to_originals():
    model = small_model().eval()
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))
    model.train()
    patchkit.reverse(model)
    assert all(m.training for m in model.modules())


def test_nothing_to_patch_strict_raises_and_unknown_family_lists_known():
    registry = registry_with(scaled_linear_patcher())
    with pytest.raises(UnsupportedError, match="found nothing to patch"):
        patchkit.apply(nn.Sequential(nn.ReLU()), patch="scale", registry=registry)
    report = patchkit.apply(nn.Sequential(nn.ReLU()), patch="scale", registry=registry, strict=False)
    assert report.swaps == []
    with pytest.raises(UnsupportedError, match=r"available: \['scale'\]"):
        patchkit.apply(small_model(), patch="nope", registry=registry)


def test_requirements_checked_before_build():
    from patchkit import Requirements

    reg = registry_with(scaled_linear_patcher(requires=Requirements(devices=frozenset({"cuda"}))))
    with pytest.raises(UnsupportedError, match="runs on \\['cuda'\\]"):
        patchkit.apply(small_model(), patch="scale", registry=reg)
    reg = registry_with(scaled_linear_patcher(requires=Requirements(dtypes=frozenset({torch.bfloat16}))))
    with pytest.raises(UnsupportedError, match="cast the model"):
        patchkit.apply(small_model(), patch="scale", registry=reg)
    reg = registry_with(scaled_linear_patcher(requires=Requirements(training=False)))
    with pytest.raises(UnsupportedError, match="model.eval"):
        patchkit.apply(small_model().train(), patch="scale", registry=reg)
    reg = registry_with(scaled_linear_patcher(requires=Requirements(packages={"patchkit-not-a-package": ">=1"})))
    with pytest.raises(UnsupportedError, match="pip install"):
        patchkit.apply(small_model(), patch="scale", registry=reg)
    # meta tensors pass the device check: planning before loading
    with torch.device("meta"):
        meta = small_model()
    reg = registry_with(scaled_linear_patcher(requires=Requirements(devices=frozenset({"cuda"}))))
    assert len(patchkit.plan(meta, patch="scale", registry=reg).patches) == 3


def test_reverse_refuses_when_a_patched_slot_was_wrapped_afterwards():
    model = small_model()
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))
    replacement = model[0]
    model[0] = nn.Sequential(replacement)  # e.g. an adapter wrapping patchkit's layer
    with pytest.raises(ConflictError, match="unload"):
        patchkit.reverse(model)
    assert patchkit.is_patched(model) and model[2][0].__class__ is ScaledLinear  # nothing was undone
    model[0] = replacement
    patchkit.reverse(model)
    assert type(model[0]) is nn.Linear


def test_reverse_across_layers_that_replaced_each_others_modules():
    outer = Patcher(
        name="outer",
        kind="attention",
        family="o",
        match=nn.Linear,
        build=lambda m, ctx: patchkit.share_as(m, ScaledLinear),
    )

    class Twice(ScaledLinear):
        pass

    inner = Patcher(
        name="inner", kind="quantize", family="i", match=ScaledLinear, build=lambda m, ctx: patchkit.share_as(m, Twice)
    )
    registry = registry_with(outer, inner)
    model = small_model()
    before = snapshot(model)
    patchkit.apply(model, attention="o", registry=registry)
    patchkit.apply(model, quantize="i", registry=registry)
    assert type(model[0]) is Twice
    patchkit.reverse(model)
    assert snapshot(model) == before


def test_setup_notes_reach_the_report():
    def setup(root, ctx):
        ctx.note(f"model-level change for {len(ctx.selected)} modules")

    patcher = scaled_linear_patcher()
    patcher = Patcher(**{**patcher.__dict__, "setup": setup, "plugin": ""})
    report = patchkit.apply(small_model(), patch="scale", registry=registry_with(patcher))
    assert report.notes == ["scaled-linear: model-level change for 4 modules"]
    assert "model-level change" in str(report)
