"""flash2 semantics against transformers' own paths (issue 11): position ids, sliding windows with
holes, hooks, KV-cache prefill. CPU, fp32, reference kernel, tiny random configs; valid tokens only.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_flash2_llama import LinearInputs, close_on, llama, logits, mistral, patch

import patchkit

TOL = 1e-5


def _ids(rows: int, length: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(1, 97, (rows, length), generator=torch.Generator().manual_seed(seed))


POSITIONS = {
    "gap": torch.cat([torch.arange(6), torch.arange(10, 16)]),
    "stride2": torch.arange(12) * 2,
    "offset": torch.arange(12) + 7,
}


# -- 1. position_ids: only a restart (in batch 1, without a padding mask) is a packed boundary ----
@pytest.mark.parametrize("positions", list(POSITIONS))
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("call", ["no-mask", "ones-mask", "cache"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gaps_and_strides_are_not_boundaries(positions, rows, call, impl):
    model = llama()
    model.config._attn_implementation = impl
    ids = _ids(rows, 12)
    pos = POSITIONS[positions].unsqueeze(0).expand(rows, -1)
    ones = torch.ones(rows, 12, dtype=torch.long)
    # the reference: the host's plain causal attention over the whole row, RoPE at the given positions
    # (with a 2D mask transformers never reads sequence boundaries off position_ids)
    want = logits(model, ids, ones, position_ids=pos)
    patch(model)
    mask = None if call == "no-mask" else ones
    got = logits(model, ids, mask, position_ids=pos, use_cache=call == "cache")
    assert close_on(ones, got, want) <= TOL


@pytest.mark.parametrize("call", ["no-mask", "ones-mask", "cache"])
def test_restart_in_one_row_is_packed(call):
    # transformers' FA2 path: a batch-1 call without padding whose position ids restart holds
    # packed sequences, each attending to itself only (eager has no such notion with a mask or a
    # cache): the reference is each sequence run on its own
    model = llama()
    lengths = [4, 5, 3]
    ids = _ids(1, sum(lengths), seed=2)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    separate = torch.cat([logits(model, part, None) for part in ids.split(lengths, dim=1)], dim=1)
    patch(model)
    mask = None if call == "no-mask" else torch.ones_like(ids)
    got = logits(model, ids, mask, position_ids=pos, use_cache=call == "cache")
    assert (got - separate).abs().max() <= TOL


def test_restart_in_a_batch_is_not_packed():
    # batch > 1: transformers' FA2 path runs plain causal attention per row, whatever the positions
    model = llama()
    ids = _ids(2, 10)
    pos = torch.cat([torch.arange(5), torch.arange(5)]).unsqueeze(0).expand(2, -1)
    ones = torch.ones_like(ids)
    want = logits(model, ids, ones, position_ids=pos)
    patch(model)
    assert close_on(ones, logits(model, ids, None, position_ids=pos), want) <= TOL


@pytest.mark.parametrize("positions", ["gap", "stride2"])
def test_falcon_gaps_are_not_boundaries(positions):
    from test_flash2_falcon import falcon

    import patchkit

    model = falcon("new-arch-gqa")
    ids = _ids(1, 12)
    pos = POSITIONS[positions].unsqueeze(0)
    want = logits(model, ids, torch.ones_like(ids), position_ids=pos)
    patchkit.apply(model, attention="flash2", backend="reference")
    assert (logits(model, ids, None, position_ids=pos) - want).abs().max() <= TOL


# -- 2. sliding window over a mask with holes: the window counts original positions --------------
def _holey_mask() -> torch.Tensor:
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, 3:5] = 0  # 1 1 1 0 0 1 1 1 1 1 1
    mask[2, :2] = 0  # left padding and a hole
    mask[2, 6] = 0
    return mask


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliding_window_with_holes_matches_eager(padding_free, impl):
    model = mistral(window=3)
    model.config._attn_implementation = impl  # the fallback runs the previous implementation
    ids, mask = _ids(3, 11), _holey_mask()
    want = logits(model, ids, mask)
    patch(model, padding_free=padding_free)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = logits(model, ids, mask)
        logits(model, ids, mask)
    assert close_on(mask, got, want) <= TOL
    loud = [w for w in caught if issubclass(w.category, patchkit.PatchkitWarning)]
    assert len(loud) == 1 and "hole" in str(loud[0].message)  # once per model, not per layer or call


def test_sliding_window_with_holes_prefill_and_decode_with_cache_match_eager():
    model = mistral(window=3)
    ids, mask = _ids(3, 11), _holey_mask()
    step = _ids(3, 1, seed=9)
    mask_step = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)

    def run():
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True)
            cache = out.past_key_values
            return out.logits, model(step, attention_mask=mask_step, past_key_values=cache, use_cache=True).logits

    want_prefill, want_step = run()
    patch(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_prefill, got_step = run()
    assert close_on(mask, got_prefill, want_prefill) <= TOL
    assert (got_step - want_step).abs().max() <= TOL
    assert [w for w in caught if issubclass(w.category, patchkit.PatchkitWarning)]


def test_holes_without_a_window_stay_on_the_fast_path():
    # causal attention over the valid tokens of a row is the same packed or not: no fallback
    model = llama()
    ids, mask = _ids(3, 11), _holey_mask()
    want = logits(model, ids, mask)
    patch(model)
    with warnings.catch_warnings(), LinearInputs(model.model.layers[0].mlp.gate_proj.weight) as recorder:
        warnings.simplefilter("error", patchkit.PatchkitWarning)
        got = logits(model, ids, mask)
    assert close_on(mask, got, want) <= TOL
    assert recorder.seen == [(1, int(mask.sum()), 64)]  # padding-free


# -- 3. hooks inside the patched model see what they would see unpatched --------------------------
SHAPES: list[tuple[int, ...]] = []


def _zero_first_position(module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    SHAPES.append(tuple(hidden.shape))
    hidden = hidden.clone()
    hidden[:, 0] = 0  # each row's first position: a packed (1, T, D) row would get this wrong
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _scale_pre(module, args):
    SHAPES.append(tuple(args[0].shape))
    return (args[0] * 1.5, *args[1:])


def _loud(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, patchkit.PatchkitWarning)]


def _ran_padding_free(model, ids, mask) -> bool:
    """Padding-free re-pads the last hidden state with zeros; the padded path leaves values there."""
    with torch.no_grad():
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
    return bool((hidden[~mask.bool()] == 0).all())


@pytest.mark.parametrize("when", ["before-apply", "after-apply"])
@pytest.mark.parametrize("kind", ["forward", "pre", "global"])
def test_hooks_see_padded_tensors_or_call_runs_padded(when, kind):
    model = llama()
    ids, mask = _ids(3, 11), _holey_mask()
    mask[1, 8:] = 0
    layer = model.model.layers[1]

    def register():
        if kind == "forward":
            return layer.register_forward_hook(_zero_first_position)
        if kind == "pre":
            return layer.mlp.register_forward_pre_hook(_scale_pre)
        return torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: _zero_first_position(m, i, o) if m is layer else None
        )

    SHAPES.clear()
    handle = register()
    try:
        want = logits(model, ids, mask)
        want_shapes = list(SHAPES)
        if when == "after-apply":
            handle.remove()
        patch(model)
        if when == "after-apply":
            handle = register()
        SHAPES.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = logits(model, ids, mask)
            again = logits(model, ids, mask)
        assert SHAPES == want_shapes * 2 == [(3, 11, 64)] * 2
        assert close_on(mask, got, want) <= TOL
        assert close_on(mask, again, want) <= TOL
        loud = _loud(caught)
        assert len(loud) == 1 and "hook" in loud[0]  # loud, once per model (not per layer or call)
    finally:
        handle.remove()
    with warnings.catch_warnings():  # hook gone: padding-free again, silently
        warnings.simplefilter("error", patchkit.PatchkitWarning)
        assert _ran_padding_free(model, ids, mask)


def test_transformers_output_capturing_hooks_do_not_count():
    model = llama()
    ids, mask = _ids(3, 11), _holey_mask()
    patch(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, output_hidden_states=True)  # installs inert capturing hooks
    hooks = [getattr(h, "__name__", "") for m in model.modules() for h in m._forward_hooks.values()]
    assert hooks and set(hooks) == {"output_capturing_hook"}  # the test sees real capturing hooks
    with warnings.catch_warnings():
        warnings.simplefilter("error", patchkit.PatchkitWarning)
        assert _ran_padding_free(model, ids, mask)


# -- 4. padding-free prefill into an empty KV cache ------------------------------------------------
def _cached(make):
    model = make()
    model.config.use_cache = True  # the Llama / Mistral default
    model.generation_config.use_cache = True
    return model


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _assert_same_cache(got, want, mask) -> None:
    got_layers, want_layers = _cache_layers(got), _cache_layers(want)
    assert len(got_layers) == len(want_layers) > 0
    for (gk, gv), (wk, wv) in zip(got_layers, want_layers, strict=True):
        assert gk.shape == wk.shape and gv.shape == wv.shape  # [B, H, L, D] (sliding: last window-1)
        valid = mask[:, -wk.shape[2] :].bool()
        for g, w in ((gk, wk), (gv, wv)):
            assert (g - w).abs().transpose(1, 2)[valid].max() <= TOL


@pytest.mark.parametrize("make", [llama, lambda: mistral(window=3)], ids=["llama", "mistral-window3"])
@pytest.mark.parametrize("pad", ["left", "right"])
@pytest.mark.parametrize("cache_arg", ["none", "empty-dynamic-cache"])
def test_plain_call_with_cache_runs_padding_free(make, pad, cache_arg):
    from test_flash2_llama import batch
    from transformers import DynamicCache

    model = _cached(make)
    ids, mask = batch(pad)

    def call():
        kw = {} if cache_arg == "none" else {"past_key_values": DynamicCache(config=model.config)}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # past_key_values -> cache (5.24)
            return model(ids, attention_mask=mask, **kw)  # no use_cache argument: config says True

    want = call()
    patch(model)
    with LinearInputs(model.model.layers[0].mlp.gate_proj.weight) as recorder:
        got = call()
    assert recorder.seen == [(1, int(mask.sum()), 64)]  # padding-free although a cache is filled
    assert close_on(mask, got.logits, want.logits) <= TOL
    _assert_same_cache(got.past_key_values, want.past_key_values, mask)
    # a decode step continues from the cache exactly as eager's
    step = _ids(3, 1, seed=11)
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        want_step = model_step = None
        patchkit.reverse(model)
        want_step = model(step, attention_mask=step_mask, past_key_values=want.past_key_values).logits
        patch(model)
        model_step = model(step, attention_mask=step_mask, past_key_values=got.past_key_values).logits
    assert (model_step - want_step).abs().max() <= TOL


def test_a_cache_that_keeps_the_passed_tensors_gets_fresh_ones_per_layer():
    """The prefill reuses its padded K/V buffers across layers only where the cache copied them
    (transformers' DynamicLayer concatenates); a cache layer that keeps the tensors it is given must
    not see a later layer's keys written into them."""
    from test_flash2_llama import batch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class KeepingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.keys, self.values = key_states, value_states  # a reference, no copy
                return self.keys, self.values
            return super().update(key_states, value_states, *args, **kwargs)

    model = _cached(llama)  # two layers: the second would overwrite the first's kept tensors
    ids, mask = batch("right")
    with torch.no_grad():
        want = model(ids, attention_mask=mask)
    patch(model)
    cache = DynamicCache(config=model.config)
    cache.layers = [KeepingLayer() for _ in range(model.config.num_hidden_layers)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values -> cache (5.24)
        model(ids, attention_mask=mask, past_key_values=cache)
    assert all(type(layer) is KeepingLayer for layer in cache.layers)
    _assert_same_cache(cache, want.past_key_values, mask)


@pytest.mark.parametrize(
    "make",
    [llama, lambda: llama(kv_heads=1), lambda: mistral(window=3), lambda: mistral(window=6)],
    ids=["llama-gqa", "llama-mqa", "mistral-window3", "mistral-window6"],
)
@pytest.mark.parametrize("rows", [1, 3])
def test_generate_prefill_runs_padding_free_and_matches_eager(make, rows):
    from test_flash2_llama import batch

    model = _cached(make)
    ids, mask = batch("left")
    ids, mask = ids[:rows], mask[:rows]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, **kw)
    patch(model)
    with LinearInputs(model.model.layers[0].mlp.gate_proj.weight) as recorder:
        got = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)
    if bool(mask.all()):
        assert recorder.seen[0] == (rows, 11, 64)  # nothing to skip: the padded path
    else:
        assert recorder.seen[0] == (1, int(mask.sum()), 64)  # the prefill ran padding-free
    assert all(shape[:2] == (rows, 1) for shape in recorder.seen[1:]), recorder.seen  # decode: one token per row


def test_non_empty_cache_takes_the_padded_path():
    from test_flash2_llama import batch

    model = _cached(llama)
    ids, mask = batch("left")
    with torch.no_grad():
        first = model(ids[:, :6], attention_mask=mask[:, :6])
        rest_want = model(ids[:, 6:], attention_mask=mask, past_key_values=first.past_key_values).logits
        first = model(ids[:, :6], attention_mask=mask[:, :6])
        patch(model)
        with LinearInputs(model.model.layers[0].mlp.gate_proj.weight) as recorder:
            rest = model(ids[:, 6:], attention_mask=mask, past_key_values=first.past_key_values).logits
    assert recorder.seen == [(3, 5, 64)]
    assert close_on(mask[:, 6:], rest, rest_want) <= TOL
