"""Benchmark (issue 21): padding-free MPNet-base and ModernBERT-base shaped encoders vs transformers.

Random init from base-sized configs (nothing downloaded), batch 32 x 256, 40% and 0% padding. One
process, both models (same weights) side by side, runs alternate (baseline, patched, ...),
medians and ratios reported. The baseline is transformers' fastest implementation for the
architecture: ``sdpa`` for ModernBERT; MPNet has no sdpa in transformers, so its baseline is eager.

    python bench/bench_encoders.py                 # the issue's sizes (several minutes on 2 cores)
    python bench/bench_encoders.py --small         # a quick dry run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sdpa import _batch  # noqa: E402


def _models(small: bool) -> dict[str, tuple[Any, str]]:
    from transformers import ModernBertConfig, MPNetConfig

    layers = 2 if small else None
    mpnet = MPNetConfig(vocab_size=30527, hidden_size=768, num_hidden_layers=layers or 12, num_attention_heads=12)
    modern = ModernBertConfig(
        vocab_size=50368,
        hidden_size=768,
        intermediate_size=1152,
        num_hidden_layers=layers or 22,
        num_attention_heads=12,
    )
    return {"mpnet-base": (mpnet, "eager"), "modernbert-base": (modern, "sdpa")}


def _time(model: Any, batch: dict[str, Any]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**batch)
    return time.perf_counter() - start


def main() -> None:
    """Print baseline / patched medians and ratios."""
    import patchkit

    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch_size, length = (4, 64) if args.small else (32, 256)
    for name, (config, impl) in _models(args.small).items():
        torch.manual_seed(0)
        from transformers import AutoModel

        base = AutoModel.from_config(config, attn_implementation=impl).eval()
        patched = copy.deepcopy(base)
        patchkit.apply(patched, attention="sdpa")
        for padding in (0.4, 0.0):
            batch = _batch(batch_size, length, padding, config.vocab_size, "cpu")
            with torch.no_grad():
                ref = base(**batch).last_hidden_state
                out = patched(**batch).last_hidden_state
            valid = batch["attention_mask"].bool()
            diff = float((out[valid] - ref[valid]).abs().max())
            times: dict[str, list[float]] = {"base": [], "patched": []}
            for _ in range(args.repeats):
                times["base"].append(_time(base, batch))
                times["patched"].append(_time(patched, batch))
            b, p = statistics.median(times["base"]), statistics.median(times["patched"])
            pad = 1 - float(valid.float().mean())
            print(
                f"{name:16} {batch_size}x{length} padding {pad:4.0%}: HF {impl} {b:7.3f}s  patchkit {p:7.3f}s  "
                f"ratio {b / p:5.2f}x  max|diff| {diff:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
