"""Regression tests for the first-party bitsandbytes defects of issue 19 (real bitsandbytes layers,
real transformers modeling code, tiny models built from configs)."""

from __future__ import annotations

import io
import os

import pytest
import torch
from exactness import full_state
from test_bnb_fixtures import output, tiny_bert, tiny_llama, tokens
from torch import nn

import patchkit

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from patchkit_bnb.record import record_of  # noqa: E402
from patchkit_bnb.saving import quantized_state_dict  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _biases(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith("bias")}


# --- 1. a forward never rounds the user's (shared) bias Parameters ----------------------------------


@pytest.mark.parametrize(
    ("family", "compute", "keep"),
    [
        ("nf4", torch.bfloat16, None),
        ("nf4", torch.float16, "cpu"),
        ("fp4", torch.bfloat16, "cpu"),
        ("fp4", torch.float16, None),
    ],
)
def test_4bit_compute_dtype_leaves_user_biases_and_reverse_bit_exact(
    family: str, compute: torch.dtype, keep: str | None
) -> None:
    model = tiny_bert()
    biases = _biases(model)
    with torch.no_grad():
        for p in biases.values():
            p.normal_()  # BERT initializes biases to zero, which every dtype holds exactly
    before = full_state(model)
    values = {n: p.detach().clone() for n, p in biases.items()}
    patchkit.apply(model, quantize=family, compute_dtype=compute, keep_original=keep)
    ids = tokens()
    first = output(model, ids)
    second = output(model, ids)
    assert torch.equal(first, second)  # the first forward changes nothing the second one reads
    changed = [n for n, p in biases.items() if p.dtype != torch.float32 or not torch.equal(p, values[n])]
    assert not changed, f"{len(changed)} of {len(biases)} biases rounded by a forward: {changed[:3]}"
    assert all(dict(model.named_parameters())[n] is p for n, p in biases.items())  # still shared
    patchkit.reverse(model)
    if keep is not None:
        assert full_state(model) == before  # bit-exact, biases included
    else:
        assert all(p.dtype == torch.float32 and torch.equal(p, values[n]) for n, p in biases.items())


@pytest.mark.parametrize("family", ["nf4", "fp4"])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("inp", [torch.float32, torch.bfloat16])
def test_4bit_layer_computes_exactly_what_bitsandbytes_computes(
    family: str, compute: torch.dtype, inp: torch.dtype
) -> None:
    """The patched layer's output is bitsandbytes' own Linear4bit output (on a bias copy), bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    bias = model[0].bias.detach().clone()
    patchkit.apply(model, quantize=family, compute_dtype=compute)
    layer = model[0]
    assert record_of(layer) is not None
    raw = bnb.nn.Linear4bit(64, 32, compute_dtype=compute, quant_type=family, device="meta")
    raw.weight = layer.weight  # same packed weight and quantization state
    raw.bias = nn.Parameter(layer.bias.detach().clone())
    raw.support_avx512bf16_for_cpu = False  # the kernel patchkit's layer uses by default
    x = torch.randn(3, 64).to(inp)
    with torch.no_grad():
        got = model(x)
        want = raw(x)
    assert got.dtype == want.dtype == inp
    assert torch.equal(got, want)
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, bias)


@pytest.mark.parametrize("inp", [torch.bfloat16, torch.float16])
def test_int8_bitsandbytes_kernel_leaves_user_biases(inp: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    patchkit.apply(model, quantize="int8", int8_cpu_kernel="llm_int8")
    raw = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, device="meta")
    weight = model[0].weight  # a copy: the first forward moves the row scales into the layer's state
    raw.weight = bnb.nn.Int8Params(
        weight.data.clone(), requires_grad=False, has_fp16_weights=False, CB=weight.data.clone(), SCB=weight.SCB.clone()
    )
    raw.bias = nn.Parameter(model[0].bias.detach().clone())
    x = torch.randn(3, 64).to(inp)
    with torch.no_grad():
        got = model[0](x)
        want = raw(x)
        model(x)
    assert torch.equal(got, want)  # bitsandbytes' arithmetic, with the bias cast out of place
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.dtype == torch.float32 and torch.equal(p, biases[name]), name


def test_4bit_bias_gradient_reaches_the_user_bias_in_its_dtype() -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    patchkit.apply(model, quantize="nf4", compute_dtype=torch.bfloat16)
    bias = model[0].bias
    bias.requires_grad_(True)
    model(torch.randn(3, 64)).sum().backward()
    assert bias.dtype == torch.float32 and bias.grad is not None and bias.grad.dtype == torch.float32
    assert torch.equal(bias.grad, torch.full_like(bias, 3.0))
    patchkit.reverse(model)


# --- 2. model.to("meta") while quantized is refused before anything moves ----------------------------


def _placement(model: nn.Module) -> list[tuple[str, str, torch.dtype]]:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [(n, t.device.type, t.dtype) for n, t in tensors]


def _state_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("family", ["nf4", "int8"])
def test_move_to_meta_while_quantized_is_refused_before_anything_moves(family: str) -> None:
    model = tiny_llama()
    before = full_state(model)
    ids = tokens()
    patchkit.apply(model, quantize=family, keep_original="cpu")
    expected = output(model, ids)
    placement, state = _placement(model), _state_bytes(model)
    layer = model.model.layers[0].self_attn.q_proj
    moves = [
        lambda: model.to("meta"),
        lambda: model.to(device="meta"),
        lambda: model.to_empty(device="meta"),
        lambda: layer.to("meta"),  # the quantized layer itself
    ]
    for move in moves:
        with pytest.raises(patchkit.PatchedModelError, match=r"patchkit\.reverse\(model\)"):
            move()
        assert _placement(model) == placement
        assert _state_bytes(model) == state
    assert torch.equal(output(model, ids), expected)
    model.to("cpu")  # moves to a real device still work
    model.float()
    assert torch.equal(output(model, ids), expected)
    patchkit.reverse(model)
    assert full_state(model) == before
    model.to("meta")  # unpatched: an ordinary module again
    assert {t.device.type for t in model.parameters()} == {"meta"}


# --- 3. Conv1D (GPT-2) quantized checkpoints ---------------------------------------------------------


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("family", ["nf4", "fp4", "int8"])
def test_gpt2_conv1d_quantized_checkpoint_reloads_with_equal_logits(family: str, tmp_path: os.PathLike[str]) -> None:
    model = tiny_gpt2()
    kernel = {"int8_cpu_kernel": "llm_int8"} if family == "int8" else {}  # the kernel the reloaded layers run
    patchkit.apply(model, quantize=family, skip=["transformer.h.1.mlp.c_proj"], **kernel)
    ids = tokens()
    expected = output(model, ids)
    patchkit.save_pretrained(model, tmp_path, quantized=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for module in reloaded.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the CPU kernel patchkit's layers use
    cls = bnb.nn.Linear8bitLt if family == "int8" else bnb.nn.Linear4bit
    quantized = {n for n, m in model.named_modules() if record_of(m) is not None}
    assert quantized == {n for n, m in reloaded.named_modules() if isinstance(m, cls)}
    assert isinstance(reloaded.get_submodule("transformer.h.1.mlp.c_proj"), Conv1D)  # skipped stays Conv1D
    assert torch.equal(output(reloaded, ids), expected)
    written = quantized_state_dict(model)
    loaded = {k: v for k, v in reloaded.state_dict().items() if k in written}
    assert set(loaded) == set(written)  # every tensor written (quantization state included) was loaded
    assert all(torch.equal(loaded[k].cpu(), written[k]) for k in loaded), "reloaded tensors differ"
    patchkit.reverse(model)


# --- 5. a rolled-back apply leaves no kept file behind ---------------------------------------------------


@pytest.mark.parametrize("family", ["int8", "nf4"])
def test_rolled_back_apply_deletes_the_kept_files_and_reverse_still_reads_them(
    family: str, tmp_path: os.PathLike[str]
) -> None:
    """The kept folder files are removed by a journaled undo step (not only by ``restore``), so a
    rollback cleans up whether or not the engine calls the patcher's ``restore`` on it."""
    from exactness import failing_patcher, registry_plus

    folder = os.path.join(tmp_path, "kept")
    model = tiny_llama()
    before = full_state(model)
    with pytest.raises(RuntimeError, match="injected build failure"):
        patchkit.apply(
            model, quantize=family, keep_original=folder, patch="boom", registry=registry_plus(failing_patcher())
        )
    assert full_state(model) == before
    assert not os.listdir(folder)  # the files written by the quantizer's builds are gone
    patchkit.apply(model, quantize=family, keep_original=folder)
    assert len(os.listdir(folder)) == 14  # 2 layers x 7 projections
    patchkit.reverse(model)  # reads them back bit-identical, then deletes them
    assert full_state(model) == before
    assert not os.listdir(folder)


def test_4bit_bias_copy_compiles_without_graph_breaks() -> None:
    """torch.compile traces the bias-copying forward in one graph (the view is dynamo-friendly)."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].bias.normal_()
    bias = model[0].bias.detach().clone()
    patchkit.apply(model, quantize="nf4", compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), expected)
    assert model[0].bias.dtype == torch.float32 and torch.equal(model[0].bias, bias)
    patchkit.reverse(model)
