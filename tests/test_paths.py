"""The per-call path choice (issue 20): packed (padding-free) or the original's own path.

Both paths give the unpatched model's outputs (compared with transformers' SDPA, no mocks); the
automatic choice switches in both directions on one patched model as a batch's padding crosses
the cost model's threshold between calls; decode steps take the original path; forcing works
through the ``path=`` option and ``PATCHKIT_PATH``.
"""

from __future__ import annotations

import math

import pytest
import torch

import patchkit
from patchkit.paths import CallFacts, PathLog, log_of, requested

transformers = pytest.importorskip("transformers")

from patchkit_flash2 import paths as flash2_paths  # noqa: E402
from patchkit_sdpa import _paths as sdpa_paths  # noqa: E402


@pytest.fixture(autouse=True)
def _auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATCHKIT_PATH", raising=False)  # conftest forces "packed" for the rest of the suite


def _mask(batch: int, length: int, padded: int, left: bool = False) -> torch.Tensor:
    """A ``[batch, length]`` mask with ``padded`` padding slots spread over the rows (right padding)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(padded):
        row, k = i % batch, i // batch + 1
        if left:
            mask[row, k - 1] = 0
        else:
            mask[row, length - k] = 0
    return mask


def _crossing(batch: int, length: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two masks of one shape: padding just below ``threshold``, and at or just above it."""
    slots = batch * length
    above = math.ceil(threshold * slots)
    return _mask(batch, length, max(above - 1, 0)), _mask(batch, length, above)


def _valid(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b)[mask.bool()].abs().max())


# -- the cost models are pure functions over known facts --------------------------------------
def test_cost_models_are_pure_functions_of_the_facts() -> None:
    small = CallFacts(tokens=16, slots=16, batch=1, length=16)
    few = CallFacts(tokens=11, slots=16, batch=1, length=16)  # 30% padding but 5 slots: not worth packing
    assert few.padded_slots == 5
    assert sdpa_paths.choose_encoder_path(few)[0] == "original"
    padded = CallFacts(tokens=700, slots=1024, batch=4, length=256)
    assert sdpa_paths.choose_encoder_path(small)[0] == "original"
    assert sdpa_paths.choose_encoder_path(padded)[0] == "packed"
    big = CallFacts(tokens=8192, slots=8192, batch=32, length=256)
    assert sdpa_paths.choose_encoder_path(big)[0] == "packed"  # fused GEMMs win without padding on CPU
    decode = CallFacts(tokens=4, slots=4, batch=4, length=1, cached=True)
    assert sdpa_paths.choose_opt_path(decode)[0] == "original"
    assert flash2_paths.choose_flash2_path(decode, packable=False)[0] == "original"
    assert flash2_paths.choose_flash2_path(padded, packable=True)[0] == "packed"
    assert flash2_paths.choose_flash2_path(padded, packable=False)[0] == "original"
    assert flash2_paths.choose_flash2_path(few, packable=True)[0] == "original"  # 5 padded slots
    gpu = CallFacts(tokens=100_000, slots=200_000, batch=64, length=3125, device="cuda")
    assert flash2_paths.choose_flash2_path(gpu, packable=True)[0] == "packed"
    compiled = CallFacts(tokens=100_000, slots=200_000, batch=64, length=3125, device="cuda", compiling=True)
    assert flash2_paths.choose_flash2_path(compiled, packable=True)[0] == "original"
    assert sdpa_paths.choose_encoder_path(compiled)[0] == "original"
    compiled_cpu = CallFacts(tokens=700, slots=1024, batch=4, length=256, compiling=True)
    assert sdpa_paths.choose_opt_path(compiled_cpu)[0] == "original"  # compiled packed OPT lost on the CPU
    assert sdpa_paths.choose_encoder_path(compiled_cpu)[0] == "packed"  # compiled packed BERT won there
    tiny_gpu = CallFacts(tokens=10, slots=20, batch=1, length=20, device="cuda")
    assert sdpa_paths.choose_encoder_path(tiny_gpu)[0] == "original"  # launch-bound


def test_requested_reads_option_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert requested(None) == "auto"
    assert requested("original") == "original"
    monkeypatch.setenv("PATCHKIT_PATH", "packed")
    assert requested(None) == "packed"
    assert requested("auto") == "packed"
    assert requested("original") == "original"  # the apply option wins
    monkeypatch.setenv("PATCHKIT_PATH", "fast")
    with pytest.raises(ValueError, match="PATCHKIT_PATH|path="):
        requested(None)
    log = PathLog()
    log.record("packed", "x")
    assert log.counts == {"packed": 1, "original": 0} and log.last == "packed"


# -- BERT encoder ---------------------------------------------------------------------------------
def _bert() -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99
    )
    cfg._attn_implementation = "sdpa"
    ref = BertModel(cfg, add_pooling_layer=False).eval()
    model = BertModel(cfg, add_pooling_layer=False).eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


def test_bert_switches_both_ways_as_padding_crosses_the_threshold() -> None:
    ref, model = _bert()
    report = patchkit.apply(model, attention="sdpa")
    assert "path per call" in str(report)
    batch, length = 4, 50  # 200 tokens: under the unpadded-token threshold, so padding decides
    assert batch * length < sdpa_paths.ENCODER_CPU_MIN_TOKENS_UNPADDED
    # the padded slots from which packing pays: the fraction threshold, and a minimum count of slots
    need = max(math.ceil(sdpa_paths.ENCODER_CPU_MIN_PADDING * batch * length), sdpa_paths.ENCODER_CPU_MIN_PADDED_SLOTS)
    below, above = _mask(batch, length, need - 1), _mask(batch, length, need)
    ids = torch.randint(0, 99, (batch, length))
    log = log_of(model.encoder)
    assert log is not None
    with torch.no_grad():
        for mask, path in ((below, "original"), (above, "packed"), (below, "original")):
            out = model(ids, attention_mask=mask).last_hidden_state
            assert log.last == path, log.reason
            assert _valid(out, ref(ids, attention_mask=mask).last_hidden_state, mask) <= 1e-5
    assert log.counts == {"packed": 1, "original": 2}
    patchkit.reverse(model)


@pytest.mark.parametrize("forced", ["packed", "original"])
def test_bert_forced_paths_equal_the_unpatched_model(forced: str) -> None:
    ref, model = _bert()
    patchkit.apply(model, attention="sdpa", path=forced)
    ids = torch.randint(0, 99, (3, 20))
    with torch.no_grad():
        for mask in (torch.ones(3, 20, dtype=torch.long), _mask(3, 20, 17)):
            out = model(ids, attention_mask=mask).last_hidden_state
            assert _valid(out, ref(ids, attention_mask=mask).last_hidden_state, mask) <= 1e-5
    log = log_of(model.encoder)
    assert log is not None and log.counts[forced] == 2 and log.reason == "forced"


def test_environment_forces_a_path_between_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, model = _bert()
    patchkit.apply(model, attention="sdpa")
    ids, mask = torch.randint(0, 99, (2, 16)), _mask(2, 16, 10)
    log = log_of(model.encoder)
    assert log is not None
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).last_hidden_state
        for forced in ("original", "packed"):
            monkeypatch.setenv("PATCHKIT_PATH", forced)
            assert _valid(model(ids, attention_mask=mask).last_hidden_state, expected, mask) <= 1e-5
            assert log.last == forced


def test_unknown_path_option_is_refused() -> None:
    _, model = _bert()
    with pytest.raises(ValueError, match="path="):
        patchkit.apply(model, attention="sdpa", path="fastest")
    assert type(model.encoder).__name__ == "BertEncoder"  # nothing changed


# -- OPT decoder ----------------------------------------------------------------------------------
def _opt() -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        vocab_size=99,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
    )
    cfg._attn_implementation = "sdpa"
    ref = OPTForCausalLM(cfg).eval()
    model = OPTForCausalLM(cfg).eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


def test_opt_switches_both_ways_and_decode_steps_run_the_original() -> None:
    ref, model = _opt()
    patchkit.apply(model, attention="sdpa")
    decoder = model.model.decoder
    log = log_of(decoder)
    assert log is not None
    batch, length = 2, 32
    below, above = _crossing(batch, length, sdpa_paths.OPT_CPU_MIN_PADDING)
    ids = torch.randint(0, 99, (batch, length))
    with torch.no_grad():
        for mask, path in ((above, "packed"), (below, "original"), (above, "packed")):
            logits = model(ids, attention_mask=mask, use_cache=False).logits
            assert log.last == path, log.reason
            assert _valid(logits, ref(ids, attention_mask=mask, use_cache=False).logits, mask) <= 1e-5
        log.reset()
        left = _mask(batch, length, 20, left=True)
        kw = dict(attention_mask=left, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        tokens = model.generate(ids, **kw)
        assert torch.equal(tokens, ref.generate(ids, **kw))
    assert log.counts == {"packed": 1, "original": 4}  # the prefill packed, four decode steps original
    patchkit.reverse(model)
    assert log_of(decoder) is None


@pytest.mark.parametrize("forced", ["packed", "original"])
def test_opt_forced_paths_generate_the_same_tokens(forced: str) -> None:
    ref, model = _opt()
    patchkit.apply(model, attention="sdpa", path=forced)
    ids, mask = torch.randint(0, 99, (3, 24)), _mask(3, 24, 20, left=True)
    kw = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
        logits = model(ids, attention_mask=mask).logits
        assert _valid(logits, ref(ids, attention_mask=mask).logits, mask) <= 1e-5


# -- flash2 (Llama) -------------------------------------------------------------------------------
def _llama() -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=99,
    )
    cfg._attn_implementation = "sdpa"
    ref = LlamaForCausalLM(cfg).eval()
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


def test_flash2_switches_both_ways_and_decode_steps_run_the_original() -> None:
    ref, model = _llama()
    report = patchkit.apply(model, attention="flash2", backend="reference")
    assert "path per call" in str(report)
    log = log_of(model.model)
    assert log is not None
    batch, length = 4, 100  # 5% of 400 slots = 20 padded slots: both thresholds cross together
    assert math.ceil(flash2_paths.CPU_MIN_PADDING * batch * length) >= flash2_paths.CPU_MIN_PADDED_SLOTS
    below, above = _crossing(batch, length, flash2_paths.CPU_MIN_PADDING)
    ids = torch.randint(0, 99, (batch, length))
    with torch.no_grad():
        for mask, path in ((below, "original"), (above, "packed"), (below, "original"), (above, "packed")):
            logits = model(ids, attention_mask=mask).logits
            assert log.last == path, log.reason
            assert _valid(logits, ref(ids, attention_mask=mask).logits, mask) <= 1e-5
        log.reset()
        left = _mask(batch, length, 30, left=True)
        kw = dict(attention_mask=left, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    assert log.counts == {"packed": 1, "original": 4}
    patchkit.reverse(model)
    assert log_of(model.model) is None
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("forced", ["packed", "original"])
def test_flash2_forced_paths_generate_the_same_tokens(forced: str) -> None:
    ref, model = _llama()
    patchkit.apply(model, attention="flash2", backend="reference", path=forced)
    ids, mask = torch.randint(0, 99, (3, 24)), _mask(3, 24, 25, left=True)
    kw = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
        logits = model(ids, attention_mask=mask).logits
        assert _valid(logits, ref(ids, attention_mask=mask).logits, mask) <= 1e-5
    log = log_of(model.model)
    assert log is not None and log.counts[forced] >= 5 and log.reason == "forced"


def test_flash2_packed_rows_keep_flash2_semantics() -> None:
    """Position ids restarting in one row without a mask mark packed sequences (transformers' FA2
    rule); the original path would attend across them, so such calls stay on flash2's path."""
    _, model = _llama()
    patchkit.apply(model, attention="flash2", backend="reference", path="original")
    ids = torch.randint(0, 99, (1, 10))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits
        first = model(ids[:, :4]).logits
        second = model(ids[:, 4:]).logits
    log = log_of(model.model)
    assert log is not None and log.counts["packed"] == 1
    assert float((packed - torch.cat([first, second], 1)).abs().max()) <= 1e-5
