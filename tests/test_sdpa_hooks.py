"""Hooks inside a region the sdpa plugin patched (BERT encoder, OPT decoder).

The rule: a hook on any module of a patched region sees what it would see unpatched, or that
call takes the original path with exactly one ``patchkit.PatchkitWarning``. Never a silent
difference. Every test compares against the unpatched twin carrying the same hook.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_sdpa_bert import batch, tiny_bert, valid_diff
from test_sdpa_opt import padded, tiny_opt
from torch import nn

import patchkit

Target = Callable[[nn.Module], nn.Module]

BERT_TARGETS: dict[str, Target] = {
    "layer": lambda m: m.encoder.layer[1],
    "attention": lambda m: m.encoder.layer[1].attention,
    "self-attention": lambda m: m.encoder.layer[0].attention.self,
    "output": lambda m: m.encoder.layer[1].output,
    "linear": lambda m: m.encoder.layer[1].intermediate.dense,
    "layernorm": lambda m: m.encoder.layer[0].output.LayerNorm,
}
OPT_TARGETS: dict[str, Target] = {
    "layer": lambda m: m.model.decoder.layers[1],
    "attention": lambda m: m.model.decoder.layers[1].self_attn,
    "output": lambda m: m.model.decoder.layers[0].fc2,
    "linear": lambda m: m.model.decoder.layers[1].self_attn.q_proj,
    "positions": lambda m: m.model.decoder.embed_positions,
    "final-norm": lambda m: m.model.decoder.final_layer_norm,
}


def _zero(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return torch.zeros_like(out)
    if isinstance(out, tuple):
        return tuple(_zero(o) for o in out)
    return out


def _shape(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)):
        return tuple(_shape(o) for o in x)
    return type(x).__name__


def install(module: nn.Module, kind: str, log: list[Any]) -> Any:
    """A hook of ``kind`` on ``module`` that records what it sees and changes the result."""
    if kind == "forward":
        return module.register_forward_hook(lambda m, a, out: (log.append(_shape(out)), _zero(out))[1])
    if kind == "pre":

        def pre(m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            log.append(_shape(args))
            return (args[0] * 0.5, *args[1:]) if args and isinstance(args[0], torch.Tensor) else args

        return module.register_forward_pre_hook(pre)
    if kind == "kwargs":

        def with_kwargs(m: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            log.append((_shape(args), sorted(kwargs)))
            return _zero(out)

        return module.register_forward_hook(with_kwargs, with_kwargs=True)
    raise ValueError(kind)


def _patchkit_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, patchkit.PatchkitWarning)]


def _run(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = fn()
    return out, _patchkit_warnings(caught)


@pytest.mark.parametrize("kind", ["forward", "pre", "kwargs"])
@pytest.mark.parametrize("where", list(BERT_TARGETS))
def test_bert_hook_added_after_apply_sees_the_unpatched_call(where: str, kind: str) -> None:
    ref = tiny_bert("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    seen_ref: list[Any] = []
    seen: list[Any] = []
    install(BERT_TARGETS[where](ref), kind, seen_ref)
    install(BERT_TARGETS[where](model), kind, seen)
    ids, mask = batch("right")
    exp, _ = _run(lambda: ref(input_ids=ids, attention_mask=mask).last_hidden_state)
    out, warned = _run(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert seen == seen_ref and len(seen) == 1  # fired once, on the padded [B, T, ...] call
    assert valid_diff(out, exp, mask) < 1e-5
    assert len(warned) == 1 and "hook" in warned[0], warned


@pytest.mark.parametrize("call", ["no-cache", "plain"])
@pytest.mark.parametrize("kind", ["forward", "pre", "kwargs"])
@pytest.mark.parametrize("where", list(OPT_TARGETS))
def test_opt_hook_added_after_apply_sees_the_unpatched_call(where: str, kind: str, call: str) -> None:
    ref = tiny_opt("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    seen_ref: list[Any] = []
    seen: list[Any] = []
    install(OPT_TARGETS[where](ref), kind, seen_ref)
    install(OPT_TARGETS[where](model), kind, seen)
    ids, mask = padded("left")
    extra = {"use_cache": False} if call == "no-cache" else {}
    exp, _ = _run(lambda: ref(input_ids=ids, attention_mask=mask, **extra).logits)
    out, warned = _run(lambda: model(input_ids=ids, attention_mask=mask, **extra).logits)
    assert seen == seen_ref and len(seen) == 1
    assert valid_diff(out, exp, mask) < 1e-5
    assert len(warned) == 1 and "hook" in warned[0], warned


def test_bert_zeroing_hook_on_a_layer_takes_effect() -> None:
    """The issue's case: a hook zeroing layer 2's output zeroes the encoder output, as unpatched."""
    model = tiny_bert("sdpa", num_hidden_layers=2)
    patchkit.apply(model, attention="sdpa")
    model.encoder.layer[1].register_forward_hook(lambda m, a, out: _zero(out))
    ids, mask = batch("right")
    out, warned = _run(lambda: model.encoder(model.embeddings(input_ids=ids)).last_hidden_state)
    assert float(out.abs().sum()) == 0.0 and len(warned) == 1


@pytest.mark.parametrize("model_kind", ["bert", "opt"])
def test_global_module_hooks_take_the_original_path_with_one_warning(model_kind: str) -> None:
    ref = tiny_bert("sdpa") if model_kind == "bert" else tiny_opt("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right") if model_kind == "bert" else padded("right")
    kw = {} if model_kind == "bert" else {"use_cache": False}
    seen: list[Any] = []
    hook = nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(_shape(out)))
    try:
        exp, _ = _run(lambda: ref(input_ids=ids, attention_mask=mask, **kw)[0])
        n_ref, seen_ref = len(seen), list(seen)
        seen.clear()
        out, warned = _run(lambda: model(input_ids=ids, attention_mask=mask, **kw)[0])
    finally:
        hook.remove()
    assert seen == seen_ref and n_ref > 10
    assert valid_diff(out, exp, mask) < 1e-5
    assert len(warned) == 1 and "global" in warned[0], warned
    out, warned = _run(lambda: model(input_ids=ids, attention_mask=mask, **kw)[0])  # hook removed: fast again
    assert warned == []


def test_global_pre_hook_also_counts() -> None:
    model = tiny_bert("sdpa")
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")
    hook = nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
    try:
        _, warned = _run(lambda: model(input_ids=ids, attention_mask=mask))
    finally:
        hook.remove()
    assert len(warned) == 1


@pytest.mark.parametrize("model_kind", ["bert", "opt"])
def test_backward_hook_sees_padded_gradients(model_kind: str) -> None:
    ref = tiny_bert("sdpa") if model_kind == "bert" else tiny_opt("sdpa")
    ref.train()
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    target = (lambda m: m.encoder.layer[0].attention.self.query) if model_kind == "bert" else OPT_TARGETS["linear"]
    seen_ref: list[Any] = []
    seen: list[Any] = []
    target(ref).register_full_backward_hook(lambda m, gi, go: seen_ref.append(_shape(go)))
    target(model).register_full_backward_hook(lambda m, gi, go: seen.append(_shape(go)))
    ids, mask = batch("right") if model_kind == "bert" else padded("right")
    kw = {} if model_kind == "bert" else {"use_cache": False}
    (ref(input_ids=ids, attention_mask=mask, **kw)[0] * mask[..., None]).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (model(input_ids=ids, attention_mask=mask, **kw)[0] * mask[..., None]).sum().backward()
    assert seen == seen_ref and len(seen) == 1
    assert len(_patchkit_warnings(caught)) == 1


@pytest.mark.parametrize("model_kind", ["bert", "opt"])
@pytest.mark.parametrize("kind", ["forward", "pre", "kwargs"])
def test_hook_added_before_apply_is_refused_or_left_alone(model_kind: str, kind: str) -> None:
    model = tiny_bert("sdpa") if model_kind == "bert" else tiny_opt("sdpa")
    target = BERT_TARGETS["linear"] if model_kind == "bert" else OPT_TARGETS["linear"]
    install(target(model), kind, [])
    with pytest.raises(patchkit.UnsupportedError, match="hook"):
        patchkit.apply(model, attention="sdpa")
    with pytest.warns(patchkit.PatchkitWarning, match="hook"):
        report = patchkit.apply(model, attention="sdpa", strict=False)
    assert report.swaps == []


@pytest.mark.parametrize("when", ["before", "after"])
def test_hook_on_the_replaced_encoder_itself_runs_on_the_fast_path(when: str) -> None:
    """The encoder's own hooks see the same call (its padded outputs are zeros, as documented)."""
    ref = tiny_bert("sdpa")
    model = copy.deepcopy(ref)
    seen: list[Any] = []
    if when == "before":
        model.encoder.register_forward_pre_hook(lambda m, a: seen.append(_shape(a)))
    patchkit.apply(model, attention="sdpa")
    if when == "after":
        model.encoder.register_forward_pre_hook(lambda m, a: seen.append(_shape(a)))
    ids, mask = batch("right")
    out, warned = _run(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state)
    exp, _ = _run(lambda: ref(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert warned == [] and len(seen) == 1 and valid_diff(out, exp, mask) < 1e-5


def test_opt_input_embedding_hook_keeps_the_fast_path() -> None:
    """``embed_tokens`` is called exactly as unpatched (``enable_input_require_grads`` hooks it)."""
    ref = tiny_opt("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    seen: list[Any] = []
    seen_ref: list[Any] = []
    model.model.decoder.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(_shape(a)))
    ref.model.decoder.embed_tokens.register_forward_hook(lambda m, a, out: seen_ref.append(_shape(a)))
    ids, mask = padded("right")
    out, warned = _run(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    exp, _ = _run(lambda: ref(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    assert warned == [] and seen == seen_ref and valid_diff(out, exp, mask) < 1e-5


@pytest.mark.parametrize("model_kind", ["bert", "opt"])
def test_transformers_capture_hooks_do_not_switch_the_fast_path_off(model_kind: str) -> None:
    ref = tiny_bert("sdpa") if model_kind == "bert" else tiny_opt("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right") if model_kind == "bert" else padded("right")
    kw = {} if model_kind == "bert" else {"use_cache": False}
    _, warned = _run(lambda: model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw))
    assert len(warned) == 1  # this call needs the original path
    layer = model.encoder.layer[0] if model_kind == "bert" else model.model.decoder.layers[0]
    assert layer._forward_hooks  # transformers leaves its capture hooks installed
    out, warned = _run(lambda: model(input_ids=ids, attention_mask=mask, **kw)[0])
    exp, _ = _run(lambda: ref(input_ids=ids, attention_mask=mask, **kw)[0])
    assert warned == [] and valid_diff(out, exp, mask) < 1e-5
