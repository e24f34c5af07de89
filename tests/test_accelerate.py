"""Patched models under real accelerate dispatch and offload (CPU): hooks carried and restored."""

from __future__ import annotations

import copy

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


# --- real plugins: flash2 (reference kernel) on a tiny Llama, sdpa on a tiny BERT -------------------------

transformers = pytest.importorskip("transformers")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
        use_cache=False,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    return transformers.BertModel(cfg).eval()


MODELS = {
    # name: (build, apply kwargs, output of a forward, a block-level device_map for dispatch_model)
    "llama-flash2": (
        tiny_llama,
        dict(attention="flash2", backend="reference"),
        lambda o: o.logits,
        {
            "model.embed_tokens": "cpu",
            "model.layers.0": "disk",
            "model.layers.1": "cpu",
            "model.norm": "cpu",
            "model.rotary_emb": "cpu",
            "lm_head": "disk",
        },
    ),
    # BERT is dispatched leaf by leaf: see test_sdpa_patches_a_dispatched_encoder_block for why.
    "bert-sdpa": (tiny_bert, dict(attention="sdpa"), lambda o: o.last_hidden_state, None),
}


def padded_batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 8:] = 0
    return ids.to(device), mask.to(device)


def leaf_device_map(model: nn.Module) -> dict[str, str]:
    """Every module holding parameters of its own, alternately kept on the CPU and offloaded to disk."""
    leaves = [n for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
    return {name: ("disk" if i % 2 else "cpu") for i, name in enumerate(leaves)}


def dispatch(model: nn.Module, mode: str, folder: str, block_map: dict | None, device: str = "cpu") -> nn.Module:
    execution = torch.device(device)
    if mode == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device=execution)
    if mode == "disk_offload":
        return accelerate.disk_offload(model, folder, execution_device=execution)
    device_map = dict(block_map) if block_map else leaf_device_map(model)
    if device != "cpu" and "model.layers.0" in device_map:
        device_map["model.layers.0"] = 0  # one decoder layer on the GPU itself, the rest offloaded
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=folder, main_device=device)


def hooks_of(model: nn.Module) -> dict[str, object]:
    return {name: m._hf_hook for name, m in model.named_modules() if hasattr(m, "_hf_hook")}


def check_plugin_under_accelerate(name: str, mode: str, folder: str, device: str = "cpu") -> None:
    build, kwargs, out, block_map = MODELS[name]
    model = build()
    ids, mask = padded_batch(device)
    valid = mask.bool()
    with torch.no_grad():
        plain = out(copy.deepcopy(model).to(device)(ids, attention_mask=mask))
        model = dispatch(model, mode, folder, block_map, device)
        hooks = hooks_of(model)
        modules = dict(model.named_modules())
        assert hooks and any(p.device.type == "meta" for p in model.parameters())  # really offloaded
        before = out(model(ids, attention_mask=mask))
        assert torch.allclose(before[valid], plain[valid], atol=1e-5)

        report = patchkit.apply(model, **kwargs)
        assert report.swaps
        # every hook still sits at its path; a replaced module carries the original's hook
        assert {n: id(h) for n, h in hooks_of(model).items()} == {n: id(h) for n, h in hooks.items()}
        # (offload hooks sit on modules holding parameters: a replaced BERT encoder has none to carry; a
        # replaced module that has one gets it through share_as, see the ScaledLinear tests above)
        for swap in report.swaps:
            for path in swap.paths:
                new = model.get_submodule(path)
                if new is not modules[path] and hasattr(modules[path], "_hf_hook"):
                    assert new._hf_hook is modules[path]._hf_hook and new._old_forward.__self__ is new
        after = out(model(ids, attention_mask=mask))
        assert (after - before)[valid].abs().max().item() <= 1e-5

        patchkit.reverse(model)
        assert hooks_of(model) == hooks
        assert all(m is modules[n] for n, m in model.named_modules())
        assert torch.equal(out(model(ids, attention_mask=mask)), before)


@pytest.mark.parametrize("mode", ["cpu_offload", "disk_offload", "dispatch_model"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_plugins_under_accelerate(name, mode, tmp_path):
    check_plugin_under_accelerate(name, mode, str(tmp_path))


def test_sdpa_patches_a_dispatched_encoder_block(tmp_path):
    model = accelerate.dispatch_model(
        tiny_bert(), device_map={"embeddings": "cpu", "encoder": "disk", "pooler": "cpu"}, offload_dir=str(tmp_path)
    )
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state
        patchkit.apply(model, attention="sdpa")
        after = model(ids, attention_mask=mask).last_hidden_state
    assert (after - before)[mask.bool()].abs().max().item() <= 1e-5


def offloaded_llama(mode: str, folder: str) -> nn.Module:
    return dispatch(tiny_llama(), mode, folder, None)


@pytest.mark.parametrize("family", ["int8", "nf4"])
@pytest.mark.parametrize("mode", ["cpu_offload", "disk_offload"])
def test_quantizing_an_offloaded_model_is_refused_before_any_change(mode, family, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = offloaded_llama(mode, str(tmp_path))
    hooks, modules = hooks_of(model), dict(model.named_modules())
    with pytest.raises(patchkit.UnsupportedError):
        patchkit.apply(model, quantize=family)
    assert hooks_of(model) == hooks and dict(model.named_modules()) == modules and not patchkit.is_patched(model)


def test_quantizing_an_offloaded_model_says_why(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = offloaded_llama("cpu_offload", str(tmp_path))
    with pytest.raises(patchkit.UnsupportedError, match=r"(?i)(accelerate|offload).*before dispatching"):
        patchkit.apply(model, quantize="int8")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("mode", ["cpu_offload", "disk_offload", "dispatch_model"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_plugins_under_accelerate_cuda(name, mode, tmp_path):
    """The same checks with the execution device on the GPU (fp32, reference kernel): run by bench/gpu_check.py."""
    check_plugin_under_accelerate(name, mode, str(tmp_path), device="cuda")
