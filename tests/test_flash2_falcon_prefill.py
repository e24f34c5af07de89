"""Padding-free Falcon (issue 11, item 1): plain calls, KV-cache prefill and ``generate``.

``FalconModel`` passes no per-call kwargs to its layers and builds its masks itself: the packed
boundaries travel in flash2's per-call context, and for the packed call the host's mask builder is
pointed at ``"patchkit"`` through a one-call config view (no ``tokens x tokens`` mask); from
transformers 5.25 (``DISPATCHES``) the config itself is routed through ``"patchkit"`` while patched,
as for Llama, and ALiBi is refused (test_flash2_falcon.py). Every Falcon variant is covered: new
decoder architecture (GQA, one or two layer norms), falcon-7b-like multi-query parallel attention,
full multi-head sequential attention, ALiBi (falcon-rw) with full and multi-query attention (up to
5.24). CPU, fp32, reference kernel, tiny random configs with Falcon's default ``use_cache=True``;
logits and the cache compared on valid tokens (max |diff| <= 1e-5) against the unpatched model
(eager; sdpa for ALiBi, see test_flash2_falcon.py), greedy tokens equal.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import snapshot
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache, FalconConfig, FalconForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.models.falcon import modeling_falcon

import patchkit

TOL = 1e-5
# transformers >= 5.25: FalconAttention hands q/k/v to ALL_ATTENTION_FUNCTIONS; ALiBi is refused there
DISPATCHES = not hasattr(modeling_falcon, "FALCON_ATTENTION_CLASSES")

VARIANTS = {
    # falcon-40b / 180b: grouped fused qkv, ln_attn + ln_mlp, parallel attention
    "new-arch-gqa": dict(new_decoder_architecture=True, num_kv_heads=2, multi_query=False),
    # falcon2-11b-like: new architecture with one layer norm, one KV head
    "new-arch-1ln": dict(new_decoder_architecture=True, num_kv_heads=1, multi_query=False, num_ln_in_parallel_attn=1),
    # falcon-7b: old multi-query layout, parallel attention, rotary
    "7b-multi-query": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
    # old full multi-head layout (interleaved qkv), sequential attention + MLP, rotary
    "mha-sequential": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False),
    # falcon-rw-1b: ALiBi, full multi-head, sequential, biases
    "rw-alibi": dict(new_decoder_architecture=False, multi_query=False, alibi=True, parallel_attn=False, bias=True),
    # ALiBi with the multi-query layout and parallel attention
    "alibi-multi-query": dict(new_decoder_architecture=False, multi_query=True, alibi=True, parallel_attn=True),
}


def reference_impl(variant: str) -> str:
    return "sdpa" if "alibi" in variant else "eager"


def falcon(variant: str) -> FalconForCausalLM:
    if DISPATCHES and "alibi" in variant:
        pytest.skip("ALiBi Falcon is refused on transformers >= 5.25 (test_flash2_falcon.py checks the refusal)")
    torch.manual_seed(0)
    cfg = FalconConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        attn_implementation=reference_impl(variant),
        pad_token_id=0,
        **VARIANTS[variant],
    )
    assert cfg.use_cache  # Falcon's default: a plain call fills a KV cache
    model = FalconForCausalLM(cfg).eval()
    model.generation_config.use_cache = True
    return model


def batch(pad: str, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 11, dtype=torch.long)
    if pad == "left":
        mask[0, :4] = 0
        mask[2, :1] = 0
    elif pad == "right":
        mask[0, 6:] = 0
        mask[1, 9:] = 0
    elif pad == "holes":  # not one contiguous run: fine without a sliding window
        mask[0, 3:5] = 0
        mask[2, :2] = 0
        mask[2, 6] = 0
    return ids[:rows], mask[:rows]


def patch(model, **kw) -> patchkit.PatchReport:
    return patchkit.apply(model, attention="flash2", backend="reference", **kw)


def close_on(mask: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want)[mask.bool()].abs().max().item()


def cache_of(out):
    """The KV cache of an output (``cache`` in transformers 5.24, ``past_key_values`` in 5.17)."""
    fields = getattr(out, "__dataclass_fields__", {})
    return getattr(out, "cache" if "cache" in fields else "past_key_values")


def assert_same_cache(got, want, mask) -> None:
    assert len(got.layers) == len(want.layers) > 0
    for g_layer, w_layer in zip(got.layers, want.layers, strict=True):
        for g, w in ((g_layer.keys, w_layer.keys), (g_layer.values, w_layer.values)):
            assert g.shape == w.shape  # [B, H, L, D], as the unpatched model writes it
            assert (g - w).abs().transpose(1, 2)[mask.bool()].max() <= TOL


class MLPInputs(TorchFunctionMode):
    """Shapes of what the first layer's MLP input projection multiplies (``FalconLinear`` computes
    ``input @ weight.T``; a module hook would itself switch padding-free off)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.weight = model.transformer.h[0].mlp.dense_h_to_4h.weight
        self.seen: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1]._base is self.weight:
            self.seen.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def call(model, ids, mask, how: str, **kw):
    """A plain call: ``config`` (no argument: the config's use_cache=True), ``empty-cache`` (an empty
    DynamicCache passed, as generate's prefill), ``no-cache`` (use_cache=False)."""
    if how == "empty-cache":
        kw["past_key_values"] = DynamicCache(config=model.config)
    elif how == "no-cache":
        kw["use_cache"] = False
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values -> cache (5.24)
        return model(ids, attention_mask=mask, **kw)


def loud(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, patchkit.PatchkitWarning)]


# -- plain calls and prefill -------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pad", ["left", "right", "holes"])
@pytest.mark.parametrize("how", ["config", "empty-cache", "no-cache"])
def test_plain_call_runs_padding_free_and_matches(variant, pad, how):
    model = falcon(variant)
    ids, mask = batch(pad)
    want = call(model, ids, mask, how)
    report = patch(model)
    assert any("padding-free on" in note for note in report.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", patchkit.PatchkitWarning)
        with MLPInputs(model) as recorder:
            got = call(model, ids, mask, how)
    assert recorder.seen == [(1, int(mask.sum()), 64)]  # no padding token reaches the MLP
    assert close_on(mask, got.logits, want.logits) <= TOL
    if how == "no-cache":
        assert cache_of(got) is None and cache_of(want) is None
        return
    assert_same_cache(cache_of(got), cache_of(want), mask)
    # a decode step continues from each cache alike (the patched step runs padded: one token per row)
    step = torch.randint(1, 97, (3, 1), generator=torch.Generator().manual_seed(11))
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    pos = (step_mask.sum(-1, keepdim=True) - 1) if pad == "left" else None
    with MLPInputs(model) as recorder:
        got_step = call(model, step, step_mask, "config", past_key_values=cache_of(got), position_ids=pos)
    assert recorder.seen == [(3, 1, 64)]
    patchkit.reverse(model)
    want_step = call(model, step, step_mask, "config", past_key_values=cache_of(want), position_ids=pos)
    assert (got_step.logits - want_step.logits).abs().max() <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("rows", [1, 3])
def test_generate_prefill_runs_padding_free_and_greedy_matches(variant, rows):
    model = falcon(variant)
    ids, mask = batch("left", rows)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, **kw)
    patch(model)
    with MLPInputs(model) as recorder:
        got = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)
    if bool(mask.all()):
        assert recorder.seen[0] == (rows, 11, 64)  # nothing to skip: the padded path
    else:
        assert recorder.seen[0] == (1, int(mask.sum()), 64)  # the prefill ran padding-free
    assert recorder.seen[1:] and all(shape[:2] == (rows, 1) for shape in recorder.seen[1:])


@pytest.mark.parametrize("variant", ["new-arch-gqa", "rw-alibi"])
def test_position_ids_as_generate_passes_them(variant):
    # generate's position ids (cumsum of the mask - 1, 1 on padding): packed as given, as Llama's path
    model = falcon(variant)
    ids, mask = batch("left")
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    want = call(model, ids, mask, "config", position_ids=pos)
    patch(model)
    with MLPInputs(model) as recorder:
        got = call(model, ids, mask, "config", position_ids=pos)
    assert recorder.seen == [(1, int(mask.sum()), 64)]
    assert close_on(mask, got.logits, want.logits) <= TOL
    assert_same_cache(cache_of(got), cache_of(want), mask)


def test_inputs_embeds_and_hidden_states():
    model = falcon("7b-multi-query")
    ids, mask = batch("right")
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        want = model(inputs_embeds=embeds, attention_mask=mask).logits
        want_hidden = model(ids, attention_mask=mask, output_hidden_states=True)
    patch(model)
    with torch.no_grad(), MLPInputs(model) as recorder:
        got = model(inputs_embeds=embeds, attention_mask=mask).logits
        got_hidden = model(ids, attention_mask=mask, output_hidden_states=True)  # padded: hidden states per layer
    assert recorder.seen == [(1, int(mask.sum()), 64), (3, 11, 64)]
    assert close_on(mask, got, want) <= TOL
    for g, w in zip(got_hidden.hidden_states, want_hidden.hidden_states, strict=True):
        assert close_on(mask, g, w) <= TOL


@pytest.mark.parametrize("variant", ["new-arch-gqa", "rw-alibi"])
def test_training_loss_and_grads_match(variant):
    model = falcon(variant).train()
    ids, mask = batch("right")
    labels = ids.masked_fill(mask == 0, -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_loss, want_grads = loss_and_grads()
    patch(model)
    with MLPInputs(model) as recorder:
        got_loss, got_grads = loss_and_grads()
    assert recorder.seen[0] == (1, int(mask.sum()), 64)
    assert abs(got_loss - want_loss) / abs(want_loss) <= 1e-4
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).norm() <= 1e-4 * grad.norm().clamp(min=1e-12), name


# -- the host builds no tokens x tokens mask; its config is left as it was ------------------------
def test_packed_call_builds_no_host_mask_and_restores_the_config(monkeypatch):
    if DISPATCHES:
        return _packed_call_builds_no_host_mask_routed(monkeypatch)
    model = falcon("rw-alibi")  # ALiBi: the host would fold alibi into a [1, H, tokens, tokens] mask
    ids, mask = batch("left")
    config, impl = model.config, model.config._attn_implementation
    sizes: list[tuple[int, ...]] = []
    previous = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[impl]

    def recording(*args, **kwargs):
        out = previous(*args, **kwargs)
        sizes.append(tuple(out.shape) if out is not None else ())
        return out

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, impl, recording)
    want = call(model, ids, mask, "config")
    assert sizes == [(3, 1, 11, 11)]  # sanity: the unpatched call builds its 4D mask through the interface
    patch(model)
    sizes.clear()
    got = call(model, ids, mask, "config")
    assert sizes == []  # padding-free: no mask built for the packed row
    assert close_on(mask, got.logits, want.logits) <= TOL
    assert model.transformer.config is config and model.config is config
    assert config._attn_implementation == impl and type(config._attn_implementation) is str
    call(model, ids, mask, "config", output_hidden_states=True)  # a padded call still gets the host's mask
    assert sizes == [(3, 1, 11, 11)]

    # an exception inside the packed call puts the config back too
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model.transformer.h[1].mlp, "forward", boom)  # (not a hook: those run padded)
    with pytest.raises(RuntimeError, match="boom"):
        call(model, ids, mask, "config")
    assert model.transformer.config is config and config._attn_implementation == impl


def _packed_call_builds_no_host_mask_routed(monkeypatch):
    """transformers >= 5.25: the config is routed through "patchkit" while patched (no one-call view);
    inside a patched forward patchkit's mask function answers without building a dense mask."""
    model = falcon("new-arch-gqa")
    ids, mask = batch("left")
    config, impl = model.config, model.config._attn_implementation
    sizes: list[tuple[int, ...]] = []
    previous = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[impl]

    def recording(*args, **kwargs):
        out = previous(*args, **kwargs)
        sizes.append(tuple(out.shape) if out is not None else ())
        return out

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, impl, recording)
    want = call(model, ids, mask, "config")
    assert sizes == [(3, 1, 11, 11)]  # sanity: the unpatched call builds its 4D mask through the interface
    patch(model)
    assert config._attn_implementation == "patchkit"
    sizes.clear()
    got = call(model, ids, mask, "config")
    padded = call(model, ids, mask, "config", output_hidden_states=True)  # padded: the 2D mask, no 4D one
    assert sizes == []
    assert close_on(mask, got.logits, want.logits) <= TOL
    assert close_on(mask, padded.logits, want.logits) <= TOL
    assert model.transformer.config is config and model.config is config

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model.transformer.h[1].mlp, "forward", boom)  # (not a hook: those run padded)
    with pytest.raises(RuntimeError, match="boom"):
        call(model, ids, mask, "config")
    assert model.transformer.config is config and config._attn_implementation == "patchkit"
    monkeypatch.undo()
    patchkit.reverse(model)
    assert config._attn_implementation == impl and type(config._attn_implementation) is str


def test_other_falcon_sharing_the_config_is_untouched():
    a = falcon("7b-multi-query")
    b = FalconForCausalLM(a.config).eval()  # same config object
    b.load_state_dict(a.state_dict())
    ids, mask = batch("left")
    want = call(b, ids, mask, "config").logits
    patch(a)
    # up to 5.24 Falcon's config is not switched; from 5.25 it is routed (b's modules carry no kernel)
    assert a.config._attn_implementation == ("patchkit" if DISPATCHES else "eager")
    assert close_on(mask, call(a, ids, mask, "config").logits, want) <= TOL
    assert torch.equal(call(b, ids, mask, "config").logits, want)
    assert type(b.transformer.h[0].self_attention).__name__ == "FalconAttention"


# -- fallbacks: loud, once per model and reason ----------------------------------------------------
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


@pytest.mark.parametrize("when", ["before-apply", "after-apply"])
@pytest.mark.parametrize("kind", ["layer-forward", "attention-pre", "global"])
def test_hooks_see_padded_tensors_or_call_runs_padded(when, kind):
    model = falcon("new-arch-gqa")
    ids, mask = batch("holes")
    layer = model.transformer.h[1]

    def register():
        if kind == "layer-forward":
            return layer.register_forward_hook(_zero_first_position)
        if kind == "attention-pre":
            return layer.self_attention.register_forward_pre_hook(_scale_pre)
        return torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: _zero_first_position(m, i, o) if m is layer else None
        )

    SHAPES.clear()
    handle = register()
    try:
        want = call(model, ids, mask, "config")
        want_shapes = list(SHAPES)
        if when == "after-apply":
            handle.remove()
        patch(model)
        if when == "after-apply":
            handle = register()
        SHAPES.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = call(model, ids, mask, "config")
            again = call(model, ids, mask, "config")
        assert SHAPES == want_shapes * 2 == [(3, 11, 64)] * 2
        assert close_on(mask, got.logits, want.logits) <= TOL
        assert close_on(mask, again.logits, want.logits) <= TOL
        assert_same_cache(cache_of(got), cache_of(want), mask)
        messages = loud(caught)
        assert len(messages) == 1 and "hook" in messages[0]
    finally:
        handle.remove()
    with warnings.catch_warnings(), MLPInputs(model) as recorder:  # hook gone: padding-free again, silently
        warnings.simplefilter("error", patchkit.PatchkitWarning)
        call(model, ids, mask, "config")
    assert recorder.seen == [(1, int(mask.sum()), 64)]


def test_unpatched_layer_runs_padded_with_one_warning():
    model = falcon("new-arch-gqa")
    ids, mask = batch("left")
    want = call(model, ids, mask, "config")
    report = patch(model, skip=["transformer.h.1"])
    assert [s.paths for s in report.swaps] == [["transformer.h.0.self_attention"]]
    assert any("padding-free off" in note and "h.1.self_attention" in note for note in report.notes)
    with warnings.catch_warnings(record=True) as caught, MLPInputs(model) as recorder:
        warnings.simplefilter("always")
        got = call(model, ids, mask, "config")
        call(model, ids, mask, "no-cache")
    assert recorder.seen == [(3, 11, 64)] * 2
    assert close_on(mask, got.logits, want.logits) <= TOL
    assert_same_cache(cache_of(got), cache_of(want), mask)
    messages = loud(caught)
    assert len(messages) == 1 and "not patched" in messages[0]


def test_padding_free_false_runs_padded_silently_and_reverse_restores():
    model = falcon("7b-multi-query")
    before = snapshot(model)
    ids, mask = batch("left")
    want = call(model, ids, mask, "config")
    report = patch(model, padding_free=False)
    assert any("padding-free off" in note for note in report.notes)
    with warnings.catch_warnings(), MLPInputs(model) as recorder:
        warnings.simplefilter("error", patchkit.PatchkitWarning)
        got = call(model, ids, mask, "config")
    assert recorder.seen == [(3, 11, 64)]
    assert close_on(mask, got.logits, want.logits) <= TOL
    patchkit.reverse(model)
    assert snapshot(model) == before and "forward" not in model.transformer.__dict__


def test_compiled_padding_free_matches_and_does_not_recompile_per_call():
    # the one-call config view is a new object per call: it must not cost a recompilation per call
    from torch._dynamo.utils import counters

    model = falcon("new-arch-gqa")
    ids, mask = batch("left")
    want = call(model, ids, mask, "config").logits
    patch(model)
    compiled = torch.compile(model, backend="aot_eager")
    other = mask.clone()
    other[1, :2] = 0
    with torch.no_grad():
        # two token counts (dynamo marks the packed length dynamic), then the first mask again on other
        # ids: same lengths (the reference kernel specializes on them), a new config view
        compiled(ids.flip(0), attention_mask=mask)
        compiled(ids, attention_mask=other)
        graphs = counters["stats"]["unique_graphs"]
        got = compiled(ids, attention_mask=mask).logits
    assert counters["stats"]["unique_graphs"] == graphs
    assert close_on(mask, got, want) <= TOL
    impl = "patchkit" if DISPATCHES else "eager"  # routed while patched from 5.25
    assert model.transformer.config is model.config and model.config._attn_implementation == impl
