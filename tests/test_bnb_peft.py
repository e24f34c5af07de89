"""QLoRA on a patchkit-quantized model: PEFT LoRA trains on top, then unload or merge, then reverse."""

from __future__ import annotations

import pytest
import torch
from test_bnb_fixtures import assert_same_objects, snapshot, tiny_llama, tokens

import patchkit

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def _train(model: torch.nn.Module, steps: int = 8) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = tokens(4, 16)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("family", ["int8", "nf4"])
def test_qlora_trains_then_unload_and_reverse_restores_the_base_model(family: str) -> None:
    model = tiny_llama()
    snap = snapshot(model)
    patchkit.apply(model, quantize=family, keep_original="cpu")
    assert getattr(model, "is_loaded_in_8bit" if family == "int8" else "is_loaded_in_4bit")
    wrapped = _lora(model)
    q_proj = wrapped.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__ == "peft.tuners.lora.bnb"  # PEFT picked its bitsandbytes-aware LoRA
    losses = _train(wrapped)
    assert losses[-1] < losses[0]
    with pytest.raises(patchkit.ConflictError, match="unload"):
        patchkit.reverse(wrapped)  # the adapter still wraps quantized layers: refuse, change nothing
    assert type(wrapped.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    base = wrapped.unload()
    assert base is model
    patchkit.reverse(model)
    assert_same_objects(model, snap)
    assert all(torch.equal(p, snap["values"][n]) for n, p in model.named_parameters())  # type: ignore[index]
    assert not hasattr(model, "is_loaded_in_4bit") or not model.__dict__.get("is_loaded_in_4bit")


@pytest.mark.parametrize("family", ["int8", "nf4"])
def test_merged_adapter_survives_reverse(family: str) -> None:
    model = tiny_llama()
    snap = snapshot(model)
    report = patchkit.apply(model, quantize=family, keep_original="cpu")  # reverse adds its notes to it
    wrapped = _lora(model)
    _train(wrapped)
    ids = tokens()
    with torch.no_grad():
        adapted = wrapped(input_ids=ids).logits
    merged = wrapped.merge_and_unload()
    assert merged is model
    with torch.no_grad():
        after_merge = model(input_ids=ids).logits
    scale = adapted.abs().max().item()
    assert (after_merge - adapted).abs().max().item() < 0.2 * scale  # merged into the quantized weights
    patchkit.reverse(model)
    assert_same_objects(model, snap)
    notes = " ".join(n for s in report.swaps for n in s.notes)
    assert "replaced since apply" in notes  # merged layers: dequantized current weights, not the stale copy
    with torch.no_grad():
        reversed_out = model(input_ids=ids).logits
    # The merged adapter is kept: the full-precision model behaves like the adapted one.
    assert (reversed_out - adapted).abs().max().item() < 0.2 * scale
    untouched = model.model.layers[0].self_attn.k_proj.weight  # not a LoRA target: bit-identical
    assert torch.equal(untouched, snap["values"]["model.layers.0.self_attn.k_proj.weight"])  # type: ignore[index]
