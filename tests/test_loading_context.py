"""What a patcher sees under ``patchkit.from_pretrained`` (docs/api.md, "What patcher callbacks receive"):
``ctx.checkpoint_source`` answers in both ``check`` and ``build`` of the quantize stage while loading and
is ``None`` elsewhere; the attention stage is built on meta tensors; ``from_pretrained(registry=)``
loads with the given plugins only; ``TensorSource.read(where)`` reads the tensor back as stored."""

from __future__ import annotations

import pathlib
import types
from typing import Any

import pytest
import torch
from torch import nn

import patchkit

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from transformers.models.opt.modeling_opt import OPTAttention  # noqa: E402

Seen = list[tuple[str, str, Any, str]]  # (stage:callback, path, source, weight device type)


def _probe_plugin(seen: Seen) -> types.ModuleType:
    def record(stage: str, module: nn.Module, ctx: patchkit.PatchContext, weight: torch.Tensor) -> None:
        seen.append((stage, ctx.path, ctx.checkpoint_source(weight), weight.device.type))

    def q_check(module: nn.Module, ctx: patchkit.PatchContext) -> None:
        record("quantize:check", module, ctx, module.weight)

    def q_build(module: nn.Module, ctx: patchkit.PatchContext) -> None:
        record("quantize:build", module, ctx, module.weight)

    def a_build(module: nn.Module, ctx: patchkit.PatchContext) -> None:
        record("attention:build", module, ctx, module.q_proj.weight)

    def o_build(module: nn.Module, ctx: patchkit.PatchContext) -> None:
        record("other:build", module, ctx, module.weight)

    plugin = types.ModuleType("pk_probe")

    @patchkit.hookimpl
    def register_patchers(register):  # type: ignore[no-untyped-def]
        common: dict[str, Any] = {"options": {}, "same_checkpoint": True}
        register(
            patchkit.Patcher(
                name="q", kind="quantize", family="probe", match=nn.Linear, check=q_check, build=q_build, **common
            )
        )
        register(
            patchkit.Patcher(name="a", kind="attention", family="probe", match=OPTAttention, build=a_build, **common)
        )
        register(patchkit.Patcher(name="o", kind="other", family="probe", match=nn.LayerNorm, build=o_build, **common))

    plugin.register_patchers = register_patchers  # type: ignore[attr-defined]
    return plugin


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    cfg = transformers.OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        word_embed_proj_dim=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt-opt-probe")
    transformers.OPTForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_checkpoint_source_in_check_and_build_of_the_quantize_stage_only(checkpoint: pathlib.Path) -> None:
    seen: Seen = []
    registry = patchkit.Registry()  # only the probe: from_pretrained(registry=) must not use installed plugins
    assert registry.add_plugin(_probe_plugin(seen), name="probe").status == "loaded"
    model = patchkit.from_pretrained(
        transformers.OPTForCausalLM,
        checkpoint,
        quantize="probe",
        attention="probe",
        patch="probe",
        registry=registry,
        only="model.decoder.layers",  # not lm_head: tied to the embeddings
    )
    stages = {stage for stage, *_ in seen}
    assert stages == {"quantize:check", "quantize:build", "attention:build", "other:build"}
    with_source = set()
    for stage, path, source, device in seen:
        if stage == "quantize:check" and device == "meta":
            assert source is None  # the plan's checks, before anything is read
        elif stage.startswith("quantize:"):
            assert isinstance(source, patchkit.TensorSource), (stage, path)
            with_source.add((stage, path))
            assert source.key.endswith(f"{path.removeprefix('model.')}.weight") and source.digest is None
            assert device == "cpu"
            # read(where) gives the tensor back as stored, bit for bit what the module holds
            weight = model.get_submodule(path).weight
            assert torch.equal(source.read(path), weight.detach().to(torch.float32))
        else:
            assert source is None, (stage, path)
            # the attention stage is built on the meta device, before any tensor is read
            assert device == ("meta" if stage == "attention:build" else "cpu"), (stage, device)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.decoder.layers")]
    assert with_source == {(stage, n) for n in linears for stage in ("quantize:check", "quantize:build")}
    # the same patchers through apply on a loaded model: no load, no source
    seen.clear()
    patchkit.reverse(model)
    patchkit.apply(model, quantize="probe", registry=registry, only="model.decoder.layers")
    assert seen and all(source is None for _, _, source, _ in seen)


def test_tensor_source_read_refuses_a_changed_file(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    seen: Seen = []
    registry = patchkit.Registry()
    registry.add_plugin(_probe_plugin(seen), name="probe")
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for f in checkpoint.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    patchkit.from_pretrained(
        transformers.OPTForCausalLM, copy, quantize="probe", registry=registry, only="model.decoder.layers"
    )
    source = next(s for stage, _, s, _ in seen if stage == "quantize:build")
    with open(source.file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(patchkit.PatchError, match=r"^my label: .*changed since loading"):
        source.read("my label")
