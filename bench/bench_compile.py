"""Benchmark: torch.compile of patched models vs torch.compile of the unpatched models.

One process; for each case the unpatched and the patched model (same weights) are compiled with
the same backend, warmed up, then timed alternately (base, patched, base, ...); medians and ratios
are reported, with eager timings of both for context. Not a test: it asserts nothing, it measures.

    python bench/bench_compile.py             # CPU, BERT (MiniLM shape) and a small Llama, inductor
    python bench/bench_compile.py --small     # tiny models, seconds
    python bench/bench_compile.py --backend aot_eager --out DIR

Cases: BERT encoder with attention="sdpa" (packed fastpath) vs HF sdpa; Llama with
attention="flash2" (backend "reference" on the CPU, "torch" on CUDA) vs HF sdpa. The patched
models graph-break where padding-free execution depends on the mask (see docs/distributed.md);
flash2 also recompiles per call until Dynamo's recompile limit, so it is warmed up past it.
``gpu_checks(small)`` runs the same comparison on CUDA in fp16/bf16 (small=True: a CPU dry run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# Inductor's parallel compile workers would compete with the timed runs for this machine's 2 cores.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

import patchkit  # noqa: E402


def _batch(batch: int, length: int, padding: float, vocab: int, device: str) -> dict[str, torch.Tensor]:
    """Right padding; row lengths spread evenly so the padded fraction is about ``padding``."""
    if padding > 0:
        lo = max(1.0, 2 * (1 - padding) * length - length)
        lens = torch.linspace(lo, length, batch).round().long()
    else:
        lens = torch.full((batch,), length)
    mask = torch.arange(length)[None] < lens[:, None]
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0)) * mask
    return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _alternate(fns: dict[str, Callable[[], Any]], runs: int, warmup: int, device: str) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(runs):
            for name, fn in fns.items():
                _sync(device)
                t = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _bert(small: bool, device: str, dtype: torch.dtype) -> tuple[Any, Any, dict[str, Any], int, Callable]:
    from transformers import BertConfig, BertModel

    size = (
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        if small
        else dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    )  # MiniLM-L6
    cfg = BertConfig(vocab_size=1000, max_position_embeddings=512, **size)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = BertModel(cfg).to(device, dtype).eval()
    patched = copy.deepcopy(base)
    patchkit.apply(patched, attention="sdpa")
    return base, patched, {}, 1000, lambda o: o.last_hidden_state


def _llama(small: bool, device: str, dtype: torch.dtype) -> tuple[Any, Any, dict[str, Any], int, Callable]:
    from transformers import LlamaConfig, LlamaModel

    size = (
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if small
        else dict(
            hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
        )
    )
    cfg = LlamaConfig(vocab_size=1000, use_cache=False, pad_token_id=0, attn_implementation="sdpa", **size)
    torch.manual_seed(0)
    base = LlamaModel(cfg).to(device, dtype).eval()
    patched = copy.deepcopy(base)
    backend = "torch" if device.startswith("cuda") else "reference"
    patchkit.apply(patched, attention="flash2", backend=backend)
    return base, patched, {"kernel": backend}, 1000, lambda o: o.last_hidden_state


CASES = {"bert-sdpa": _bert, "llama-flash2": _llama}


def run_case(
    name: str,
    small: bool,
    padding: float,
    backend: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    runs: int = 5,
) -> dict[str, Any]:
    """Time eager/compiled x unpatched/patched for one case; report medians, ratios and max |diff| (valid tokens)."""
    base, patched, extra, vocab, out = CASES[name](small, device, dtype)
    shape = (4, 32) if small else (16, 256)
    batch = _batch(*shape, padding, vocab, device)
    torch._dynamo.reset()
    # Per-call recompiles (flash2) stop at the recompile limit; warm up past it so timing sees steady state.
    warmup = torch._dynamo.config.recompile_limit + 2
    c_base = torch.compile(base, backend=backend)
    c_patched = torch.compile(patched, backend=backend)
    t = time.perf_counter()
    with torch.inference_mode():
        c_base(**batch)
    compile_base = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        c_patched(**batch)
    compile_patched = time.perf_counter() - t
    fns = {
        "eager_base": lambda: base(**batch),
        "eager_patched": lambda: patched(**batch),
        "compiled_base": lambda: c_base(**batch),
        "compiled_patched": lambda: c_patched(**batch),
    }
    med = _alternate(fns, runs, warmup, device)
    with torch.inference_mode():
        valid = batch["attention_mask"].bool()
        diff = (out(c_patched(**batch)).float() - out(base(**batch)).float())[valid].abs().max().item()
    return {
        "case": name,
        "backend": backend,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": list(shape),
        "padding": padding,
        **extra,
        "first_call_s": {"compiled_base": round(compile_base, 2), "compiled_patched": round(compile_patched, 2)},
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "compiled_patched_vs_compiled_base": round(med["compiled_base"] / med["compiled_patched"], 3),
        "compiled_patched_vs_eager_patched": round(med["eager_patched"] / med["compiled_patched"], 3),
        "max_abs_diff_valid": diff,
    }


def _table(results: list[dict[str, Any]]) -> str:
    head = "case           pad  eager base  eager patched  compiled base  compiled patched  speedup  diff"
    rows = [head]
    for r in results:
        m = r["median_s"]
        rows.append(
            f"{r['case']:<14} {r['padding']:.0%}  {m['eager_base']:>10.4f}  {m['eager_patched']:>13.4f}  "
            f"{m['compiled_base']:>13.4f}  {m['compiled_patched']:>16.4f}  "
            f"{r['compiled_patched_vs_compiled_base']:>6.2f}x  {r['max_abs_diff_valid']:.1e}"
        )
    return "\n".join(rows)


def gpu_checks(small: bool) -> dict[str, Any]:
    """Compiled patched vs compiled unpatched on CUDA (inductor; BERT fp16, Llama bf16); small=True: CPU dry run."""
    cuda = torch.cuda.is_available() and not small
    device = "cuda" if cuda else "cpu"
    results = []
    for name, dtype in (("bert-sdpa", torch.float16), ("llama-flash2", torch.bfloat16)):
        for padding in (0.0, 0.5):
            try:
                results.append(
                    run_case(
                        name,
                        small,
                        padding,
                        "inductor" if cuda else "aot_eager",
                        device,
                        dtype if cuda else torch.float32,
                        runs=5 if cuda else 2,
                    )
                )
            except Exception as exc:  # one failing case must not hide the others
                results.append({"case": name, "padding": padding, "error": f"{type(exc).__name__}: {exc}"})
    card = torch.cuda.get_device_name(0) if cuda else "CPU dry run"
    return {"card": card, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny models, a few seconds")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--which", choices=("all", *CASES), default="all")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_compile.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in CASES if args.which == "all" else (args.which,):
        for padding in (0.0, 0.4):
            results.append(run_case(name, args.small, padding, args.backend, runs=args.runs))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {args.threads} threads, backend={args.backend}")
    print(_table(results))
    if args.out:
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.out) / "bench_compile.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
