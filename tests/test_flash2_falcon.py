"""flash2 on Falcon: three fused-qkv layouts, rotary, ALiBi.

Up to transformers 5.24 each attention module is replaced by a parameter-sharing subclass; from 5.25
(``FalconAttention`` dispatches through the attention interface) it stays in place and the config is
routed through ``"patchkit"``, and ALiBi is refused (``DISPATCHES`` below, read off transformers).

Reference for rotary models: transformers' eager attention. Reference for ALiBi (falcon-rw):
transformers' *sdpa* path, which computes ``softmax((q.k + alibi) / sqrt(d))`` as falcon-rw was
trained; the eager ALiBi branch of transformers 5.17-5.24 adds ALiBi twice (see docs/patchers/flash2.md),
and the test below pins that difference (and 5.25's fix) so the choice stays visible.
"""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot
from transformers import FalconConfig, FalconForCausalLM
from transformers.models.falcon import modeling_falcon

import patchkit
from patchkit import UnsupportedError

TOL = 1e-5
# transformers >= 5.25: FalconAttention hands q/k/v to ALL_ATTENTION_FUNCTIONS (no per-class table)
DISPATCHES = not hasattr(modeling_falcon, "FALCON_ATTENTION_CLASSES")
ALIBI_REFUSED = "is not supported by flash2 on transformers"

LAYOUTS = {
    "new-arch-gqa": dict(new_decoder_architecture=True, num_kv_heads=2, multi_query=False),
    "multi-query": dict(new_decoder_architecture=False, multi_query=True),
    "full-mha": dict(new_decoder_architecture=False, multi_query=False),
    "alibi-rw": dict(new_decoder_architecture=False, multi_query=False, alibi=True, parallel_attn=False, bias=True),
}


def falcon(layout: str, impl: str = "eager") -> FalconForCausalLM:
    torch.manual_seed(0)
    cfg = FalconConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        attn_implementation=impl,
        use_cache=False,
        pad_token_id=0,
        **LAYOUTS[layout],
    )
    return FalconForCausalLM(cfg).eval()


def reference(layout: str) -> FalconForCausalLM:
    return falcon(layout, impl="sdpa" if "alibi" in layout else "eager")


def batch(pad: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.long)
    if pad == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    elif pad == "right":
        mask[0, 7:] = 0
        mask[2, 4:] = 0
    return ids, mask


def logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kw).logits


def max_diff(mask, got, want) -> float:
    return (got - want)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("pad", ["left", "right", "full"])
def test_matches_reference(layout, pad):
    ids, mask = batch(pad)
    want = logits(reference(layout), ids, mask)
    model = falcon(layout)
    original = model.transformer.h[0].self_attention
    if DISPATCHES and "alibi" in layout:
        with pytest.raises(UnsupportedError, match=ALIBI_REFUSED):
            patchkit.apply(model, attention="flash2", backend="reference")
        assert not patchkit.is_patched(model) and model.transformer.h[0].self_attention is original
        return
    patchkit.apply(model, attention="flash2", backend="reference")
    attn = model.transformer.h[0].self_attention
    if DISPATCHES:  # in place, routed through the config
        assert attn is original and model.config._attn_implementation == "patchkit"
    else:
        assert isinstance(attn, type(reference(layout).transformer.h[0].self_attention))  # a subclass of the original
    assert max_diff(mask, logits(model, ids, mask), want) <= TOL


def test_eager_alibi_path_differs_from_reference():
    ids, mask = batch("left")
    eager, sdpa = falcon("alibi-rw", "eager"), falcon("alibi-rw", "sdpa")
    diff = max_diff(mask, logits(eager, ids, mask), logits(sdpa, ids, mask))
    if DISPATCHES:  # 5.25 adds ALiBi once on both paths
        assert diff <= TOL
    else:
        assert diff > 1e-3


def test_alibi_refused_on_dispatching_releases_and_not_taken_by_another_patcher():
    if not DISPATCHES:
        pytest.skip("transformers <= 5.24: ALiBi Falcon is patched (test_matches_reference)")
    import transformers

    model = falcon("alibi-rw")
    ids, mask = batch("left")
    want = logits(model, ids, mask)
    with pytest.raises(UnsupportedError, match=ALIBI_REFUSED) as err:
        patchkit.apply(model, attention="flash2", backend="reference")
    assert transformers.__version__ in str(err.value) and "strict=False" in str(err.value)
    with pytest.warns(patchkit.PatchkitWarning, match=ALIBI_REFUSED) as caught:
        report = patchkit.apply(model, attention="flash2", backend="reference", strict=False)
    assert not any("flash2-generic" in str(w.message) for w in caught)  # Falcon's refusal stands alone
    assert report.swaps == [] and not patchkit.is_patched(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(logits(model, ids, mask), want)


@pytest.mark.parametrize("layout", ["new-arch-gqa", "alibi-rw"])
def test_generate_greedy_matches(layout):
    ids, mask = batch("left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
    want = reference(layout).generate(ids, attention_mask=mask, **kw)
    model = falcon(layout)
    if DISPATCHES and "alibi" in layout:
        pytest.skip("ALiBi Falcon is refused on transformers >= 5.25 (test_alibi_refused_...)")
    patchkit.apply(model, attention="flash2", backend="reference")
    assert torch.equal(model.generate(ids, attention_mask=mask, **kw), want)
    assert torch.equal(model.generate(ids[:1], attention_mask=mask[:1], **kw), want[:1, : want.shape[1]])


def test_alibi_refused_by_kernel_without_slopes():
    model = falcon("alibi-rw").to(torch.bfloat16)
    with pytest.raises(UnsupportedError, match="ALiBi") as err:
        patchkit.apply(model, attention="flash2", backend="torch")
    if DISPATCHES:
        assert ALIBI_REFUSED in str(err.value)
    else:
        assert "does not support alibi" in str(err.value) and "backend='reference'" in str(err.value)
    assert not patchkit.is_patched(model)


def test_shares_parameters_training_and_reverse():
    model = falcon("new-arch-gqa").train()
    ids, mask = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad()
    want = model(ids, attention_mask=mask, labels=labels).loss
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    before = snapshot(model)
    original = model.transformer.h[0].self_attention
    patchkit.apply(model, attention="flash2", backend="reference")
    patched = model.transformer.h[0].self_attention
    assert (patched is original) == DISPATCHES  # replaced up to 5.24, in place from 5.25
    assert patched.query_key_value.weight is original.query_key_value.weight
    model.zero_grad()
    got = model(ids, attention_mask=mask, labels=labels).loss
    got.backward()
    assert abs(got - want) / abs(want) <= 1e-4
    for p, g in zip(model.parameters(), want_grads, strict=True):
        assert (p.grad - g).norm() <= 1e-4 * g.norm().clamp(min=1e-12)
    with pytest.raises(UnsupportedError, match="attention weights"):
        model(ids, attention_mask=mask, output_attentions=True)
    model.zero_grad(set_to_none=True)
    patchkit.reverse(model)
    assert model.transformer.h[0].self_attention is original
    assert snapshot(model) == before


def test_other_falcon_untouched():
    a, b = falcon("multi-query"), falcon("multi-query")
    ids, mask = batch("left")
    want = logits(b, ids, mask)
    patchkit.apply(a, attention="flash2", backend="reference")
    assert type(b.transformer.h[0].self_attention).__name__ == "FalconAttention"
    assert b.config._attn_implementation == "eager"
    assert torch.equal(logits(b, ids, mask), want)
