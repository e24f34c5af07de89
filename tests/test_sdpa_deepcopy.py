"""``copy.deepcopy`` of a model patched by the sdpa plugin is an independent patched copy.

Everything the plugin stores on the model (OPT: the decoder's and the LM head's instance
``forward``, bound methods; BERT: the ``Sdpa<Encoder>`` replacement, an ordinary instance) is
reached by deepcopy through attributes, so the copy's patch points at the copy's modules.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from patchkit_sdpa.bert import PackedEncoderMixin
from test_sdpa_bert import batch, tiny_bert
from test_sdpa_opt import padded, tiny_opt, valid_diff
from transformers.models.bert import modeling_bert

import patchkit
from patchkit import journal as core_journal

CORE_DEEPCOPY = hasattr(core_journal.Journal, "__deepcopy__")


def test_opt_copy_binds_its_patch_to_its_own_modules() -> None:
    ref = tiny_opt("eager")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    twin = copy.deepcopy(model)
    for m, dec in ((model, model.model.decoder), (twin, twin.model.decoder)):
        fwd = dec.__dict__["forward"]
        assert isinstance(fwd, types.MethodType) and fwd.__self__ is dec
        assert m.lm_head.__dict__["forward"].__self__ is m.lm_head
    assert twin.model.decoder.layers[0].fc1.weight is not model.model.decoder.layers[0].fc1.weight
    ids, mask = padded("left")
    with torch.no_grad():
        twin.model.decoder.layers[0].fc1.weight.mul_(0.5)  # the copy is independent of the original
        exp = ref(input_ids=ids, attention_mask=mask).logits
        assert valid_diff(model(input_ids=ids, attention_mask=mask).logits, exp, mask) < 1e-5
        assert valid_diff(twin(input_ids=ids, attention_mask=mask).logits, exp, mask) > 1e-4


def test_bert_copy_holds_its_own_packed_encoder() -> None:
    ref = tiny_bert("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    twin = copy.deepcopy(model)
    assert isinstance(twin.encoder, PackedEncoderMixin) and twin.encoder is not model.encoder
    assert type(twin.encoder) is type(model.encoder)  # the cached subclass, not a copy of the class
    assert twin.encoder.layer[0] is not model.encoder.layer[0]
    ids, mask = batch("right")
    with torch.no_grad():
        exp = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert valid_diff(twin(input_ids=ids, attention_mask=mask).last_hidden_state, exp, mask) < 1e-5


@pytest.mark.skipif(not CORE_DEEPCOPY, reason="needs the core journal's deepcopy support (issue 10, core)")
@pytest.mark.parametrize("kind", ["bert", "opt"])
def test_reverse_of_a_copy_restores_the_copy_and_leaves_the_original_patched(kind: str) -> None:
    model = tiny_bert("eager") if kind == "bert" else tiny_opt("eager")
    patchkit.apply(model, attention="sdpa")
    twin = copy.deepcopy(model)
    patchkit.reverse(twin)
    assert not patchkit.is_patched(twin) and patchkit.is_patched(model)
    if kind == "bert":
        assert type(twin.encoder) is modeling_bert.BertEncoder and isinstance(model.encoder, PackedEncoderMixin)
        assert twin.encoder.layer[0] is not model.encoder.layer[0]
    else:
        assert "forward" not in twin.model.decoder.__dict__ and "forward" not in twin.lm_head.__dict__
        assert twin.config._attn_implementation == "eager" and model.config._attn_implementation == "sdpa"
        assert "forward" in model.model.decoder.__dict__
