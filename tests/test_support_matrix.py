"""A sample of the support matrix in the main suite (CI walks all of it with tools/support_matrix.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import support_matrix  # noqa: E402

SAMPLE = [
    ("llama", "decoder", "exact"),
    ("mistral", "decoder", "exact"),
    ("falcon", "decoder", "exact"),
    ("gpt2", "decoder", "exact"),  # generic patcher, padded (positions are not position_ids-driven)
    ("qwen2", "decoder", "exact"),
    ("gemma2", "decoder", "exact"),  # soft-capped logits in the reference kernel
    ("phimoe", "decoder", "refused"),  # declared: its eager path ignores the sliding window
    ("lara_mini", "decoder", "refused"),  # hybrid: linear-attention layers
    ("bert", "encoder", "exact"),
    ("distilbert", "encoder", "exact"),
    ("xlm-roberta-xl", "encoder", "exact"),
    ("mpnet", "encoder", "exact"),  # dedicated patcher: relative position bias per sequence
    ("modernbert", "encoder", "exact"),  # generic encoder: rotary, local/global alternation
    ("gte", "encoder", "exact"),  # generic encoder, base-model mode (rotary)
    ("deberta-v2", "encoder", "exact"),  # split encoder: disentangled attention
    ("bart", "encoder", "refused"),  # positions from the sequence length
]


@pytest.mark.parametrize(("arch", "kind", "expected"), SAMPLE)
def test_sample_architecture_is_exact_or_refused_never_wrong(arch: str, kind: str, expected: str) -> None:
    row = support_matrix.check(arch, kind)
    assert row.status == expected, row
    if row.status == "exact":
        assert row.max_diff is not None and row.max_diff <= support_matrix.TOLERANCE
        assert kind == "encoder" or row.generate_equal
    else:
        assert row.reason  # a refusal always says why


def test_checked_in_matrix_lists_the_sample_with_the_same_status() -> None:
    text = (ROOT / "docs" / "support.md").read_text()
    rows = {(r[0], r[1]): r[2] for r in support_matrix._comparable(text)}
    for arch, kind, expected in SAMPLE:
        assert rows.get((arch, kind)) == expected, (arch, kind)
    assert "WRONG" not in rows.values()
