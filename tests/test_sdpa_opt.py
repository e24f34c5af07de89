"""The sdpa plugin on OPT decoders: padding-free forward, cached SDPA generation, training, reverse."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM
from transformers.models.opt import modeling_opt

import patchkit


def tiny_opt(impl: str = "eager", **over: object) -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(
        **{
            **dict(
                vocab_size=300,
                hidden_size=32,
                num_hidden_layers=2,
                ffn_dim=64,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=16,
                dropout=0.0,
                attention_dropout=0.0,
            ),
            **over,
        }
    )
    cfg._attn_implementation = impl
    return OPTForCausalLM(cfg).eval()


def padded(side: str, b: int = 3, t: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([t, 4, 7][:b])
    ar = torch.arange(t)[None]
    mask = (ar < lens[:, None]) if side == "right" else (ar >= t - lens[:, None]) if side == "left" else ar >= 0
    mask = mask.expand(b, t)
    ids = torch.randint(3, 300, (b, t), generator=g).masked_fill(~mask, 1)
    return ids, mask.long()


def valid_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).masked_fill(~mask.bool()[..., None], 0).abs().max())


@pytest.mark.parametrize("side", ["right", "left", "none"])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_forward_without_cache_matches_eager(side: str, pre_norm: bool) -> None:
    ref = tiny_opt("eager", do_layer_norm_before=pre_norm)
    model = copy.deepcopy(ref)
    report = patchkit.apply(model, attention="sdpa")
    assert [s.paths for s in report.swaps] == [["model.decoder"]]
    ids, mask = padded(side)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        exp = ref(input_ids=ids, attention_mask=mask, use_cache=False)
    assert out.past_key_values is None if hasattr(out, "past_key_values") else True
    assert valid_diff(out.logits, exp.logits, mask) < 1e-5
    assert torch.count_nonzero(out.logits[~mask.bool()]) == 0  # padded positions: lm_head(0) = 0 (no bias)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_forward_and_greedy_generation_match_eager(side: str) -> None:
    ref = tiny_opt("eager")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    assert model.config._attn_implementation == "sdpa"
    ids, mask = padded(side)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)  # use_cache defaults to True: the cached SDPA path
        exp = ref(input_ids=ids, attention_mask=mask)
    assert valid_diff(out.logits, exp.logits, mask) < 1e-5
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    gen_ref = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(gen, gen_ref)


def test_training_loss_and_grads_match_eager() -> None:
    ref = tiny_opt("eager").train()
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded("right")
    labels = ids.masked_fill(~mask.bool(), -100)
    loss_ref = ref(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    loss_ref.backward()
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=0)
    floor = 1e-4 * max(float(q.grad.abs().max()) for q in ref.parameters() if q.grad is not None)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=floor, msg=name)


def test_reverse_restores_forward_and_config_and_leaves_others_alone() -> None:
    model, other = tiny_opt("eager"), tiny_opt("eager")
    decoder = model.model.decoder
    params = {n: p for n, p in model.named_parameters()}
    patchkit.apply(model, attention="sdpa")
    assert isinstance(decoder.__dict__.get("forward"), types.MethodType)
    assert "forward" in model.lm_head.__dict__ and "forward" not in other.lm_head.__dict__
    assert "forward" not in other.model.decoder.__dict__ and other.config._attn_implementation == "eager"
    assert modeling_opt.OPTDecoder.forward is type(other.model.decoder).forward
    assert all(p is params[n] for n, p in model.named_parameters())
    patchkit.reverse(model)
    assert "forward" not in decoder.__dict__ and model.config._attn_implementation == "eager"
    assert "forward" not in model.lm_head.__dict__
    assert model.model.decoder is decoder


def test_sdpa_model_keeps_its_implementation() -> None:
    model = tiny_opt("sdpa")
    report = patchkit.apply(model, attention="sdpa")
    assert not any("eager -> sdpa" in n for n in report.swaps[0].notes)


def test_hidden_states_request_falls_back_loudly() -> None:
    ref = tiny_opt("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded("right")
    with torch.no_grad(), pytest.warns(UserWarning, match="hidden states"):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    with torch.no_grad():
        exp = ref(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    assert len(out.hidden_states) == len(exp.hidden_states) == 3
    torch.testing.assert_close(out.logits, exp.logits)


def test_foreign_hook_is_refused_under_strict() -> None:
    model = tiny_opt("sdpa")
    model.model.decoder.layers[0].self_attn.register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(patchkit.UnsupportedError, match="hooks"):
        patchkit.apply(model, attention="sdpa")
    assert patchkit.apply(model, attention="sdpa", strict=False).swaps == []


def test_explicit_position_ids_fall_back_loudly() -> None:
    ref = tiny_opt("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded("right")
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad(), pytest.warns(UserWarning, match="position_ids"):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    with torch.no_grad():
        exp = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out, exp)
