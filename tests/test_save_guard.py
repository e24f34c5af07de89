"""The save guard on a real transformers model, and byte-identical saving after reverse."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import registry_with, scaled_linear_patcher, snapshot

import patchkit
from patchkit import PatchedModelError

transformers = pytest.importorskip("transformers")


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_save_refused_while_patched_and_byte_identical_after_reverse(tmp_path):
    model, twin = tiny_llama(), tiny_llama()
    before = snapshot(model)
    # A declared difference is always refused (a declared sameness is verified, never trusted).
    patcher = scaled_linear_patcher(same_checkpoint=False)
    patchkit.apply(model, patch="scale", registry=registry_with(patcher))
    with pytest.raises(PatchedModelError, match=r"patchkit.reverse\(model\)"):
        model.save_pretrained(tmp_path / "patched")
    with pytest.raises(PatchedModelError, match="push_to_hub"):
        model.push_to_hub("someone/model")
    assert not (tmp_path / "patched").exists()
    twin.save_pretrained(tmp_path / "twin")  # per instance: the other model still saves
    patchkit.reverse(model)
    assert snapshot(model) == before
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "reversed")
    assert digest(tmp_path / "reversed") == digest(tmp_path / "twin")


def test_a_parameter_sharing_patch_saves_the_original_checkpoint(tmp_path):
    model, twin = tiny_llama(), tiny_llama()
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))
    model.save_pretrained(tmp_path / "patched")  # verified: the state dict is the original's
    twin.save_pretrained(tmp_path / "twin")
    assert digest(tmp_path / "patched") == digest(tmp_path / "twin")


def test_reverse_works_when_wrapped_by_peft_after_patching():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    before = snapshot(model)
    # patch only the MLPs, then let PEFT wrap the attention projections
    patchkit.apply(model, patch="scale", only=["re:.*mlp\\..*"], registry=registry_with(scaled_linear_patcher()))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    merged = wrapped.merge_and_unload()
    assert merged is model
    # PEFT restored the q_proj modules; patchkit's journal is on the model and still undoes its own swaps
    patchkit.reverse(merged)
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    # same parameter objects and storage (PEFT itself leaves requires_grad=False behind; not ours to undo)
    assert [p[:3] for p in after["params"]] == [p[:3] for p in before["params"]]
