"""Shared helpers of the bitsandbytes tests (no tests here): tiny random models and comparisons."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

from exactness import tiny_bert, tiny_falcon, tiny_llama  # noqa: E402  (after the importorskips)

MODELS = {"llama": tiny_llama, "bert": tiny_bert, "falcon": tiny_falcon}


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(1))


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def snapshot(model: nn.Module) -> dict[str, object]:
    """Every module and parameter object by name, plus a copy of each parameter's values."""
    return {
        "modules": dict(model.named_modules(remove_duplicate=False)),
        "params": dict(model.named_parameters(remove_duplicate=False)),
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def assert_same_objects(model: nn.Module, snap: dict[str, object]) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    assert modules.keys() == snap["modules"].keys()  # type: ignore[attr-defined]
    assert all(modules[k] is v for k, v in snap["modules"].items())  # type: ignore[attr-defined]
    assert params.keys() == snap["params"].keys()  # type: ignore[attr-defined]
    assert all(params[k] is v for k, v in snap["params"].items())  # type: ignore[attr-defined]
