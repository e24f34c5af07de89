"""Quantizers combined with the attention patchers (sdpa for BERT, flash2 for Llama), in either order."""

from __future__ import annotations

import pytest
import torch
from test_bnb_fixtures import assert_same_objects, snapshot, tiny_bert, tiny_llama, tokens

import patchkit

bnb = pytest.importorskip("bitsandbytes")

ATTENTION = {
    "bert": ({"attention": "sdpa"}, tiny_bert),
    "llama": ({"attention": "flash2", "backend": "reference"}, tiny_llama),
}


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = tokens(3, 12)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding: right for BERT, left for the decoder
    if arch == "llama":
        mask = mask.flip(-1)
    return {"input_ids": ids, "attention_mask": mask}


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return hidden * inputs["attention_mask"][..., None]  # compare valid tokens only


def _available(arch: str, model: torch.nn.Module) -> None:
    kwargs = ATTENTION[arch][0]
    try:
        plan = patchkit.plan(model, **kwargs)
    except patchkit.PatchError as exc:
        pytest.skip(f"attention patcher unavailable here: {exc}")
    assert plan.patches


@pytest.mark.parametrize("family", ["int8", "nf4"])
@pytest.mark.parametrize("order", ["one-call", "quantize-first", "attention-first"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_quantize_and_attention_compose_and_reverse(arch: str, order: str, family: str) -> None:
    attention, make = ATTENTION[arch]
    model = make()
    _available(arch, model)
    inputs = _inputs(arch)
    snap = snapshot(model)

    quantized_only = make()
    patchkit.apply(quantized_only, quantize=family)
    expected = _run(quantized_only, inputs)  # same weights quantize the same way: deterministic

    if order == "one-call":
        report = patchkit.apply(model, quantize=family, keep_original="cpu", **attention)
        assert set(report.applied) == {"attention", "quantize"}
    elif order == "quantize-first":
        patchkit.apply(model, quantize=family, keep_original="cpu")
        patchkit.apply(model, **attention)
    else:
        patchkit.apply(model, **attention)
        patchkit.apply(model, quantize=family, keep_original="cpu")
    assert set(patchkit.applied(model)) == {"attention", "quantize"}
    assert sum(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules()) == sum(
        isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in quantized_only.modules()
    )
    got = _run(model, inputs)
    assert (got - expected).abs().max().item() <= 2e-3 * expected.abs().max().item()

    patchkit.reverse(model)
    assert_same_objects(model, snap)
    for name, param in model.named_parameters():
        assert torch.equal(param, snap["values"][name]), name  # type: ignore[index]
    assert not patchkit.is_patched(model)
