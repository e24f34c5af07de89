"""Where the time of a patched call goes: torch.profiler tables of patchkit next to the baseline.

Not a benchmark (bench_sdpa.py / bench_flash2.py give the ratios): a diagnostic for the GPU check,
so that one run on a lent GPU says *why* a ratio is what it is. For each case it records the
warnings patchkit emitted (a fallback is loud: this is where it shows), wall time with and without
waiting for the device (launch-bound vs kernel-bound), and the top operators by self CPU and
device time.

    python bench/profile_calls.py --small          # CPU dry run
    python bench/gpu_check.py --only profile_calls # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_sdpa import _sync  # noqa: E402  (bench/ on sys.path, as the GPU check runs it)


def _times(fn: Callable[[], Any], device: str, runs: int) -> dict[str, float]:
    """Median ms per call, synchronized (what the call costs) and host-only (time until it returns)."""
    synced, host = [], []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        _sync(device)
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        synced.append((t2 - t0) * 1e3)
    synced.sort()
    host.sort()
    return {"ms": round(synced[len(synced) // 2], 3), "host_ms": round(host[len(host) // 2], 3)}


def _profile(fn: Callable[[], Any], device: str, top: int) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    rows = []
    for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
        row = {"op": ev.key[:60], "calls": ev.count, "self_cpu_ms": round(ev.self_cpu_time_total / 1e3, 3)}
        dev = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if device == "cuda":
            row["self_dev_ms"] = round(dev / 1e3, 3)
        rows.append(row)
    return rows


def _compare(
    label: str, base: Callable[[], Any], fast: Callable[[], Any], device: str, runs: int, top: int
) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        fast()
        base()
        out: dict[str, Any] = {"case": label}
        out["base"] = _times(base, device, runs)
        out["patchkit"] = _times(fast, device, runs)
        out["speedup"] = round(out["base"]["ms"] / out["patchkit"]["ms"], 3)
        out["profile_patchkit"] = _profile(fast, device, top)
        out["profile_base"] = _profile(base, device, top)
    out["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught})
    return out


def run(small: bool, device: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    """The GPU cases whose ratios were off: BERT fastpath, OPT plain call, flash2 generate/decode."""
    import bench_flash2 as bf
    import bench_sdpa as bs
    from transformers import BertConfig, BertModel, LlamaForCausalLM

    import patchkit

    runs, top = (3, 8) if small else (10, 15)
    results = []
    dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if small else {}
    cfg = BertConfig(vocab_size=1000 if small else 30522, **dims)
    base, fast = bs._random_twins(BertModel, cfg, device, dtype)
    patchkit.apply(fast, attention="sdpa")
    b, t = (4, 32) if small else (64, 256)
    batch = bs._batch(b, t, 0.48, cfg.vocab_size, device)
    results.append(_compare(f"sdpa BERT {b}x{t} 48%", lambda: base(**batch), lambda: fast(**batch), device, runs, top))

    ob, of, _ = bs._opt_models(small, device, dtype)
    patchkit.apply(of, attention="sdpa")
    b, t = (4, 64) if small else (16, 512)
    batch = bs._batch(b, t, 0.45, ob.config.vocab_size, device)
    results.append(
        _compare(f"sdpa OPT {b}x{t} 45% plain call", lambda: ob(**batch), lambda: of(**batch), device, runs, top)
    )
    results.append(
        _compare(
            f"sdpa OPT {b}x{t} 45% use_cache=False",
            lambda: ob(**batch, use_cache=False),
            lambda: of(**batch, use_cache=False),
            device,
            runs,
            top,
        )
    )

    size = bf.SMALL_SIZE if small else dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=5632)
    llama_dtype = torch.bfloat16 if device == "cuda" else dtype  # as bench_flash2 (random-init fp16 overflows)
    sdpa, patched = bf.twin_models(size, device, llama_dtype, use_cache=True, cls=LlamaForCausalLM)
    patchkit.apply(patched, attention="flash2", backend="torch" if device == "cuda" else "reference")
    b, t = (4, 64) if small else (16, 1024)
    ids, mask = bf.left_padded_batch(b, t, 0.45, device)
    for new in (1, 8):
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        results.append(
            _compare(
                f"flash2 Llama generate {b}x{t} 45% left, {new} new",
                lambda kw=kw: sdpa.generate(ids, attention_mask=mask, **kw),
                lambda kw=kw: patched.generate(ids, attention_mask=mask, **kw),
                device,
                max(2, runs // 2),
                top,
            )
        )
    return results


def gpu_checks(small: bool) -> dict[str, Any]:
    """bench/gpu_check.py's entry: CUDA fp16/bf16 when a GPU is there, else (small) a CPU dry run."""
    cuda = torch.cuda.is_available()
    if not cuda and not small:
        return {"skipped": "no CUDA device"}
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "cases": run(small, device, dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    print(json.dumps(gpu_checks(args.small), indent=1))


if __name__ == "__main__":
    main()
