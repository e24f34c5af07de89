"""Saving a patchkit-quantized model as a bitsandbytes checkpoint that transformers reloads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_bnb_fixtures import output, tiny_bert, tiny_falcon, tiny_llama, tokens

import patchkit

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from patchkit_bnb.saving import quantized_state_dict, save_quantized  # noqa: E402


def _same_kernel(model: torch.nn.Module, packing: bool) -> torch.nn.Module:
    """Use the CPU kernel patchkit's layers use (bitsandbytes repacks loaded 4-bit layers by default)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = packing and bnb.functional.has_avx512bf16()
    return model


@pytest.mark.parametrize("family", ["int8", "fp4", "nf4"])
def test_saved_checkpoint_reloads_with_equal_outputs(family: str, tmp_path: os.PathLike[str]) -> None:
    model = tiny_llama(tie_word_embeddings=True)
    # int8: bitsandbytes' own CPU kernel, the one the reloaded Linear8bitLt layers run (the weights
    # are compared bit for bit below whatever the kernel).
    kernel = {"int8_cpu_kernel": "llm_int8"} if family == "int8" else {}
    patchkit.apply(model, quantize=family, skip=["model.layers.1.mlp"], **kernel)
    ids = tokens()
    expected = output(model, ids)
    with pytest.raises(patchkit.PatchedModelError):
        model.save_pretrained(tmp_path)  # the plain save stays guarded while patched
    with pytest.raises(patchkit.PatchedModelError, match="quantized=True"):
        patchkit.save_pretrained(model, tmp_path)
    patchkit.save_pretrained(model, tmp_path, quantized=True)  # the public entry point to save_quantized
    config = json.loads(open(os.path.join(tmp_path, "config.json")).read())["quantization_config"]
    assert config["load_in_8bit" if family == "int8" else "load_in_4bit"]
    reloaded = _same_kernel(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), False)
    cls = bnb.nn.Linear8bitLt if family == "int8" else bnb.nn.Linear4bit
    names = {n for n, m in model.named_modules() if isinstance(m, cls)}
    assert names == {n for n, m in reloaded.named_modules() if isinstance(m, cls)}
    assert "model.layers.1.mlp.up_proj" not in names and "lm_head" not in names
    assert torch.equal(output(reloaded, ids), expected)
    written = quantized_state_dict(model)
    loaded = {k: v for k, v in reloaded.state_dict().items() if k in written}
    assert set(loaded) == set(written)  # every tensor written (quantization state included) was loaded
    assert all(torch.equal(loaded[k].cpu(), written[k]) for k in loaded), "reloaded tensors differ"
    # Explicitly passing the same BitsAndBytesConfig loads it too.
    quant = transformers.BitsAndBytesConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant).eval()
    _same_kernel(again, False)
    assert torch.equal(output(again, ids), expected)
    patchkit.reverse(model)


def test_saving_after_cpu_packing_writes_the_state_as_quantized(tmp_path: os.PathLike[str]) -> None:
    model = tiny_bert()
    patchkit.apply(model, quantize="nf4", cpu_packing=True)
    ids = tokens()
    expected = output(model, ids)  # repacks on AVX512-BF16 CPUs
    patchkit.save_pretrained(model, tmp_path, quantized=True)
    reloaded = _same_kernel(transformers.AutoModel.from_pretrained(tmp_path).eval(), True)
    assert (output(reloaded, ids) - expected).abs().max().item() < 1e-5
    patchkit.reverse(model)


def test_saving_refuses_layers_transformers_would_not_reload(tmp_path: os.PathLike[str]) -> None:
    model = tiny_falcon()
    patchkit.apply(model, quantize="int8")
    with pytest.raises(patchkit.UnsupportedError, match="FalconLinear"):
        patchkit.save_pretrained(model, tmp_path, quantized=True)
    assert not os.listdir(tmp_path)
    patchkit.reverse(model)
    with pytest.raises(patchkit.UnsupportedError, match="no layer quantized"):
        save_quantized(model, tmp_path)  # the writer itself (unpatched, save_pretrained saves the original)
