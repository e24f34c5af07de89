"""transformers' Conv1D (GPT-2 and kin) is quantized like nn.Linear, with the same reverse guarantees."""

from __future__ import annotations

import pytest
import torch
from exactness import full_state
from torch import nn

import patchkit

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from patchkit_bnb.record import record_of  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("family", ["int8", "nf4", "fp4"])
def test_gpt2_conv1d_layers_are_quantized_and_reverse_exactly_with_keep_original(family: str) -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _hidden(model, ids)
    before = full_state(model)
    convs = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    report = patchkit.apply(model, quantize=family, keep_original="cpu")
    assert {s.paths[0] for s in report.swaps} == convs  # every Conv1D, and lm_head (tied) left alone
    out = _hidden(model, ids)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min().item()
    assert cos > {"int8": 0.999, "nf4": 0.98, "fp4": 0.97}[family]
    patchkit.reverse(model)
    assert full_state(model) == before
    assert torch.equal(_hidden(model, ids), ref)


def test_gpt2_conv1d_reverse_without_keep_dequantizes_in_the_stored_orientation() -> None:
    model = tiny_gpt2()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Conv1D)}
    patchkit.apply(model, quantize="int8")
    errors = {n: record_of(model.get_submodule(n)).error for n in weights}  # type: ignore[union-attr]
    patchkit.reverse(model)
    for name, before in weights.items():
        now = model.get_submodule(name).weight
        assert now.shape == before.shape  # [in, out], as Conv1D stores it
        assert (now - before).abs().max().item() == pytest.approx(errors[name])
        assert errors[name] < 0.05


def test_installed_transformers_reloads_quantized_conv1d() -> None:
    """Saving Conv1D-quantized models is allowed where this probe says transformers converts Conv1D on
    load (the reload itself: tests/test_bnb_defects.py); elsewhere saving refuses with its reason."""
    from patchkit_bnb.saving import conv1d_reload_problem

    assert conv1d_reload_problem() is None
