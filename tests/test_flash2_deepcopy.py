"""Deep copies of flash2-patched models (issue 10): the copy is an independent patched model.

Everything flash2 journals holds its references as attributes of objects (the forward wrapper is a
``PatchedForward`` instance, the config switch lives in the config's own attention field, reverse
steps are ``functools.partial`` over objects), so ``copy.deepcopy`` maps them onto the copy. The
full round trip also needs a deep-copyable core journal (patchkit >= the issue-10 core change).
"""

from __future__ import annotations

import copy

import pytest
import torch
from patchkit_flash2 import dispatch, padfree
from test_flash2_llama import batch, close_on, llama, logits, patch
from transformers import LlamaForCausalLM

import patchkit


def _deepcopy_or_skip(model):
    from patchkit.journal import Journal

    if "__deepcopy__" not in vars(Journal):
        pytest.skip("this patchkit core's journal is not deep-copyable yet (issue 10 core change)")
    return copy.deepcopy(model)


def test_plugin_state_follows_a_deepcopy():
    # the plugin side alone, without the core journal: wrapper and config switch map onto the copy
    model = llama()
    patch(model)
    wrapper = model.model.__dict__["forward"]
    assert isinstance(wrapper, padfree.PatchedForward)
    memo: dict[int, object] = {}
    base_copy = copy.deepcopy(model.model, memo)
    copied = base_copy.__dict__["forward"]
    assert copied is not wrapper and copied.base is base_copy
    assert copied.original.__self__ is base_copy  # the copy's own original forward
    switch = base_copy.config._attn_implementation
    assert isinstance(switch, dispatch.ConfigSwitch) and switch == "patchkit"
    assert base_copy.config is not model.config and switch is not model.config._attn_implementation
    assert [ref() for ref in switch.holders] == [base_copy]
    assert switch.previous == "eager"
    assert "_attn_implementation_internal" not in model.config.to_dict()  # never serialized
    model.config.to_json_string()


def test_deepcopy_of_patched_model_reverses_independently():
    model = llama()
    ids, mask = batch("left")
    want = logits(model, ids, mask)
    patch(model)
    twin = _deepcopy_or_skip(model)
    assert patchkit.is_patched(twin)
    assert close_on(mask, logits(twin, ids, mask), want) <= 1e-5
    patchkit.reverse(twin)
    assert twin.config._attn_implementation == "eager" and type(twin.config._attn_implementation) is str
    assert "forward" not in twin.model.__dict__
    assert not any(dispatch.STATE_ATTR in m.__dict__ for m in twin.modules())
    assert torch.equal(logits(twin, ids, mask), want)  # exactly the unpatched original
    # the original is still patched and still works
    assert patchkit.is_patched(model) and model.config._attn_implementation == "patchkit"
    assert isinstance(model.model.__dict__["forward"], padfree.PatchedForward)
    assert close_on(mask, logits(model, ids, mask), want) <= 1e-5
    patchkit.reverse(model)
    assert torch.equal(logits(model, ids, mask), want)


def test_models_sharing_a_config_then_deepcopy():
    a = llama()
    b = LlamaForCausalLM(a.config).eval()
    patch(a)
    patch(b)
    twin = _deepcopy_or_skip(a)  # b is not copied: the copy's config has the copy as only holder
    patchkit.reverse(twin)
    assert twin.config._attn_implementation == "eager"
    assert a.config._attn_implementation == "patchkit"
    patchkit.reverse(a)
    assert a.config._attn_implementation == "patchkit"  # b still holds it
    patchkit.reverse(b)
    assert a.config._attn_implementation == "eager"


def test_deepcopy_of_patched_falcon_reverses_independently():
    from test_flash2_falcon import batch as falcon_batch
    from test_flash2_falcon import falcon

    model = falcon("new-arch-gqa")
    ids, mask = falcon_batch("left")
    want = logits(model, ids, mask)
    patchkit.apply(model, attention="flash2", backend="reference")
    twin = _deepcopy_or_skip(model)
    assert close_on(mask, logits(twin, ids, mask), want) <= 1e-5
    patchkit.reverse(twin)
    assert "forward" not in twin.transformer.__dict__
    assert torch.equal(logits(twin, ids, mask), want)
    assert patchkit.is_patched(model) and close_on(mask, logits(model, ids, mask), want) <= 1e-5
