"""int8 / fp4 / nf4 apply and reverse on tiny random Llama, BERT and Falcon (real transformers code)."""

from __future__ import annotations

import os

import pytest
import torch
from test_bnb_fixtures import MODELS, assert_same_objects, output, snapshot, tiny_bert, tiny_falcon, tiny_llama, tokens
from torch import nn

import patchkit

bnb = pytest.importorskip("bitsandbytes")
from patchkit_bnb.record import record_of  # noqa: E402

FAMILIES = ["int8", "fp4", "nf4"]
CLASSES = {"int8": bnb.nn.Linear8bitLt, "fp4": bnb.nn.Linear4bit, "nf4": bnb.nn.Linear4bit}
# Loose bounds on random-init tiny models: these check wiring, quality is measured on MiniLM.
CLOSE = {"int8": 0.05, "fp4": 0.5, "nf4": 0.5}


def _quantized(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if record_of(m) is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_apply_then_reverse_restores_objects_and_reports_exact_error(arch: str, family: str) -> None:
    model = MODELS[arch]()
    ids = tokens()
    ref = output(model, ids)
    snap = snapshot(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    report = patchkit.apply(model, quantize=family)
    layers = _quantized(model)
    assert layers and all(isinstance(m, CLASSES[family]) for m in layers.values())
    assert {s.paths[0] for s in report.swaps} == set(layers)
    assert set(layers) | {s.path for s in report.skipped} == linears  # the report names every linear
    out = output(model, ids)  # runs bitsandbytes' CPU kernels (4-bit repacks its weights here)
    assert (out - ref).abs().max().item() < CLOSE[family] * ref.abs().max().item()
    errors = {n: record_of(m).error for n, m in layers.items()}  # type: ignore[union-attr]
    notes = {s.paths[0]: " ".join(s.notes) for s in report.swaps}
    assert all(f"max|dW| {e:.3g}" in notes[n] for n, e in errors.items())

    patchkit.reverse(model)
    assert_same_objects(model, snap)
    params = dict(model.named_parameters())
    for name, before in snap["values"].items():  # type: ignore[attr-defined]
        module_name, _, leaf = name.rpartition(".")
        now = params[name]
        assert now.dtype == before.dtype and now.shape == before.shape and now.device == before.device
        if module_name in errors and leaf == "weight":
            # reverse dequantizes from the state measured at apply: the reported error is the real one
            assert (now - before).abs().max().item() == errors[module_name]
            assert 0 < errors[module_name] < 0.05
        else:
            assert torch.equal(now, before), name
    assert not patchkit.is_patched(model)


def test_falcon_linear_is_quantized_and_comes_back_a_falcon_linear() -> None:
    from transformers.models.falcon.modeling_falcon import FalconLinear

    model = tiny_falcon()
    originals = {n: m for n, m in model.named_modules() if isinstance(m, FalconLinear)}
    assert originals
    patchkit.apply(model, quantize="nf4")
    assert all(isinstance(model.get_submodule(n), bnb.nn.Linear4bit) for n in originals)
    patchkit.reverse(model)
    assert all(model.get_submodule(n) is m and type(m) is FalconLinear for n, m in originals.items())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", ["cpu", "dir"])
def test_keep_original_reverses_bit_identical(family: str, where: str, tmp_path: os.PathLike[str]) -> None:
    model = tiny_llama()
    snap = snapshot(model)
    keep = "cpu" if where == "cpu" else os.fspath(tmp_path)
    report = patchkit.apply(model, quantize=family, keep_original=keep)
    assert all("bit-identical" in " ".join(s.notes) for s in report.swaps)
    if where == "dir":
        assert len(os.listdir(tmp_path)) == len(report.swaps)
    output(model, tokens())
    patchkit.reverse(model)
    assert_same_objects(model, snap)
    for name, param in model.named_parameters():
        assert torch.equal(param, snap["values"][name]), name  # type: ignore[index]
    if where == "dir":
        assert os.listdir(tmp_path) == []


def test_original_weight_memory_is_freed_while_quantized() -> None:
    model = tiny_llama()
    weight = model.model.layers[0].mlp.up_proj.weight
    patchkit.apply(model, quantize="int8")
    assert weight.numel() == 0  # the Parameter object is kept, its fp32 storage is released
    patchkit.reverse(model)
    assert weight.shape == (128, 64)


def test_bias_is_shared_and_hooks_keep_firing() -> None:
    model = tiny_bert()
    query = model.encoder.layer[0].attention.self.query
    calls: list[int] = []
    handle = query.register_forward_hook(lambda m, i, o: calls.append(1))
    patchkit.apply(model, quantize="nf4")
    replacement = model.encoder.layer[0].attention.self.query
    assert replacement is not query and replacement.bias is query.bias
    output(model, tokens())
    assert calls == [1]
    patchkit.reverse(model)
    output(model, tokens())
    assert calls == [1, 1]
    handle.remove()


def test_training_flag_follows_the_model_and_other_instances_are_untouched() -> None:
    model, other = tiny_llama(), tiny_llama()
    other_snap = snapshot(other)
    other_ref = output(other, tokens())
    patchkit.apply(model, quantize="nf4")
    model.train()
    assert_same_objects(other, other_snap)
    assert torch.equal(output(other, tokens()), other_ref)
    assert type(other.model.layers[0].mlp.up_proj) is nn.Linear
    patchkit.reverse(model)
    assert model.model.layers[0].mlp.up_proj.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["int8", "nf4"])
def test_half_precision_models_come_back_in_their_dtype(family: str, dtype: torch.dtype) -> None:
    model = tiny_llama().to(dtype)
    snap = snapshot(model)
    patchkit.apply(model, quantize=family)
    assert torch.isfinite(output(model, tokens()).float()).all()
    patchkit.reverse(model)
    assert_same_objects(model, snap)
    assert all(p.dtype == dtype for p in model.parameters())


def test_options_reach_the_layers() -> None:
    model = tiny_llama()
    patchkit.apply(model, quantize="int8", threshold=3.5)
    assert model.model.layers[0].mlp.up_proj.state.threshold == 3.5
    patchkit.reverse(model)
    patchkit.apply(
        model,
        quantize="nf4",
        compute_dtype=torch.bfloat16,
        double_quant=False,
        blocksize=128,
        quant_storage=torch.bfloat16,
    )
    layer = model.model.layers[0].mlp.up_proj
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.quant_storage == torch.bfloat16
    assert layer.weight.quant_state.blocksize == 128 and not layer.weight.quant_state.nested
    output(model, tokens())
    patchkit.reverse(model)


def test_odd_shapes_use_the_portable_4bit_path() -> None:
    model = nn.Sequential(nn.Linear(40, 50), nn.ReLU(), nn.Linear(50, 30)).eval()
    x = torch.randn(3, 40)
    ref = model(x)
    patchkit.apply(model, quantize="nf4")
    with torch.no_grad():
        out = model(x)
    assert (out - ref).abs().max() < 0.5 * ref.abs().max()
    patchkit.reverse(model)


def test_cpu_packing_option_keeps_reverse_exact() -> None:
    model = tiny_llama()
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    patchkit.apply(model, quantize="nf4", cpu_packing=True)
    layer = model.model.layers[0].mlp.up_proj
    error = record_of(layer).error  # type: ignore[union-attr]
    output(model, tokens())
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    assert layer.weight.quant_state.packing_format_for_cpu  # bitsandbytes rewrote the live state
    patchkit.reverse(model)
    assert (model.model.layers[0].mlp.up_proj.weight - before).abs().max().item() == error
