"""The regime matrix (issue 20): every patched call at least as fast as the original.

    python bench/regimes.py                 # full CPU matrix (bert, opt, llama), ~10-20 min on 2 cores
    python bench/regimes.py --quick         # a smaller matrix, a few minutes
    python bench/regimes.py --issue         # only the issue's four cells, 7 alternating runs
    python bench/regimes.py --families llama --out DIR   # JSON too

For each family a fixed matrix: padding 0 / 10 / 30 / 50 %; batch 1 and 32; a short (16) and a
long (128; 256 for BERT) sequence; plain call, ``use_cache=False`` and ``generate`` with a short
(+4) and a long (+32) continuation (decoders); eager and compiled (inductor, plain call only).
Each cell runs, in one process and alternating, the unpatched model (transformers' SDPA) and the
patched model with ``PATCHKIT_PATH`` set per run to ``auto`` (the cost model) and ``packed`` (the
padding-free path every call could take before the cost model: what the code did before issue
20). Medians; ratio = HF time / patchkit time (> 1: patchkit faster). ``path`` is what the auto
runs took (``packed``, ``original``, or ``P+O`` counts for ``generate``: prefill and decode steps).
Outputs (valid tokens) and greedy tokens of the auto path are compared with HF in every cell.

Families: ``bert`` (all-MiniLM-L6-v2 real weights when the package is installed, else its shape,
``attention="sdpa"``), ``opt`` (OPT-125m width, 4 layers, full vocabulary, ``attention="sdpa"``),
``llama`` (hidden 768, 4 layers, 12 heads / 4 KV heads, vocabulary 32000, ``attention="flash2"``
with ``backend="reference"`` on the CPU, ``"auto"`` on CUDA). ``gpu_checks(small)`` runs the same
matrix on CUDA (fp16) for ``bench/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PADDINGS = (0.0, 0.1, 0.3, 0.5)
BATCHES = (1, 32)
MODES = ("plain", "no_cache", "gen_short", "gen_long")
NEW_TOKENS = {"gen_short": 4, "gen_long": 32}


@contextlib.contextmanager
def forced(path: str) -> Iterator[None]:
    """``PATCHKIT_PATH=path`` for the block (read by patched modules on every call)."""
    old = os.environ.get("PATCHKIT_PATH")
    os.environ["PATCHKIT_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATCHKIT_PATH", None)
        else:
            os.environ["PATCHKIT_PATH"] = old


def lengths(batch: int, length: int, padding: float) -> torch.Tensor:
    """Row lengths whose padding fraction is close to ``padding`` (batch 1: one shortened row)."""
    if padding <= 0:
        return torch.full((batch,), length, dtype=torch.long)
    if batch == 1:
        return torch.tensor([max(1, round((1 - padding) * length))])
    from bench_sdpa import _lengths

    return _lengths(batch, length, padding)


def make_batch(batch: int, length: int, padding: float, vocab: int, device: str, left: bool) -> dict[str, Any]:
    lens = lengths(batch, length, padding)
    ar = torch.arange(length)[None]
    mask = (ar >= length - lens[:, None]) if left else (ar < lens[:, None])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, length), generator=g) * mask + (~mask).long()
    return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- models -----------------------------------------------------------------------------------------
def _twins(cls: Any, cfg: Any, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base, fast = cls(cfg), cls(cfg)
    fast.load_state_dict(base.state_dict())
    return base.to(device=device, dtype=dtype).eval(), fast.to(device=device, dtype=dtype).eval()


def bert_models(small: bool, device: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    from bench_sdpa import _bert_models

    return _bert_models(small, device, dtype)


def opt_models(small: bool, device: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    from transformers import OPTConfig, OPTForCausalLM

    if small:
        cfg = OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=1000)
        name = "tiny OPT"
    else:
        cfg = OPTConfig(num_hidden_layers=4)  # OPT-125m width (768, 12 heads, ffn 3072), 4 layers, vocab 50272
        name = "OPT-125m width, 4 layers"
    cfg.word_embed_proj_dim = cfg.hidden_size
    base, fast = _twins(OPTForCausalLM, cfg, device, dtype)
    return base, fast, name


def opt125m_models(device: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    from transformers import OPTConfig, OPTForCausalLM

    base, fast = _twins(OPTForCausalLM, OPTConfig(), device, dtype)
    return base, fast, "OPT-125m shape"


def llama_models(small: bool, device: str, dtype: torch.dtype, layers: int = 4) -> tuple[Any, Any, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        cfg = LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000,
        )  # fmt: skip
        name = "tiny Llama"
    else:
        cfg = LlamaConfig(
            hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4,
            intermediate_size=3072, vocab_size=32000,
        )  # fmt: skip
        name = f"Llama 768 x {layers} (GQA 12/4)"
    base, fast = _twins(LlamaForCausalLM, cfg, device, dtype)
    return base, fast, name


def patch(family: str, model: Any, device: str) -> None:
    import patchkit

    if family == "llama":
        patchkit.apply(model, attention="flash2", backend="reference" if device == "cpu" else "auto")
    else:
        patchkit.apply(model, attention="sdpa")


def path_log(family: str, model: Any) -> Any:
    from patchkit.paths import log_of

    inner = {"bert": lambda m: m.encoder, "opt": lambda m: m.model.decoder, "llama": lambda m: m.model}[family](model)
    return log_of(getattr(inner, "_orig_mod", inner))


# -- one cell ---------------------------------------------------------------------------------------
def _call(mode: str, model: Any, batch: dict[str, Any]) -> Callable[[], Any]:
    if mode == "plain":
        return lambda: model(**batch)
    if mode == "no_cache":
        return lambda: model(**batch, use_cache=False)
    n = NEW_TOKENS[mode]
    return lambda: model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def _out(result: Any) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    return result.logits if getattr(result, "logits", None) is not None else result.last_hidden_state


def run_cell(
    family: str,
    base: Any,
    fast: Any,
    mode: str,
    batch_size: int,
    length: int,
    padding: float,
    runs: int,
    device: str,
    compiled: tuple[Any, Any] | None = None,
    variants: tuple[str, ...] = ("auto", "packed"),
) -> dict[str, Any]:
    """Median seconds of HF and of the patched model per forced path, alternating; path counts of auto."""
    vocab = base.config.vocab_size
    batch = make_batch(batch_size, length, padding, vocab, device, left=mode.startswith("gen"))
    hf_model, pk_model = compiled if compiled is not None else (base, fast)
    fns = {"hf": _call(mode, hf_model, batch), **{v: _call(mode, pk_model, batch) for v in variants}}
    log = path_log(family, fast)
    times: dict[str, list[float]] = {k: [] for k in fns}
    counts = {"packed": 0, "original": 0}
    check: dict[str, Any] = {}
    with torch.inference_mode():
        for name, fn in fns.items():  # warm-up (and compile); the outputs are compared
            with forced(name if name != "hf" else "auto"):
                check[name] = fn()
        start, done = time.perf_counter(), 0
        # cheap cells get more alternating runs (up to 25, within ~15 s): short calls are the ones a
        # busy machine's scheduler distorts most
        while done < runs or (done < 25 and time.perf_counter() - start < 15.0):
            done += 1
            for name, fn in fns.items():
                with forced(name if name != "hf" else "auto"):
                    if name == "auto":
                        log.reset()
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[name].append(time.perf_counter() - t0)
                    if name == "auto":
                        counts = dict(log.counts)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    if mode.startswith("gen"):
        exact: Any = bool(torch.equal(check["hf"], check["auto"]))
    else:
        keep = batch["attention_mask"].bool()[..., None]
        diff = (_out(check["hf"]).float() - _out(check["auto"]).float()).masked_fill(~keep, 0)
        exact = float(diff.abs().max())
    p, o = counts["packed"], counts["original"]
    path = "packed" if o == 0 else "original" if p == 0 else f"{p}P+{o}O"
    row = {
        "family": family,
        "mode": mode,
        "compiled": compiled is not None,
        "batch": batch_size,
        "length": length,
        "padding": padding,
        "real_padding": round(1 - float(batch["attention_mask"].float().mean()), 3),
        "hf_ms": round(med["hf"] * 1e3, 2),
        "path": path,
        "exact": exact,
        "runs": done,
        "ratio_auto_min": round(best["hf"] / best["auto"], 3),
    }
    for v in variants:
        row[f"{v}_ms"] = round(med[v] * 1e3, 2)
        row[f"ratio_{v}"] = round(med["hf"] / med[v], 3)
    return row


def fmt(row: dict[str, Any]) -> str:
    exact = row["exact"] if isinstance(row["exact"], bool) else f"{row['exact']:.1e}"
    extra = "".join(
        f" | {row[f'{v}_ms']:9.2f} | {row[f'ratio_{v}']:5.2f}x" for v in ("packed", "original") if f"{v}_ms" in row
    )
    mode = row["mode"] + (" (compiled)" if row["compiled"] else "")
    return (
        f"| {row['family']:5} | {mode:17} | {row['batch']:2} x {row['length']:3} | {row['padding']:4.0%} "
        f"| {row['hf_ms']:9.2f} | {row['auto_ms']:9.2f} | **{row['ratio_auto']:4.2f}x** | {row['path']:9}"
        f"{extra} | {exact} | {row['runs']} | {row['ratio_auto_min']:4.2f}x |"
    )


HEADER = (
    "| family | mode | shape | padding | HF sdpa ms | patchkit ms | ratio | path | packed-only ms | "
    "packed-only ratio | exact | runs | ratio of minima |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


# -- matrices ---------------------------------------------------------------------------------------
def family_models(family: str, small: bool, device: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    return {"bert": bert_models, "opt": opt_models, "llama": llama_models}[family](small, device, dtype)


def matrix(
    family: str,
    small: bool,
    quick: bool,
    compile_cells: bool,
    runs: int,
    device: str,
    dtype: torch.dtype,
    emit: Callable[[dict[str, Any]], None],
    long_len: int | None = None,
) -> list[dict[str, Any]]:
    base, fast, name = family_models(family, small, device, dtype)
    patch(family, fast, device)
    print(f"\n### {family}: {name} ({device}, {dtype})\n\n{HEADER}", flush=True)
    long = (256 if family == "bert" else 128) if long_len is None else long_len
    if small:
        long = 32
    shapes = [(b, t) for b in BATCHES for t in (16, long)]
    paddings = PADDINGS
    modes = ("plain",) if family == "bert" else MODES
    if quick:
        shapes = [(1, 16), (32, long)]
        paddings = (0.0, 0.3)
        modes = ("plain",) if family == "bert" else ("plain", "no_cache", "gen_long")
    rows = []
    for mode in modes:
        for b, t in shapes:
            for pad in paddings:
                if b == 1 and mode.startswith("gen") and pad not in (0.0, 0.3):
                    continue  # one row: padding only shortens the prompt
                row = run_cell(family, base, fast, mode, b, t, pad, runs, device)
                rows.append(row)
                emit(row)
    if compile_cells:
        import torch._dynamo

        torch._dynamo.reset()
        cb, cf = torch.compile(base), torch.compile(fast)
        b, t = (32, long) if not small else (4, 32)
        for pad in (0.0, 0.3):  # compiling is minutes per padding on 2 cores
            row = run_cell(family, base, fast, "plain", b, t, pad, runs, device, compiled=(cb, cf))
            rows.append(row)
            emit(row)
    return rows


def issue_cells(runs: int, device: str, dtype: torch.dtype, emit: Callable[[dict[str, Any]], None]) -> list:
    """The four cells of issue 20's table, 7 alternating runs each on the CPU."""
    print(f"\n### issue 20 cells ({device})\n\n{HEADER}", flush=True)
    rows = []
    base, fast, _ = llama_models(False, device, dtype, layers=12)
    patch("llama", fast, device)
    for mode, b, t, pad in (("plain", 8, 256, 0.0), ("gen_long", 4, 64, 0.3)):
        rows.append(run_cell("llama", base, fast, mode, b, t, pad, runs, device))
        emit(rows[-1])
    del base, fast
    base, fast, _ = bert_models(False, device, dtype)
    patch("bert", fast, device)
    rows.append(run_cell("bert", base, fast, "plain", 1, 16, 0.0, runs, device))
    emit(rows[-1])
    del base, fast
    base, fast, _ = opt125m_models(device, dtype)
    patch("opt", fast, device)
    rows.append(run_cell("opt", base, fast, "gen_long", 4, 64, 0.3, runs, device))
    emit(rows[-1])
    return rows


def environment(device: str) -> dict[str, Any]:
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def gpu_checks(small: bool) -> dict[str, Any]:
    """The matrix on CUDA in fp16 (``small``: tiny models on the CPU, a dry run) for bench/gpu_check.py."""
    device = "cuda" if torch.cuda.is_available() and not small else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows: list[dict[str, Any]] = []
    for family in ("bert", "opt", "llama"):
        rows += matrix(family, small, quick=small, compile_cells=not small, runs=3 if small else 7,
                       device=device, dtype=dtype, emit=lambda r: print(fmt(r), flush=True))  # fmt: skip
    worst = min(rows, key=lambda r: r["ratio_auto"])
    return {"environment": environment(device), "rows": rows, "worst": worst}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="bert,opt,llama")
    parser.add_argument("--quick", action="store_true", help="a smaller matrix (a few minutes)")
    parser.add_argument("--small", action="store_true", help="tiny models (a smoke run in seconds)")
    parser.add_argument("--issue", action="store_true", help="only the four cells of issue 20's table")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled cells")
    parser.add_argument("--original", action="store_true", help="also time the forced original path")
    parser.add_argument("--runs", type=int, default=None, help="alternating runs per cell (default 3; --issue 7)")
    parser.add_argument("--long", type=int, default=None, help="the long sequence (default 256 BERT, 128 decoders)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for regimes.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    env = environment(args.device)
    print(json.dumps(env))
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        print(fmt(row), flush=True)

    if args.original:
        run_cell.__defaults__ = (None, ("auto", "packed", "original"))  # type: ignore[attr-defined]
    if args.issue:
        rows = issue_cells(args.runs or 7, args.device, dtype, emit)
    else:
        for family in args.families.split(","):
            compile_cells = not args.no_compile
            long_len = args.long if family != "bert" else None
            rows += matrix(
                family, args.small, args.quick, compile_cells, args.runs or 3, args.device, dtype, emit, long_len
            )
    env["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {env['load_average_end']}")
    if rows:
        worst = min(rows, key=lambda r: r["ratio_auto"])
        print(f"worst cell: {fmt(worst)}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "regimes.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
