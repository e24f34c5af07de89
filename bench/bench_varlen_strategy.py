"""Benchmark: the CPU fallback strategies of ``patchkit.varlen`` side by side with HF sdpa.

all-MiniLM-L6-v2 (real weights), 32 x 256, 45% padding, 2 threads; one process alternates HF sdpa,
patchkit with its CPU strategy (one in-place SDPA call per sequence) and patchkit with the grouped
masked grids (the strategy on GPUs without a varlen kernel). ``python bench/bench_varlen_strategy.py
[N]`` runs N competing busy processes during the timed runs (default 0: an idle machine).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src"), str(HERE.parent / "plugins")]

import bench_sdpa as bs  # noqa: E402
import torch  # noqa: E402

import patchkit  # noqa: E402
from patchkit import varlen  # noqa: E402


def main() -> None:
    from transformers import BertModel

    torch.set_num_threads(2)
    contend = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    path = bs.minilm_path()
    base = bs._ready(BertModel.from_pretrained(path, attn_implementation="sdpa"), "cpu", torch.float32)
    fast = bs._ready(BertModel.from_pretrained(path, attn_implementation="sdpa"), "cpu", torch.float32)
    patchkit.apply(fast, attention="sdpa")
    batch = bs._batch(32, 256, 0.45, base.config.vocab_size, "cpu")
    original = varlen.cpu_strategy

    def grids() -> None:
        varlen.cpu_strategy = lambda device, longest: False  # type: ignore[assignment]
        try:
            fast(**batch)
        finally:
            varlen.cpu_strategy = original

    fns = {"hf": lambda: base(**batch), "per_seq": lambda: fast(**batch), "grids": grids}
    ctx = bs.competing_processes(contend) if contend else contextlib.nullcontext()
    with ctx:
        med = bs._alternate(fns, 7, "cpu")  # interleaved medians, warm-up, inference mode
    print(
        f"competing processes {contend}: "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items())
        + f"; speed-up per-sequence {med['hf'] / med['per_seq']:.2f}x, grids {med['hf'] / med['grids']:.2f}x"
    )


if __name__ == "__main__":
    main()
