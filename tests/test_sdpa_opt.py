"""The sdpa plugin on OPT decoders: padding-free forward, cached SDPA generation, training, reverse."""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from typing import Any

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
    # each row's last position (a padded one under right padding) is what generation reads: as unpatched
    torch.testing.assert_close(out.logits[:, -1], exp.logits[:, -1], atol=1e-5, rtol=1e-5)
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


def test_explicit_position_ids_are_used_on_the_fast_path() -> None:
    """OPT's positions only select the learned embedding: the packed path passes them to the user's
    ``embed_positions`` (``generate`` always passes them), no fallback."""
    ref = tiny_opt("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded("right")
    pos = (torch.arange(ids.shape[1])[None].expand_as(ids) + 3) % 20  # not the default ones
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    with torch.no_grad():
        exp = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert valid_diff(out, exp, mask) < 1e-5
    assert torch.count_nonzero(out[~mask.bool()]) == 0  # the packed path ran


# --- padding-free prefill with a KV cache ---------------------------------------------------------

CACHE_ARG = "cache" if "cache" in inspect.signature(OPTForCausalLM.forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    return out.cache if "cache" in type(out).__dataclass_fields__ else out.past_key_values


def cached_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def assert_cache_matches(got: Any, want: Any, mask: torch.Tensor) -> None:
    """Same layout and length; keys/values equal at valid positions, zeros at padded ones."""
    assert got.get_seq_length() == want.get_seq_length() and len(got.layers) == len(want.layers)
    valid = mask.bool()[:, None, :, None]  # [B, 1, T, 1] against [B, H, T, D]
    for (gk, gv), (wk, wv) in zip(cached_kv(got), cached_kv(want), strict=True):
        assert gk.shape == wk.shape and gv.shape == wv.shape
        for g, w in ((gk, wk), (gv, wv)):
            assert float((g - w).masked_fill(~valid, 0).abs().max()) < 1e-5
            assert torch.count_nonzero(g.masked_fill(valid, 0)) == 0  # written by the packed path


@pytest.mark.parametrize("side", ["left", "right", "holes", "none"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_plain_call_is_padding_free_and_fills_the_cache_like_the_unpatched_model(side: str, impl: str) -> None:
    ref = tiny_opt(impl)
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded(side)
    if side == "holes":
        mask = mask.clone()
        mask[0, 3] = mask[2, 8] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", patchkit.PatchkitWarning)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)  # OPT's config: use_cache=True
    with torch.no_grad():
        exp = ref(input_ids=ids, attention_mask=mask)
    assert valid_diff(out.logits, exp.logits, mask) < 1e-5
    assert_cache_matches(cache_of(out), cache_of(exp), mask)
    # each row's last position is what generation reads: equal to the unpatched model's even when padded
    last = (out.logits[:, -1] - exp.logits[:, -1]).abs().max()
    assert float(last) < 1e-5
    if side != "none":
        pads = ~mask.bool()
        pads[:, -1] = False
        assert pads.any() and torch.count_nonzero(out.logits[pads]) == 0  # the packed path ran


def test_an_empty_cache_object_is_filled_and_a_decode_step_continues_exactly() -> None:
    from transformers import DynamicCache

    ref = tiny_opt("eager")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded("left")
    caches = DynamicCache(config=model.config), DynamicCache(config=ref.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **{CACHE_ARG: caches[0]})
        exp = ref(input_ids=ids, attention_mask=mask, **{CACHE_ARG: caches[1]})
        assert cache_of(out) is caches[0]
        assert_cache_matches(caches[0], caches[1], mask)
        step = out.logits[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, torch.ones_like(step)], dim=1)
        nxt = model(input_ids=step, attention_mask=mask2, **{CACHE_ARG: caches[0]}).logits
        nxt_ref = ref(input_ids=step, attention_mask=mask2, **{CACHE_ARG: caches[1]}).logits
    assert valid_diff(out.logits, exp.logits, mask) < 1e-5
    assert float((nxt - nxt_ref).abs().max()) < 1e-5


def test_a_cache_that_keeps_the_passed_tensors_gets_fresh_ones_per_layer() -> None:
    """The prefill reuses its padded K/V buffers across layers only where the cache copied them
    (transformers' DynamicLayer concatenates); a cache layer that keeps the tensors it is given must
    not see a later layer's keys written into them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class KeepingLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.keys, self.values = key_states, value_states  # a reference, no copy
                return self.keys, self.values
            return super().update(key_states, value_states, *args, **kwargs)

    ref = tiny_opt("eager", num_hidden_layers=3)
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded("right")
    cache = DynamicCache(config=model.config)
    cache.layers = [KeepingLayer() for _ in range(3)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **{CACHE_ARG: cache})
        exp = ref(input_ids=ids, attention_mask=mask)
    assert all(type(layer) is KeepingLayer for layer in cache.layers)
    assert_cache_matches(cache, cache_of(exp), mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_prefill_is_padding_free_and_tokens_equal_eager(side: str) -> None:
    ref = tiny_opt("eager")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded(side, seed=3)
    kw = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", patchkit.PatchkitWarning)
        gen = model.generate(input_ids=ids, attention_mask=mask, **kw)
    gen_ref = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(gen.sequences, gen_ref.sequences)
    # the prompt's padded positions in the cache are zeros: the prefill took the packed path
    keys = cached_kv(cache_of(gen) if hasattr(gen, "cache") else gen.past_key_values)[0][0]
    prompt_pads = ~mask.bool()[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
    assert torch.count_nonzero(keys[:, :, : ids.shape[1]][prompt_pads]) == 0


def test_generate_with_a_static_cache_falls_back_loudly_and_matches_eager() -> None:
    ref = tiny_opt("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded("left", seed=5)
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    # generate builds a 4D mask for static caches: the prefill takes the original path, loudly
    with pytest.warns(patchkit.PatchkitWarning, match="non-2D"):
        gen = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(gen, ref.generate(input_ids=ids, attention_mask=mask, **kw))


def test_a_continued_cache_takes_the_hosts_cached_path_silently() -> None:
    ref = tiny_opt("sdpa")
    model = copy.deepcopy(ref)
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded("left")
    with torch.no_grad():
        first = model(input_ids=ids[:, :6], attention_mask=mask[:, :6])
        first_ref = ref(input_ids=ids[:, :6], attention_mask=mask[:, :6])
        with warnings.catch_warnings():
            warnings.simplefilter("error", patchkit.PatchkitWarning)
            out = model(input_ids=ids[:, 6:], attention_mask=mask, **{CACHE_ARG: cache_of(first)}).logits
        exp = ref(input_ids=ids[:, 6:], attention_mask=mask, **{CACHE_ARG: cache_of(first_ref)}).logits
    assert valid_diff(out, exp, mask[:, 6:]) < 1e-5


def test_training_with_gradient_checkpointing_and_the_default_cache_is_padding_free() -> None:
    ref = tiny_opt("eager").train()
    model = copy.deepcopy(ref)
    for m in (ref, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patchkit.apply(model, attention="sdpa")
    ids, mask = padded("right")
    labels = ids.masked_fill(~mask.bool(), -100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", patchkit.PatchkitWarning)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_ref = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=0)
