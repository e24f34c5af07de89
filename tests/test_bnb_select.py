"""Which layers the quantizers take, what they leave alone and why, and how they refuse."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_bnb_fixtures import assert_same_objects, snapshot, tiny_bert, tiny_llama
from torch import nn

import patchkit

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def _reasons(report_or_plan: object) -> dict[str, str]:
    return {s.path: s.reason for s in report_or_plan.skipped}  # type: ignore[attr-defined]


def _patched(report: object) -> set[str]:
    return {p for s in report.swaps for p in s.paths}  # type: ignore[attr-defined]


def test_lm_head_and_tied_weights_are_left_alone_with_reasons() -> None:
    untied = patchkit.plan(tiny_llama(), quantize="nf4")
    assert "output embedding" in _reasons(untied)["lm_head"]
    model = tiny_llama(tie_word_embeddings=True)
    report = patchkit.apply(model, quantize="nf4")
    assert "lm_head" in _reasons(report) and "lm_head" not in _patched(report)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    patchkit.reverse(model)


def test_tied_linear_weight_is_detected_without_a_head() -> None:
    shared = nn.Linear(8, 8)
    twin = nn.Linear(8, 8)
    twin.weight = shared.weight
    model = nn.Sequential(shared, nn.ReLU(), twin, nn.Linear(8, 8))
    plan = patchkit.plan(model, quantize="int8")
    assert set(_reasons(plan)) == {"0", "2"} and all("tied" in r for r in _reasons(plan).values())
    assert [p.paths for p in plan.patches] == [["3"]]


def test_user_skip_adds_to_the_defaults_and_only_narrows() -> None:
    model = tiny_llama()
    report = patchkit.apply(model, quantize="int8", skip=["model.layers.0.mlp", "re:.*k_proj"])
    reasons = _reasons(report)
    assert "output embedding" in reasons["lm_head"]  # the default still applies
    assert {"model.layers.0.mlp.up_proj", "model.layers.1.self_attn.k_proj"} <= set(reasons)
    assert "model.layers.1.mlp.up_proj" in _patched(report)
    patchkit.reverse(model)
    report = patchkit.apply(model, quantize="int8", only=["model.layers.1.self_attn"])
    assert _patched(report) == {f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"}
    patchkit.reverse(model)


def test_skip_defaults_false_quantizes_the_head_and_keeps_tied_weights_shared() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    snap = snapshot(model)
    report = patchkit.apply(model, quantize="nf4", skip_defaults=False)
    assert "lm_head" in _patched(report)
    assert model.model.embed_tokens.weight.shape == (128, 64)  # the embedding keeps its (shared) weight
    patchkit.reverse(model)
    assert_same_objects(model, snap)
    assert all(torch.equal(p, snap["values"][n]) for n, p in model.named_parameters() if "embed" in n)  # type: ignore[index]


def test_multihead_attention_projection_and_bnb_layers_are_left_alone() -> None:
    model = nn.Sequential(nn.MultiheadAttention(16, 2), bnb.nn.Linear8bitLt(16, 16), nn.Linear(16, 16))
    plan = patchkit.plan(model, quantize="int8")
    reasons = _reasons(plan)
    assert "reads this projection's weight" in reasons["0.out_proj"]
    assert "already a bitsandbytes layer" in reasons["1"]
    assert [p.paths for p in plan.patches] == [["2"]]


def test_plan_shows_every_linear_and_changes_nothing() -> None:
    model = tiny_bert()
    snap = snapshot(model)
    plan = patchkit.plan(model, quantize="fp4", skip=["pooler"])
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {p for x in plan.patches for p in x.paths} | set(_reasons(plan)) == linears
    assert "skip pattern" in _reasons(plan)["pooler.dense"]
    assert_same_objects(model, snap)
    assert not patchkit.is_patched(model)


def test_float64_raises_before_any_change() -> None:
    model = tiny_llama().to(torch.float64)
    snap = snapshot(model)
    with pytest.raises(patchkit.UnsupportedError, match="float64"):
        patchkit.apply(model, quantize="nf4")
    assert not patchkit.is_patched(model)
    assert_same_objects(model, snap)
    report = patchkit.apply(model, quantize="nf4", strict=False)  # strict=False: left alone, with the reason
    assert not report.swaps and all("float64" in s.reason for s in report.skipped if s.path != "lm_head")
    assert not patchkit.is_patched(model)  # a no-op apply leaves no trace


def test_meta_model_plans_but_does_not_apply() -> None:
    model = tiny_llama().to("meta")  # built before loading: the plan says what apply will do
    plan = patchkit.plan(model, quantize="int8")
    assert len(plan.patches) == 14 and "lm_head" in _reasons(plan)
    layer = model.model.layers[0].mlp.up_proj
    with pytest.raises(patchkit.UnsupportedError, match="meta device"):
        patchkit.apply(model, quantize="int8")
    assert model.model.layers[0].mlp.up_proj is layer and not patchkit.is_patched(model)


def test_partly_loaded_model_is_refused_in_the_plan() -> None:
    model = tiny_llama()
    model.model.layers[1].mlp.to("meta")  # e.g. weights that never arrived
    with pytest.raises(patchkit.UnsupportedError, match="meta device"):
        patchkit.plan(model, quantize="nf4")
    with pytest.raises(patchkit.UnsupportedError, match="meta device"):
        patchkit.apply(model, quantize="nf4")
    assert not patchkit.is_patched(model)
    assert all(not isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_planning_a_large_meta_model_is_fast() -> None:
    cfg = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=80,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    start = time.perf_counter()
    plan = patchkit.plan(model, quantize="nf4")
    assert len(plan.patches) == 80 * 7
    assert time.perf_counter() - start < 1.0  # one pass over the model per plan, not one per layer


def test_int8_refuses_weights_beyond_float16_range() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[0, 0] = 1e6
    with pytest.raises(patchkit.UnsupportedError, match="float16 range"):
        patchkit.apply(model, quantize="int8")
    assert type(model[0]) is nn.Linear and not patchkit.is_patched(model)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"threshold": -1}, "threshold"),
        ({"compute_dtype": "int3"}, "compute_dtype"),
        ({"blocksize": 100}, "blocksize"),
        ({"has_fp16_weights": True}, "has_fp16_weights"),
        ({"double_quant": "yes"}, "double_quant"),
    ],
)
def test_bad_options_raise_before_any_change(option: dict[str, object], message: str) -> None:
    model = tiny_llama()
    with pytest.raises(patchkit.UnsupportedError, match=re.escape(message)):
        patchkit.apply(model, quantize="nf4", **option)
    assert not patchkit.is_patched(model)


def test_missing_bitsandbytes_raises_a_clear_error_before_any_change() -> None:
    # A real interpreter where importing bitsandbytes fails, as on a machine without it.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None
        import torch, patchkit
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        layer = model[0]
        try:
            patchkit.apply(model, quantize="int8")
        except patchkit.UnsupportedError as exc:
            assert "pip install" in str(exc) and "bitsandbytes" in str(exc), exc
            assert model[0] is layer and not patchkit.is_patched(model)
            print("REFUSED")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in done.stdout, done.stderr[-2000:]
