"""The quantizers on CUDA (run by bench/gpu_check.py on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
from test_bnb_fixtures import assert_same_objects, snapshot, tiny_llama, tokens

import patchkit

bnb = pytest.importorskip("bitsandbytes")
from patchkit_bnb.record import record_of  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("family", ["int8", "fp4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_apply_forward_reverse(family: str, dtype: torch.dtype) -> None:
    model = tiny_llama().to("cuda", dtype)
    snap = snapshot(model)
    ids = tokens().cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    patchkit.apply(model, quantize=family)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.device.type == "cuda" and layer.weight.dtype in (torch.int8, torch.uint8)
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < 0.5 * ref.abs().max().item()
    errors = {n: r.error for n, m in model.named_modules() if (r := record_of(m)) is not None}
    patchkit.reverse(model)
    assert_same_objects(model, snap)
    for name, param in model.named_parameters():
        before = snap["values"][name]  # type: ignore[index]
        assert param.device.type == "cuda" and param.dtype == dtype
        module = name.rpartition(".")[0]
        if module in errors and name.endswith("weight"):
            assert (param - before).abs().max().item() == errors[module]
        else:
            assert torch.equal(param, before), name


@pytest.mark.parametrize("family", ["int8", "nf4"])
def test_cuda_keep_original_cpu_is_bit_identical(family: str) -> None:
    model = tiny_llama().to("cuda", torch.bfloat16)
    snap = snapshot(model)
    patchkit.apply(model, quantize=family, keep_original="cpu")
    with torch.no_grad():
        model(input_ids=tokens().cuda())
    patchkit.reverse(model)
    assert_same_objects(model, snap)
    assert all(torch.equal(p, snap["values"][n]) for n, p in model.named_parameters())  # type: ignore[index]
