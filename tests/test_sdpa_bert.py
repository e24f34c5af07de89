"""The sdpa plugin on BERT-structured encoders: exactness, training, fallbacks, sharing, reverse."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from helpers import without_patchers
from patchkit_sdpa.bert import PackedEncoderMixin
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)
from transformers.models.bert import modeling_bert

import patchkit

TINY = dict(
    vocab_size=200,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_bert(impl: str = "eager", cls: type = BertModel, **over: object) -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(**{**TINY, **over})
    cfg._attn_implementation = impl
    return cls(cfg).eval()


def batch(kind: str = "right", b: int = 4, t: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ar = torch.arange(t)[None]
    lens = torch.tensor([t, 3, t // 2, 1][:b])
    if kind == "right":
        mask = ar < lens[:, None]
    elif kind == "left":
        mask = ar >= t - lens[:, None]
    elif kind == "holes":
        mask = torch.rand(b, t, generator=g) > 0.3
        mask[:, 0] = True
    else:
        mask = torch.ones(b, t, dtype=torch.bool)
    ids = torch.randint(5, 200, (b, t), generator=g) * mask
    return ids, mask.long()


def valid_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).masked_fill(~mask.bool()[..., None], 0).abs().max())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["right", "left", "holes", "none"])
def test_valid_tokens_match_eager_and_padding_is_zero(impl: str, kind: str) -> None:
    ref = tiny_bert("eager")
    model = tiny_bert(impl)
    report = patchkit.apply(model, attention="sdpa")
    assert isinstance(model.encoder, PackedEncoderMixin) and len(report.swaps) == 1
    ids, mask = batch(kind)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        exp = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert valid_diff(out, exp, mask) < 1e-5
    assert torch.count_nonzero(out[~mask.bool()]) == 0  # documented: padded positions are zeros
    if kind == "none":
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).last_hidden_state, exp, rtol=1e-5, atol=1e-5)


def test_training_loss_and_grads_match_eager_with_padding() -> None:
    ref = tiny_bert("eager", BertForSequenceClassification, num_labels=3).train()
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")
    labels = torch.tensor([0, 1, 2, 1])
    loss_ref = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_ref.backward()
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=0)
    # within 1e-4 relative; the floor (1e-4 of the largest gradient) covers gradients that are 0 in
    # exact arithmetic (the key bias: softmax is invariant to it) and come out as ~1e-13 noise.
    floor = 1e-4 * max(float(q.grad.abs().max()) for q in ref.parameters() if q.grad is not None)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=floor, msg=name)


def test_gradient_checkpointing_is_honoured() -> None:
    ref = tiny_bert("eager", BertForSequenceClassification, num_labels=2).train()
    model = copy.deepcopy(ref)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.bert.encoder.layer[0].gradient_checkpointing
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")  # the pooler reads position 0: padded under left padding (zeros, documented)
    labels = torch.tensor([0, 1, 1, 0])
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    w, w_ref = model.bert.encoder.layer[0].attention.self.query.weight, ref.bert.encoder.layer[0].attention.self.query
    torch.testing.assert_close(w.grad, w_ref.weight.grad, rtol=1e-4, atol=1e-7)


def test_parameters_are_shared_and_training_updates_the_users_tensors() -> None:
    model = tiny_bert("sdpa", BertForSequenceClassification, num_labels=2).train()
    before = {n: p for n, p in model.named_parameters()}
    query = model.bert.encoder.layer[0].attention.self.query
    patchkit.apply(model, attention="sdpa")
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items()) and len(after) == len(before)
    old = query.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, mask = batch("right")
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    opt.step()
    assert not torch.equal(query.weight, old)  # the user's own tensor moved
    patchkit.reverse(model)
    assert model.bert.encoder.layer[0].attention.self.query is query


def test_reverse_restores_objects_and_other_instances_are_untouched() -> None:
    a, b = tiny_bert("sdpa"), tiny_bert("sdpa")
    encoder, layers = a.encoder, list(a.encoder.layer)
    forward = modeling_bert.BertEncoder.forward
    ids, mask = batch("right")
    with torch.no_grad():
        before_b = b(input_ids=ids, attention_mask=mask).last_hidden_state
    patchkit.apply(a, attention="sdpa")
    assert type(b.encoder) is modeling_bert.BertEncoder and modeling_bert.BertEncoder.forward is forward
    with torch.no_grad():
        assert torch.equal(b(input_ids=ids, attention_mask=mask).last_hidden_state, before_b)
    patchkit.reverse(a)
    assert a.encoder is encoder and list(a.encoder.layer) == layers and type(a.encoder) is modeling_bert.BertEncoder


def test_output_attentions_and_hidden_states_fall_back_loudly() -> None:
    ref = tiny_bert("eager")
    model = tiny_bert("eager")
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")
    with torch.no_grad(), pytest.warns(UserWarning, match="attentions / hidden states"):
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        exp = ref(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3
    torch.testing.assert_close(out.attentions[1], exp.attentions[1])
    torch.testing.assert_close(out.hidden_states[-1], exp.hidden_states[-1])


def test_custom_4d_mask_is_never_dropped() -> None:
    ref, model = tiny_bert("sdpa"), tiny_bert("sdpa")
    patchkit.apply(model, attention="sdpa")
    ids, _ = batch("none")
    mask4d = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(4, 1, 12, 12)
    with torch.no_grad(), pytest.warns(UserWarning, match="differs between query rows"):
        out = model(input_ids=ids, attention_mask=mask4d).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(out, ref(input_ids=ids, attention_mask=mask4d).last_hidden_state)


def test_no_warning_on_the_fast_path() -> None:
    model = tiny_bert("sdpa")
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(is_decoder=True), "decoder"),
        (dict(is_decoder=True, add_cross_attention=True), "cross-attention"),
        (dict(position_embedding_type="relative_key"), "relative"),
    ],
)
def test_unsupported_configs_raise_under_strict_and_are_left_alone_otherwise(over: dict, match: str) -> None:
    if "position_embedding_type" in over and "relative_key" not in inspect.getsource(modeling_bert):
        pytest.skip("this transformers release's BERT has no relative positions (the config field is ignored)")
    model = tiny_bert("eager", **over)
    encoder = model.encoder
    with pytest.raises(patchkit.UnsupportedError, match=match):
        patchkit.apply(model, attention="sdpa")
    assert model.encoder is encoder and not patchkit.is_patched(model)
    report = patchkit.apply(model, attention="sdpa", strict=False)
    assert model.encoder is encoder and not report.swaps and len(report.skipped) == 1


def test_foreign_hook_on_a_layer_is_refused() -> None:
    model = tiny_bert("eager")
    model.encoder.layer[1].attention.register_forward_hook(lambda m, a, o: None)
    with pytest.raises(patchkit.UnsupportedError, match="hooks"):
        patchkit.apply(model, attention="sdpa")


def test_a_layer_with_different_code_is_left_alone() -> None:
    class PreNormLayer(modeling_bert.BertLayer):
        def feed_forward_chunk(self, attention_output):  # type: ignore[no-untyped-def]
            return self.output(self.intermediate(attention_output), attention_output) * 2

    model = tiny_bert("eager")
    layer = PreNormLayer.__new__(PreNormLayer)
    layer.__dict__.update(model.encoder.layer[0].__dict__)
    model.encoder.layer[0] = layer
    report = patchkit.apply(model, attention="sdpa", strict=False, registry=without_patchers("sdpa-generic-encoder"))
    assert not report.swaps and "differs" in report.skipped[0].reason  # the verified path never mirrors it
    # by default the generic encoder takes it: it runs the layers' own code (the changed one) packed
    ref = copy.deepcopy(model)
    report = patchkit.apply(model, attention="sdpa")
    assert [s.patcher for s in report.swaps] == ["sdpa-generic-encoder"]
    ids, mask = batch("right")
    with torch.no_grad():
        got, want = model(input_ids=ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask)
    assert (got.last_hidden_state - want.last_hidden_state)[mask.bool()].abs().max() < 1e-5


@pytest.mark.parametrize("cls, cfg_cls", [(RobertaModel, RobertaConfig), (XLMRobertaModel, XLMRobertaConfig)])
def test_bert_structured_models_are_verified_by_code(cls: type, cfg_cls: type) -> None:
    torch.manual_seed(0)
    cfg = cfg_cls(**TINY, pad_token_id=1)
    cfg._attn_implementation = "eager"
    ref = cls(cfg).eval()
    model = copy.deepcopy(ref)
    report = patchkit.apply(model, attention="sdpa")
    assert len(report.swaps) == 1 and isinstance(model.encoder, PackedEncoderMixin)
    ids, mask = batch("right")
    ids = ids.masked_fill(~mask.bool(), 1)
    with torch.no_grad():
        d = valid_diff(
            model(input_ids=ids, attention_mask=mask).last_hidden_state,
            ref(input_ids=ids, attention_mask=mask).last_hidden_state,
            mask,
        )
    assert d < 1e-5


def test_plan_works_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = BertModel(BertConfig(**TINY))
    plan = patchkit.plan(model, attention="sdpa")
    assert [p.paths for p in plan.patches] == [["encoder"]]


def test_unknown_arguments_fall_back_loudly() -> None:
    ref, model = tiny_bert("eager"), tiny_bert("eager")
    patchkit.apply(model, attention="sdpa")
    ids, mask = batch("right")
    emb = model.embeddings(input_ids=ids)
    ext = mask.bool()[:, None, None, :].expand(4, 1, 12, 12)  # the sdpa-style padding mask
    with torch.no_grad(), pytest.warns(UserWarning, match="unsupported arguments"):
        out = model.encoder(emb, attention_mask=ext, head_mask=torch.ones(2, 4)).last_hidden_state
    with torch.no_grad():
        exp = ref.encoder(emb, attention_mask=ext).last_hidden_state
    assert valid_diff(out, exp, mask) < 1e-5
