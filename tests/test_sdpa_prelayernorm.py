"""The sdpa BERT encoder path on pre-norm BERT variants: RoBERTa-PreLayerNorm and XLM-RoBERTa-XL.

Same contract as BERT (tests/test_sdpa_bert.py): valid tokens equal eager, padded outputs zeros,
training gradients equal, reverse restores the same objects, unknown sources refused, hooks inside
take the original path with one warning. Runs on 5.24 and 5.17 (``PYTHONPATH=.tf517:src:plugins``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from helpers import without_patchers
from patchkit_sdpa import bert
from patchkit_sdpa.bert import PackedEncoderMixin
from test_sdpa_bert import TINY, batch, valid_diff
from torch import nn
from transformers import (
    RobertaPreLayerNormConfig,
    RobertaPreLayerNormForSequenceClassification,
    RobertaPreLayerNormModel,
    XLMRobertaXLConfig,
    XLMRobertaXLForSequenceClassification,
    XLMRobertaXLModel,
)

import patchkit
from patchkit import toolkit

# The verified paths alone: without it the generic encoder takes what they refuse (running the model's own code).
VERIFIED = without_patchers("sdpa-generic-encoder")

ARCHS = {
    "roberta-prelayernorm": (
        RobertaPreLayerNormConfig,
        RobertaPreLayerNormModel,
        RobertaPreLayerNormForSequenceClassification,
        "RoBERTa-PreLayerNorm",
    ),
    "xlm-roberta-xl": (XLMRobertaXLConfig, XLMRobertaXLModel, XLMRobertaXLForSequenceClassification, "XLM-RoBERTa-XL"),
}


def tiny(arch: str, impl: str = "eager", head: bool = False, **over: object) -> nn.Module:
    config_cls, model_cls, head_cls, _ = ARCHS[arch]
    torch.manual_seed(0)
    cfg = config_cls(**{**TINY, "pad_token_id": 1, **over})
    cfg._attn_implementation = impl
    return (head_cls if head else model_cls)(cfg).eval()


def variant(arch: str) -> bert.Variant:
    return next(v for v in bert.VARIANTS if v.name == ARCHS[arch][3])


def _hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def _packed_region(model: nn.Module) -> torch.Tensor:
    """The encoder's output before the model's own final LayerNorm (RoBERTa-PreLayerNorm applies one
    outside the encoder), read through a forward hook on the encoder (allowed: outside the region)."""
    seen: list[torch.Tensor] = []
    model.encoder.register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state))
    return seen  # type: ignore[return-value]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["right", "left", "holes", "none"])
def test_valid_tokens_match_eager_and_encoder_padding_is_zero(arch: str, impl: str, kind: str) -> None:
    ref, model = tiny(arch, "eager"), tiny(arch, impl)
    report = patchkit.apply(model, attention="sdpa")
    assert isinstance(model.encoder, PackedEncoderMixin) and len(report.swaps) == 1
    assert model.encoder._patchkit_variant is variant(arch)
    seen = _packed_region(model)
    ids, mask = batch(kind)
    out, exp = _hidden(model, ids, mask), _hidden(ref, ids, mask)
    assert valid_diff(out, exp, mask) < 1e-5
    assert torch.count_nonzero(seen[0][~mask.bool()]) == 0  # documented: the encoder's padded outputs are zeros
    if kind == "none":
        torch.testing.assert_close(_hidden(model, ids, None), exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_module_path_matches_eager_too(arch: str) -> None:
    """With autograd on, layers run through their modules instead of the fused kernels: exact too."""
    ref, model = tiny(arch, "eager"), tiny(arch, "sdpa")
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("left")
    with torch.enable_grad():
        x = model.embeddings(input_ids=ids).detach().requires_grad_()
        out = bert.encode_packed(model.encoder, x, mask.bool(), variant(arch)).detach()
    seen = _packed_region(ref)
    _hidden(ref, ids, mask)
    assert valid_diff(out, seen[0], mask) < 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_loss_and_grads_match_eager_with_padding(arch: str) -> None:
    ref = tiny(arch, "eager", head=True, num_labels=3, classifier_dropout=0.0).train()
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")  # the head reads position 0: valid under right padding
    labels = torch.tensor([0, 1, 2, 1])
    loss_ref = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_ref.backward()
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    floor = 1e-5 * max(float(q.grad.abs().max()) for q in ref.parameters() if q.grad is not None)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=max(floor, 1e-7), msg=name)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_parameters_are_shared_and_reverse_restores_objects(arch: str) -> None:
    model = tiny(arch, "sdpa")
    encoder_cls = type(model.encoder)
    before = dict(model.named_parameters())
    encoder, layers = model.encoder, list(model.encoder.layer)
    patchkit.apply(model, attention="sdpa")
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items()) and len(after) == len(before)
    patchkit.reverse(model)
    assert model.encoder is encoder and list(model.encoder.layer) == layers and type(model.encoder) is encoder_cls


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_hook_inside_takes_the_original_path_with_one_warning(arch: str) -> None:
    ref, model = tiny(arch, "sdpa"), tiny(arch, "sdpa")
    patchkit.apply(model, attention="sdpa")
    for m in (ref, model):  # the pre-norm LayerNorm of layer 1's attention: a module only pre-norm layers have
        bert._attn_norm(m.encoder.layer[1]).register_forward_hook(lambda mod, a, out: out * 0.5)
    ids, mask = batch("right")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _hidden(model, ids, mask)
    ours = [w for w in caught if issubclass(w.category, patchkit.PatchkitWarning)]
    assert len(ours) == 1 and "hooks inside the patched region" in str(ours[0].message)
    torch.testing.assert_close(out, _hidden(ref, ids, mask))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_layer_whose_code_differs_is_left_alone(arch: str) -> None:
    model = tiny(arch, "sdpa")
    inter = model.encoder.layer[1].intermediate

    class MyIntermediate(type(inter)):  # type: ignore[misc]
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states) * 2

    inter.__class__ = MyIntermediate
    encoder = model.encoder
    with pytest.raises(patchkit.PatchError, match=f"layer 1 is not verifiably {variant(arch).name}"):
        patchkit.apply(model, attention="sdpa", registry=VERIFIED)
    assert model.encoder is encoder and not patchkit.is_patched(model)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_installed_release_fingerprint_is_recorded(arch: str) -> None:
    v = variant(arch)
    value = toolkit.fingerprint(bert.mirrored(v.reference()))
    assert bert.known_sources(v).get(transformers.__version__) == value, "record this release's fingerprint"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_an_unknown_source_is_refused_or_trusted(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bert, variant(arch).known, {"5.0.0": "0" * 64})
    monkeypatch.delenv(toolkit.TRUST_ENV, raising=False)
    ref = tiny(arch, "sdpa")
    model = copy.deepcopy(ref)
    with pytest.raises(patchkit.UnsupportedError, match="differs from the releases it was checked against"):
        patchkit.apply(model, attention="sdpa", registry=VERIFIED)
    assert not patchkit.is_patched(model)
    with pytest.warns(patchkit.PatchkitWarning, match="differs from the releases"):
        assert patchkit.apply(model, attention="sdpa", strict=False, registry=VERIFIED).swaps == []
    assert len(patchkit.apply(model, attention="sdpa", trust_transformers=True, registry=VERIFIED).swaps) == 1
    ids, mask = batch("left")
    assert valid_diff(_hidden(model, ids, mask), _hidden(ref, ids, mask), mask) < 1e-5
    # BERT's own table is untouched by this variant's refusal
    assert len(bert.KNOWN_SOURCES) >= 2
