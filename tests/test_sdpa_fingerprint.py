"""The re-derived paths (sdpa BERT/OPT, flash2 Falcon) run only on transformers source they were checked on.

Each path records the sha256 of the source of the transformers methods it mirrors, per known-good
release. These tests run on the installed release (5.24, and 5.17 with ``PYTHONPATH=.tf517:...``).
"""

from __future__ import annotations

import copy
import warnings

import patchkit_flash2.falcon as flash2_falcon
import pytest
import torch
import transformers
from helpers import without_patchers
from patchkit_sdpa import bert, opt
from test_flash2_falcon import batch as falcon_batch
from test_flash2_falcon import falcon, logits, max_diff
from test_sdpa_bert import tiny_bert
from test_sdpa_opt import padded, tiny_opt, valid_diff
from transformers.models.falcon import modeling_falcon

import patchkit
from patchkit import toolkit

# The verified paths alone: without it the generic encoder takes what they refuse (running the model's own code).
VERIFIED = without_patchers("sdpa-generic-encoder")

PATHS = {
    "bert": (bert, lambda: bert.mirrored(bert._reference())),
    "opt": (opt, lambda: opt.mirrored(opt._reference())),
}


@pytest.mark.parametrize("name", list(PATHS))
def test_the_installed_release_is_a_recorded_known_good_one(name: str) -> None:
    module, functions = PATHS[name]
    assert transformers.__version__ in module.KNOWN_SOURCES, "record this release's fingerprint"
    assert toolkit.fingerprint(functions()) == module.KNOWN_SOURCES[transformers.__version__]


def test_falcon_fingerprint_is_recorded_for_the_installed_release() -> None:
    assert transformers.__version__ in flash2_falcon.KNOWN_SOURCES
    assert toolkit.fingerprint(flash2_falcon.mirrored()) == flash2_falcon.KNOWN_SOURCES[transformers.__version__]


def test_the_fingerprint_sees_source_changes() -> None:
    def forward(self, x):  # type: ignore[no-untyped-def]
        return x

    def forward2(self, x):  # type: ignore[no-untyped-def]
        return x  # a comment is a change too

    assert toolkit.fingerprint([forward]) != toolkit.fingerprint([forward2])


def _models(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    ref = tiny_bert("sdpa") if name == "bert" else tiny_opt("sdpa")
    return ref, copy.deepcopy(ref)


@pytest.mark.parametrize("name", list(PATHS))
def test_an_unknown_source_is_refused_warned_or_trusted(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module, _ = PATHS[name]
    # A release this code was never checked on: its fingerprint is not in the table.
    monkeypatch.setattr(module, "KNOWN_SOURCES", {"5.0.0": "0" * 64})
    monkeypatch.delenv(toolkit.TRUST_ENV, raising=False)
    ref, model = _models(name)
    with pytest.raises(patchkit.UnsupportedError, match="differs from the releases it was checked against"):
        patchkit.apply(model, attention="sdpa", registry=VERIFIED)
    assert not patchkit.is_patched(model)
    with pytest.warns(patchkit.PatchkitWarning, match="differs from the releases"):
        report = patchkit.apply(model, attention="sdpa", strict=False, registry=VERIFIED)
    assert report.swaps == []
    assert not patchkit.is_patched(model)  # a no-op apply leaves no trace
    # the user's explicit trust: an apply option, or the environment variable
    assert len(patchkit.apply(model, attention="sdpa", trust_transformers=True, registry=VERIFIED).swaps) == 1
    patchkit.reverse(model)
    monkeypatch.setenv(toolkit.TRUST_ENV, "1")
    assert len(patchkit.apply(model, attention="sdpa", registry=VERIFIED).swaps) == 1
    if name == "opt":
        ids, mask = padded("left")
        with torch.no_grad():
            assert (
                valid_diff(
                    model(input_ids=ids, attention_mask=mask).logits,
                    ref(input_ids=ids, attention_mask=mask).logits,
                    mask,
                )
                < 1e-5
            )


def test_falcon_unknown_source_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash2_falcon, "KNOWN_SOURCES", {"5.0.0": "0" * 64})
    monkeypatch.delenv(toolkit.TRUST_ENV, raising=False)
    model = falcon("new-arch-gqa")
    with pytest.raises(patchkit.UnsupportedError, match="differs from the releases it was checked against"):
        patchkit.apply(model, attention="flash2", backend="reference")
    assert not patchkit.is_patched(model)
    assert len(patchkit.apply(model, attention="flash2", backend="reference", trust_transformers=True).swaps) == 2


def test_falcon_unknown_layout_is_refused_even_when_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    # a FalconAttention that neither picks a class from FALCON_ATTENTION_CLASSES nor dispatches
    model = falcon("new-arch-gqa")
    for fn in (flash2_falcon.legacy, flash2_falcon.dispatching):
        fn.cache_clear()
    monkeypatch.delattr(modeling_falcon, "FALCON_ATTENTION_CLASSES", raising=False)
    monkeypatch.setattr(modeling_falcon.FalconAttention, "forward", MyFalconAttention.forward)
    try:
        with pytest.raises(patchkit.UnsupportedError, match="does not know the FalconAttention of transformers"):
            patchkit.apply(model, attention="flash2", backend="reference", trust_transformers=True)
        assert not patchkit.is_patched(model)
    finally:
        monkeypatch.undo()
        for fn in (flash2_falcon.legacy, flash2_falcon.dispatching):
            fn.cache_clear()


class MyFalconAttention(modeling_falcon.FalconAttention):
    """A user subclass with its own forward (here: attention output scaled by 0.5)."""

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out, weights = super().forward(*args, **kwargs)
        return out * 0.5, weights


def test_falcon_subclass_with_its_own_forward_is_never_replaced_silently() -> None:
    model = falcon("new-arch-gqa")
    layer = model.transformer.h[0]
    mine = MyFalconAttention.__new__(MyFalconAttention)
    mine.__dict__.update(layer.self_attention.__dict__)
    layer.self_attention = mine
    ids, mask = falcon_batch("left")
    want = logits(model, ids, mask)
    with pytest.raises(patchkit.UnsupportedError, match="has its own forward"):
        patchkit.apply(model, attention="flash2", backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = patchkit.apply(model, attention="flash2", backend="reference", strict=False)
    assert any(issubclass(w.category, patchkit.PatchkitWarning) for w in caught)
    assert model.transformer.h[0].self_attention is mine  # left alone
    assert len(report.swaps) == 1  # the other layer's plain FalconAttention
    assert max_diff(mask, logits(model, ids, mask), want) <= 1e-5  # the subclass's forward still runs
