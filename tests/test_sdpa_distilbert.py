"""The sdpa plugin on DistilBERT: exactness vs eager, training, fallbacks, hooks, fingerprint, reverse.

Runs on the installed transformers (5.24) and on 5.17 (``PYTHONPATH=.tf517:src:plugins``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from patchkit_sdpa import distilbert
from patchkit_sdpa.distilbert import PackedDistilBertMixin
from test_sdpa_bert import batch, valid_diff
from torch import nn
from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel
from transformers.models.distilbert import modeling_distilbert

import patchkit
from patchkit import toolkit

TINY = dict(
    vocab_size=200,
    dim=32,
    n_layers=2,
    n_heads=4,
    hidden_dim=64,
    max_position_embeddings=64,
    dropout=0.0,
    attention_dropout=0.0,
    seq_classif_dropout=0.0,  # the classification head's own dropout (outside the patched region)
)


def tiny_distilbert(impl: str = "eager", cls: type = DistilBertModel, **over: object) -> nn.Module:
    torch.manual_seed(0)
    cfg = DistilBertConfig(**{**TINY, **over})
    cfg._attn_implementation = impl
    return cls(cfg).eval()


def _hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["right", "left", "holes", "none"])
def test_valid_tokens_match_eager_and_padding_is_zero(impl: str, kind: str, activation: str) -> None:
    ref = tiny_distilbert("eager", activation=activation)
    model = tiny_distilbert(impl, activation=activation)
    report = patchkit.apply(model, attention="sdpa")
    assert isinstance(model.transformer, PackedDistilBertMixin) and len(report.swaps) == 1
    ids, mask = batch(kind)
    out, exp = _hidden(model, ids, mask), _hidden(ref, ids, mask)
    assert valid_diff(out, exp, mask) < 1e-5
    assert torch.count_nonzero(out[~mask.bool()]) == 0  # documented: padded positions are zeros
    if kind == "none":
        torch.testing.assert_close(_hidden(model, ids, None), exp, rtol=1e-5, atol=1e-5)


def test_module_path_matches_eager_too() -> None:
    """A forward hook on the model (outside the region) changes nothing; requires_grad sends the
    blocks through their modules instead of the fused kernels: both must be exact."""
    ref, model = tiny_distilbert("eager"), tiny_distilbert("sdpa")
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")
    x = model.embeddings(ids)
    keep = mask.bool()
    with torch.enable_grad():
        packed = distilbert.encode_packed(model.transformer, x.detach().requires_grad_(), keep)
    exp = _hidden(ref, ids, mask)
    assert valid_diff(packed.detach(), exp, mask) < 1e-5


def test_training_loss_and_grads_match_eager_with_padding() -> None:
    ref = tiny_distilbert("eager", DistilBertForSequenceClassification, num_labels=3).train()
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")  # the classifier reads position 0: valid under right padding
    labels = torch.tensor([0, 1, 2, 1])
    loss_ref = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_ref.backward()
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    # the floor covers gradients that are 0 in exact arithmetic (the key bias) and come out as noise
    floor = 1e-5 * max(float(q.grad.abs().max()) for q in ref.parameters() if q.grad is not None)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=max(floor, 1e-7), msg=name)


def test_gradient_checkpointing_is_honoured() -> None:
    ref = tiny_distilbert("eager", DistilBertForSequenceClassification, num_labels=2).train()
    model = copy.deepcopy(ref)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.distilbert.transformer.layer[0].gradient_checkpointing
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")
    labels = torch.tensor([0, 1, 1, 0])
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    w = model.distilbert.transformer.layer[0].attention.q_lin.weight
    w_ref = ref.distilbert.transformer.layer[0].attention.q_lin.weight
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-7)


def test_parameters_are_shared_and_reverse_restores_objects() -> None:
    model = tiny_distilbert("sdpa", DistilBertForSequenceClassification, num_labels=2)
    other = tiny_distilbert("sdpa")
    before = dict(model.named_parameters())
    transformer, blocks = model.distilbert.transformer, list(model.distilbert.transformer.layer)
    forward = modeling_distilbert.Transformer.forward
    patchkit.apply(model, attention="sdpa")
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items()) and len(after) == len(before)
    assert type(other.transformer) is modeling_distilbert.Transformer  # per instance
    assert modeling_distilbert.Transformer.forward is forward  # never the class
    patchkit.reverse(model)
    assert model.distilbert.transformer is transformer and list(model.distilbert.transformer.layer) == blocks
    assert type(model.distilbert.transformer) is modeling_distilbert.Transformer


def test_deepcopy_of_a_patched_model_is_an_independent_patched_model() -> None:
    ref, model = tiny_distilbert("eager"), tiny_distilbert("sdpa")
    patchkit.apply(model, attention="sdpa")
    twin = copy.deepcopy(model)
    assert isinstance(twin.transformer, PackedDistilBertMixin)
    ids, mask = batch("left")
    assert valid_diff(_hidden(twin, ids, mask), _hidden(ref, ids, mask), mask) < 1e-5
    patchkit.reverse(twin)
    assert type(twin.transformer) is modeling_distilbert.Transformer
    assert isinstance(model.transformer, PackedDistilBertMixin)


def test_output_attentions_and_hidden_states_fall_back_loudly() -> None:
    ref, model = tiny_distilbert("eager"), tiny_distilbert("eager")
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")
    with torch.no_grad(), pytest.warns(patchkit.PatchkitWarning, match="attentions / hidden states"):
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        exp = ref(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3
    torch.testing.assert_close(out.attentions[1], exp.attentions[1])
    torch.testing.assert_close(out.hidden_states[-1], exp.hidden_states[-1])


def test_a_mask_that_is_not_padding_is_never_dropped() -> None:
    ref, model = tiny_distilbert("sdpa"), tiny_distilbert("sdpa")
    patchkit.apply(model, attention="sdpa")
    ids, _ = batch("none")
    x = model.embeddings(ids).detach()
    mask4d = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(4, 1, 12, 12)
    with torch.no_grad(), pytest.warns(patchkit.PatchkitWarning, match="differs between query rows"):
        out = model.transformer(x, mask4d).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(out, ref.transformer(x, mask4d).last_hidden_state)


def test_no_warning_on_the_fast_path() -> None:
    model = tiny_distilbert("sdpa")
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _hidden(model, ids, mask)


HOOK_TARGETS = {
    "block": lambda m: m.transformer.layer[1],
    "attention": lambda m: m.transformer.layer[0].attention,
    "ffn": lambda m: m.transformer.layer[1].ffn,
    "linear": lambda m: m.transformer.layer[1].ffn.lin1,
    "layernorm": lambda m: m.transformer.layer[0].sa_layer_norm,
}


@pytest.mark.parametrize("target", list(HOOK_TARGETS))
def test_a_hook_added_after_apply_sees_the_original_path_with_one_warning(target: str) -> None:
    ref, model = tiny_distilbert("sdpa"), tiny_distilbert("sdpa")
    patchkit.apply(model, attention="sdpa")
    seen: dict[str, list[tuple[int, ...]]] = {"ref": [], "patched": []}

    def hook(key: str):  # type: ignore[no-untyped-def]
        def fn(m: nn.Module, args: tuple, out: object) -> object:
            t = out[0] if isinstance(out, tuple) else out
            seen[key].append(tuple(t.shape))
            return (
                tuple(o * 0.5 if isinstance(o, torch.Tensor) else o for o in out)
                if isinstance(out, tuple)
                else out * 0.5
            )

        return fn

    HOOK_TARGETS[target](ref).register_forward_hook(hook("ref"))
    HOOK_TARGETS[target](model).register_forward_hook(hook("patched"))
    ids, mask = batch("right")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _hidden(model, ids, mask)
    ours = [w for w in caught if issubclass(w.category, patchkit.PatchkitWarning)]
    assert len(ours) == 1 and "hooks inside the patched region" in str(ours[0].message)
    torch.testing.assert_close(out, _hidden(ref, ids, mask))
    assert seen["patched"] == seen["ref"] and seen["ref"]


def test_hooks_present_at_apply_are_refused_under_strict() -> None:
    model = tiny_distilbert("sdpa")
    model.transformer.layer[0].ffn.lin2.register_forward_hook(lambda m, a, o: o)
    with pytest.raises(patchkit.UnsupportedError, match="hooks inside the patched region"):
        patchkit.apply(model, attention="sdpa")
    assert not patchkit.is_patched(model)


def test_a_block_whose_code_differs_is_left_alone() -> None:
    class MyBlock(modeling_distilbert.TransformerBlock):
        def forward(self, hidden_states, attention_mask=None, **kwargs):  # type: ignore[no-untyped-def]
            return super().forward(hidden_states, attention_mask, **kwargs) * 2

    model = tiny_distilbert("sdpa")
    model.transformer.layer[1].__class__ = MyBlock
    transformer = model.transformer
    with pytest.raises(patchkit.PatchError, match="not verifiably DistilBERT"):
        patchkit.apply(model, attention="sdpa")
    assert model.transformer is transformer and not patchkit.is_patched(model)


def test_installed_release_fingerprint_is_recorded() -> None:
    value = toolkit.fingerprint(distilbert.mirrored(distilbert._reference()))
    assert distilbert.KNOWN_SOURCES.get(transformers.__version__) == value, "record this release's fingerprint"


def test_an_unknown_source_is_refused_warned_or_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distilbert, "KNOWN_SOURCES", {"5.0.0": "0" * 64})
    monkeypatch.delenv(toolkit.TRUST_ENV, raising=False)
    ref = tiny_distilbert("sdpa")
    model = copy.deepcopy(ref)
    with pytest.raises(patchkit.UnsupportedError, match="differs from the releases it was checked against"):
        patchkit.apply(model, attention="sdpa")
    assert not patchkit.is_patched(model)
    with pytest.warns(patchkit.PatchkitWarning, match="differs from the releases"):
        assert patchkit.apply(model, attention="sdpa", strict=False).swaps == []
    assert not patchkit.is_patched(model)
    assert len(patchkit.apply(model, attention="sdpa", trust_transformers=True).swaps) == 1
    ids, mask = batch("left")
    assert valid_diff(_hidden(model, ids, mask), _hidden(ref, ids, mask), mask) < 1e-5
