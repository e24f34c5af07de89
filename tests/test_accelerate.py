"""Patched models under real accelerate dispatch and offload (CPU): hooks carried and restored."""

from __future__ import annotations

import pytest
import torch
from helpers import ScaledLinear, registry_with, scaled_linear_patcher
from torch import nn

import patchkit

accelerate = pytest.importorskip("accelerate")


def model_and_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 4))
    return model.eval(), torch.randn(3, 8)


def expected(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the ScaledLinear patch computes, from an unhooked twin."""
    h = torch.relu(2 * model[0](x))
    h = torch.tanh(2 * model[2][0](h))
    return 2 * model[3](h)


@pytest.mark.parametrize("mode", ["cpu_offload", "disk_offload"])
def test_offloaded_model_patch_and_reverse(mode, tmp_path):
    model, x = model_and_input()
    twin, _ = model_and_input()
    if mode == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        accelerate.disk_offload(model, str(tmp_path), execution_device=torch.device("cpu"))
    hooks = {name: m._hf_hook for name, m in model.named_modules() if hasattr(m, "_hf_hook")}
    assert hooks and model[0].weight.device.type == "meta"  # really offloaded
    with torch.no_grad():
        before = model(x)
        assert torch.allclose(before, twin(x), atol=1e-6)
        patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))
        assert isinstance(model[0], ScaledLinear) and model[0]._hf_hook is hooks["0"]
        assert torch.allclose(model(x), expected(twin, x), atol=1e-5)
        patchkit.reverse(model)
        assert {name: m._hf_hook for name, m in model.named_modules() if hasattr(m, "_hf_hook")} == hooks
        assert type(model[0]) is nn.Linear and model[0].weight.device.type == "meta"
        assert torch.equal(model(x), before)


def test_dispatched_model_patch_and_reverse():
    model, x = model_and_input()
    twin, _ = model_and_input()
    model = accelerate.dispatch_model(model, device_map={"0": "cpu", "1": "cpu", "2": "cpu", "3": "cpu"})
    with torch.no_grad():
        before = model(x)
        patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))
        assert torch.allclose(model(x), expected(twin, x), atol=1e-5)
        patchkit.reverse(model)
        assert torch.equal(model(x), before)
