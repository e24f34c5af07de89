"""``patchkit bench SOURCE``: patch your own model, check it against the original, time both, reverse.

SOURCE is a checkpoint folder (loaded with :func:`patchkit.from_pretrained`, nothing requested, so
it equals transformers' load) or a ``config.json`` alone (random weights, said so). The workload is
a synthetic batch (``--batch 32x256``, ``--padding 0.4``: that share of the tokens is padding) or
real text (``--padding FILE.txt``, one input a line, tokenized by the tokenizer in the folder), a
forward or ``--generate N`` greedy tokens. What it prints: the apply report; exactness (max abs
diff on real tokens, or whether the greedy tokens are equal); speed as the median of alternating
runs, with the per-pair range, thread count and a busy-machine note; peak memory of both; whether
``reverse`` restored the model. ``--json`` prints one JSON object instead; ``--sweep padding``
repeats the timing at 0..60% padding and ``--plot FILE.png|svg`` draws the speed-up (matplotlib).

Attention patchers alternate on one model (``reverse`` / ``apply`` between runs, as ``patchkit
demo``); with ``--quantize`` or ``--compile`` the patched model is a copy of the original (the
quantized copy is small; compiled graphs stay valid). Exit status: 0 when the outputs match (for
patchers that promise exactness; a quantizer's error is reported, not judged) and ``reverse``
restored the model, 1 otherwise, 2 for bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cli import UsageError, _for_the_cli, _parse_options
from ..errors import PatchError
from .common import add_apply_options, add_progress_flags, model_class, one_line, parse_dtype, progress, show_progress

SWEEP_PADDING = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
MIB = 1024 * 1024
SCHEMA = "patchkit-bench/1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def add_parser(sub: Any) -> None:
    """Register ``patchkit bench`` on the ``patchkit`` subparsers."""
    p = sub.add_parser(
        "bench",
        help="patch your own checkpoint, compare outputs with the original, time both, reverse",
        description="Patch your own model, compare its outputs with the original's, time both, reverse.",
    )
    p.add_argument("source", help="checkpoint folder, or a config.json alone (random weights)")
    add_apply_options(p)
    p.add_argument("--batch", default="8x128", help="BATCHxSEQ of the synthetic batch (default 8x128)")
    p.add_argument(
        "--padding",
        default="0.3",
        help="share of padding tokens (0.4 or 40%%, default 0.3), or a text file of real inputs (one a line; "
        "needs a tokenizer in the checkpoint folder)",
    )
    p.add_argument("--generate", type=int, metavar="N", help="time greedy generation of N new tokens instead")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: the checkpoint's; float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--attn-implementation", help="the original model's attention (eager, sdpa; default transformers')")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (timed after a warm-up)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs of each model (default 7)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--tolerance", type=float, help="largest acceptable max |patched - original| (default by dtype)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and synthetic tokens")
    p.add_argument("--sweep", choices=["padding"], help="time at 0, 10, ..., 60%% padding")
    p.add_argument("--plot", metavar="FILE", help="with --sweep: draw speed-up vs padding to FILE.png or FILE.svg")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema patchkit-bench/1) only")
    add_progress_flags(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------- input


@dataclass
class Workload:
    batch: int
    seq: int
    padding: float | None  # requested share, None for a text file
    text: Path | None
    generate: int | None


def parse_batch(value: str) -> tuple[int, int]:
    """``"32x256"`` -> ``(32, 256)``."""
    left, sep, right = value.lower().partition("x")
    try:
        batch, seq = int(left), int(right)
    except ValueError:
        batch = seq = 0
    if not sep or batch < 1 or seq < 1:
        raise UsageError(f"--batch {value!r}: expected BATCHxSEQ, e.g. 32x256")
    return batch, seq


def parse_padding(value: str) -> float | Path:
    """``0.4`` / ``40%`` -> 0.4; anything else names a text file of inputs."""
    text = value.strip()
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        path = Path(value)
        if not path.is_file():
            raise UsageError(f"--padding {value!r}: expected a share (0.4 or 40%) or a text file of inputs") from None
        return path
    if not 0 <= share < 1:
        raise UsageError(f"--padding {value!r}: the share of padding must be in [0, 1)")
    return share


def lengths_for(batch: int, seq: int, padding: float) -> list[int]:
    """Row lengths with ``padding`` of the ``batch x seq`` tokens padding; the first row is full.

    Up to 50%: lengths fall linearly from ``seq`` to ``(1 - 2 padding) seq``; above, the other rows
    share what is left equally.
    """
    if batch == 1:
        return [max(1, round(seq * (1 - padding)))]
    if padding <= 0.5:
        raw = [seq * (1 - 2 * padding * i / (batch - 1)) for i in range(batch)]
    else:
        rest = (batch * seq * (1 - padding) - seq) / (batch - 1)
        raw = [float(seq)] + [rest] * (batch - 1)
    return [min(seq, max(1, round(x))) for x in raw]


def synthetic_batch(
    batch: int, seq: int, padding: float, vocab: int, pad_id: int, left: bool, seed: int, device: Any
) -> dict[str, Any]:
    """Random token ids and the attention mask of a batch with that share of padding."""
    import torch

    lengths = torch.tensor(lengths_for(batch, seq, padding))
    positions = torch.arange(seq)[None, :]
    mask = positions >= (seq - lengths[:, None]) if left else positions < lengths[:, None]
    g = torch.Generator().manual_seed(seed)
    low = min(3, vocab - 1)
    ids = torch.randint(low, vocab, (batch, seq), generator=g)
    ids = ids.masked_fill(~mask, pad_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device)}


def text_batch(folder: Path, text: Path, batch: int, seq: int, left: bool, device: Any) -> dict[str, Any]:
    """The first ``batch`` lines of ``text`` (cycled), tokenized by the folder's tokenizer, truncated to ``seq``."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(
            f"--padding {text}: real inputs need a tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)})"
        )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"--padding {text}: real inputs need a tokenizer in {folder} ({one_line(exc)})") from exc
    lines = [line.strip() for line in text.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--padding {text}: the file holds no input (one a line)")
    rows = [lines[i % len(lines)] for i in range(batch)]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left" if left else tokenizer.padding_side
    enc = tokenizer(rows, padding=True, truncation=True, max_length=seq, return_tensors="pt")
    if enc["input_ids"].numel() == 0 or int(enc["attention_mask"].sum()) == 0:
        raise UsageError(f"--padding {text}: the tokenizer in {folder} made no tokens of these inputs")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


# ---------------------------------------------------------------------------------------------- model


def has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def load_model(args: argparse.Namespace, show: bool) -> tuple[Any, bool]:
    """The original model in eval mode, and whether its weights are random (config only)."""
    import torch

    import patchkit

    source = Path(args.source)
    cls, raw = model_class(source)
    dtype = parse_dtype(args.dtype)
    extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    if source.is_dir() and has_weights(source):
        model = patchkit.from_pretrained(cls, source, dtype=dtype, device=args.device, progress=show, **extra)
        return model.eval(), False
    from transformers import AutoConfig

    config = AutoConfig.for_model(**raw)
    if args.attn_implementation:
        config._attn_implementation = args.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = cls._from_config(config)
    model = model.to(device=args.device, dtype=torch.float32 if dtype == "auto" else dtype)
    return model.eval(), True


def output_tensor(out: Any) -> Any:
    """The tensor to compare from a forward's result: logits, else the last hidden state, else the first."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    first = out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]
    return first


def tensor_bytes(model: Any) -> int:
    """Bytes of the parameters and buffers the model holds (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def fingerprint(model: Any) -> tuple[Any, ...]:
    """Module objects and classes, parameter objects, and a SHA-256 of every tensor's bytes."""
    import torch

    digests = []
    for name, t in model.state_dict(keep_vars=True).items():
        data = t.detach().cpu().contiguous()
        h = hashlib.sha256(str((data.dtype, tuple(data.shape))).encode())
        if data.numel():
            h.update(data.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
        digests.append((name, h.hexdigest()))
    return (
        [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)],
        [(name, id(p)) for name, p in model.named_parameters()],
        digests,
    )


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_growth_mib(fn: Callable[[], Any], device: str) -> float | None:
    """Peak memory growth during one call: the CUDA allocator's peak, or the process's peak RSS (Linux)."""
    import torch

    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / MIB
    from ..demo import _peak_rss_growth_mib

    return _peak_rss_growth_mib(fn)


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Pair:
    """The original and the patched model, as callables; one object swapped, or two."""

    original: Any
    patched: Any  # the same object as original in swap mode
    apply_kwargs: dict[str, Any]
    swap: bool
    report: Any = None
    run_original: Any = None  # compiled wrappers (or the models)
    run_patched: Any = None
    before: tuple[Any, ...] | None = None
    patched_before: tuple[Any, ...] | None = None
    notes: list[str] = field(default_factory=list)

    def use(self, which: str) -> Any:
        import patchkit

        if self.swap:
            on = patchkit.is_patched(self.original)
            if which == "patched" and not on:
                patchkit.apply(self.original, **self.apply_kwargs)
            elif which == "original" and on:
                patchkit.reverse(self.original)
        return self.run_patched if which == "patched" else self.run_original


def make_pair(model: Any, apply_kwargs: dict[str, Any], compile_: bool) -> Pair:
    """Apply (on the model, or on a copy for quantizers and --compile); keeps the fingerprints for reverse."""
    import torch

    import patchkit

    swap = not (apply_kwargs.get("quantize") or compile_)
    before = fingerprint(model)
    if swap:
        report = patchkit.apply(model, **apply_kwargs)
        pair = Pair(model, model, apply_kwargs, True, report, model, model, before, before)
    else:
        patched = copy.deepcopy(model)
        patched_before = fingerprint(patched)
        report = patchkit.apply(patched, **apply_kwargs)
        pair = Pair(model, patched, apply_kwargs, False, report, model, patched, before, patched_before)
    if compile_:
        pair.run_original, pair.run_patched = torch.compile(pair.original), torch.compile(pair.patched)
    return pair


def _call(run: Any, inputs: Mapping[str, Any], generate: int | None, pad_id: int) -> Any:
    import torch

    # inference_mode for eager runs; no_grad for compiled ones (Dynamo traces them as the tests do)
    compiled = isinstance(run, torch._dynamo.eval_frame.OptimizedModule)
    with torch.no_grad() if compiled else torch.inference_mode():
        if generate:
            return run.generate(
                **inputs,
                max_new_tokens=generate,
                min_new_tokens=generate,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
            )
        return output_tensor(run(**inputs))


def measure(
    pair: Pair,
    inputs: Mapping[str, Any],
    work: Workload,
    *,
    repeats: int,
    device: str,
    pad_id: int,
    tolerance: float | None,
    judged: bool,
    show: bool,
    desc: str,
    delay: float = 1.0,
) -> dict[str, Any]:
    """Exactness, alternating timed runs and peak memory for one batch."""
    import torch

    from ..demo import machine_busy
    from ..threads import run_queue_wait

    def once(which: str) -> Any:
        return _call(pair.use(which), inputs, work.generate, pad_id)

    if pair.run_patched is not pair.patched:  # --compile: one eager call first, so that a patcher's
        # lazily resolved state (the sdpa plugin's kernel choice reads package metadata) is not traced
        _call(pair.patched, inputs, work.generate, pad_id)
    reference = once("original")  # also the warm-up (and compilation) of both
    result = once("patched")
    mask = inputs["attention_mask"].bool()
    exact: dict[str, Any]
    if work.generate:
        prompt = inputs["input_ids"].shape[1]
        new_o, new_p = reference[:, prompt:], result[:, prompt:]
        rows_equal = [bool(torch.equal(a, b)) for a, b in zip(new_o, new_p, strict=True)]
        steps = (new_o != new_p).any(0).nonzero()
        exact = {
            "metric": "greedy_tokens_equal",
            "value": all(rows_equal),
            "rows_equal": sum(rows_equal),
            "rows": len(rows_equal),
            "first_difference_step": int(steps[0]) if len(steps) else None,
        }
        exact["ok"] = exact["value"] if judged else None
    else:
        o, p = reference.float(), result.float()
        if o.dim() >= 2 and tuple(o.shape[:2]) == tuple(mask.shape):
            o, p = o[mask], p[mask]
        diff = (p - o).abs().max().item() if o.numel() else 0.0
        scale = o.abs().max().item() if o.numel() else 0.0
        exact = {
            "metric": "max_abs_diff",
            "value": diff,
            "relative": diff / scale if scale else 0.0,
            "tolerance": tolerance if judged else None,
            "compared": "real tokens" if o.dim() < reference.dim() else "all outputs",
        }
        exact["ok"] = (diff <= (tolerance or 0.0)) if judged else None
    once("original")  # second warm-up: the first compiled calls may recompile
    once("patched")
    patched_ms: list[float] = []
    original_ms: list[float] = []
    waited, start = run_queue_wait(), time.perf_counter()
    for _ in progress(range(repeats), show=show, desc=desc, unit="pair", delay=delay):
        for which, times in (("patched", patched_ms), ("original", original_ms)):
            run = pair.use(which)
            _sync(device)
            t0 = time.perf_counter()
            _call(run, inputs, work.generate, pad_id)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1000)
    after, wall = run_queue_wait(), time.perf_counter() - start
    threads = torch.get_num_threads()
    share = (after - waited) / (wall * threads) if waited is not None and after is not None and wall > 0 else None
    o_ms, p_ms = statistics.median(original_ms), statistics.median(patched_ms)
    ratios = sorted(o / p for o, p in zip(original_ms, patched_ms, strict=True))
    speed = {
        "original_ms": o_ms,
        "patched_ms": p_ms,
        "speedup": o_ms / p_ms,
        "pair_range": [ratios[0], ratios[-1]],
        "repeats": repeats,
        "threads": threads,
        "busy": machine_busy(original_ms, patched_ms, share) if device == "cpu" else None,
        "original_runs_ms": original_ms,
        "patched_runs_ms": patched_ms,
    }
    if work.generate:
        tokens = work.generate * inputs["input_ids"].shape[0]
        speed["original_tokens_per_s"] = tokens / (o_ms / 1000)
        speed["patched_tokens_per_s"] = tokens / (p_ms / 1000)
    memory = {
        "original_peak_growth_mib": _peak_growth_mib(lambda: once("original"), device),
        "patched_peak_growth_mib": _peak_growth_mib(lambda: once("patched"), device),
    }
    real = int(mask.sum())
    padding = 1 - real / mask.numel()
    return {"padding": padding, "exactness": exact, "speed": speed, "memory": memory}


def verify_reverse(pair: Pair, quantized: bool, options: Mapping[str, Any]) -> dict[str, Any]:
    """Reverse the patched model and compare with its fingerprint before apply."""
    import patchkit

    if patchkit.is_patched(pair.patched):
        patchkit.reverse(pair.patched)
    after = fingerprint(pair.patched)
    before = pair.patched_before
    assert before is not None
    modules_same = after[0] == before[0] and after[1] == before[1]
    bytes_same = after[2] == before[2]
    out: dict[str, Any] = {
        "same_objects": modules_same,
        "bit_exact": bytes_same,
        "still_patched": patchkit.is_patched(pair.patched),
    }
    lossy = quantized and options.get("keep_original") is None
    if lossy and not bytes_same:
        out["detail"] = "weights dequantized (quantizers reverse bit-exactly only with -o keep_original=cpu)"
    out["ok"] = modules_same and not out["still_patched"] and (bytes_same or lossy)
    return out


# ---------------------------------------------------------------------------------------------- command


def _default_tolerance(dtype: Any) -> float:
    import torch

    return {torch.float16: 1e-2, torch.bfloat16: 3e-2}.get(dtype, 1e-4)


def _check_plot(path: str | None, sweep: str | None) -> None:
    if path is None:
        return
    if sweep is None:
        raise UsageError("--plot draws the speed-up of a sweep: add --sweep padding")
    if Path(path).suffix.lower() not in (".png", ".svg"):
        raise UsageError(f"--plot {path!r}: expected a .png or .svg file name")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'patchkit[plot]' (or pip install matplotlib)") from None


def plot(points: list[dict[str, Any]], path: str, title: str) -> None:
    """Speed-up vs padding, the original at 1.0, the per-pair range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [100 * p["padding"] for p in points]
    ys = [p["speed"]["speedup"] for p in points]
    lo = [y - p["speed"]["pair_range"][0] for y, p in zip(ys, points, strict=True)]
    hi = [p["speed"]["pair_range"][1] - y for y, p in zip(ys, points, strict=True)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(1.0, color="grey", linestyle="--", label="original (1.0)")
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label="patched (median, per-pair range)")
    ax.set_xlabel("padding (% of tokens)")
    ax.set_ylabel("speed-up over the original")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """``patchkit bench``; returns 0 (matched and reversed), 1 (not), raises UsageError (exit 2)."""
    try:
        return _run(args)
    except UsageError:
        raise
    except PatchError as exc:
        message = re.sub(r"backend='([\w.-]+)'", r"--backend \1", _for_the_cli(one_line(exc)))
        raise UsageError(message) from exc
    except OSError as exc:
        raise UsageError(one_line(exc)) from exc


def _run(args: argparse.Namespace) -> int:
    import torch

    if not (args.attention or args.quantize or args.patch):
        raise UsageError("nothing to bench: pass --attention, --quantize or --patch (see `patchkit bench --help`)")
    batch, seq = parse_batch(args.batch)
    padding = parse_padding(args.padding)
    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if args.generate is not None and args.generate < 1:
        raise UsageError("--generate N: N must be at least 1")
    if args.sweep and isinstance(padding, Path):
        raise UsageError("--sweep padding makes synthetic batches; it cannot use a text file of inputs")
    _check_plot(args.plot, args.sweep)
    source = Path(args.source)
    if not source.exists():
        raise UsageError(f"{source}: no such checkpoint folder or config.json")
    options = _parse_options(args.option)
    show = show_progress(args.progress) and not args.json
    delay = 0.0 if args.progress else 1.0  # --progress: bars from the start; else only phases over a second
    lines: list[str] = []

    def say(text: str = "") -> None:
        lines.append(text)
        if not args.json:
            print(text, flush=True)

    folder = source if source.is_dir() else source.parent
    if isinstance(padding, Path) and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"--padding {padding}: real inputs need a tokenizer in {folder}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, random_weights = load_model(args, show)
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise UsageError(f"{source}: the config has no vocab_size; bench feeds token ids")
    pad_id = getattr(config, "pad_token_id", None)
    pad_id = int(pad_id) if isinstance(pad_id, int) else 0
    if args.generate and not hasattr(model, "generate"):
        raise UsageError(f"{type(model).__name__} cannot generate; drop --generate")
    left = bool(args.generate)
    work = Workload(
        batch,
        seq,
        None if isinstance(padding, Path) else padding,
        padding if isinstance(padding, Path) else None,
        args.generate,
    )
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    apply_kwargs: dict[str, Any] = dict(
        attention=args.attention,
        quantize=args.quantize,
        patch=args.patch,
        backend=args.backend,
        only=args.only,
        skip=args.skip,
        strict=not args.lenient,
        **options,
    )
    judged = not args.quantize
    tolerance = args.tolerance if args.tolerance is not None else _default_tolerance(dtype)

    weights = (
        "random weights (config only: outputs and speed are real, quality is not)"
        if random_weights
        else "weights from the checkpoint"
    )
    say(f"{type(model).__name__} from {source}: {weights}, {dtype}, {args.device}, {torch.get_num_threads()} threads")
    original_bytes = tensor_bytes(model)
    pair = make_pair(model, apply_kwargs, args.compile)
    say(str(pair.report))
    patched_bytes = tensor_bytes(pair.patched)

    def batch_for(share: float | None) -> dict[str, Any]:
        if work.text is not None:
            return text_batch(folder, work.text, batch, seq, left, args.device)
        assert share is not None
        return synthetic_batch(batch, seq, share, vocab, pad_id, left, args.seed, args.device)

    kind = f"generate {args.generate} tokens" if args.generate else "forward"
    shares: list[float | None] = list(SWEEP_PADDING) if args.sweep else [work.padding]
    points = []
    for share in progress(shares, show=show and len(shares) > 1, desc="sweep", unit="point", delay=delay):
        inputs = batch_for(share)
        label = f"{100 * share:.0f}% padding" if share is not None else str(work.text)
        points.append(
            measure(
                pair,
                inputs,
                work,
                repeats=args.repeats,
                device=args.device,
                pad_id=pad_id,
                tolerance=tolerance,
                judged=judged,
                show=show,
                desc=f"timing ({label})",
                delay=delay,
            )
        )
        point = points[-1]
        side = "left" if left else "right"
        if not args.sweep:
            say(
                f"workload: {batch} x {inputs['input_ids'].shape[1]} tokens, {point['padding']:.0%} padding "
                f"({side}-padded{', ' + str(work.text) if work.text else ''}), {kind}"
            )
            _say_point(say, point, judged)
    if args.sweep:
        _say_sweep(say, points, f"{batch} x {seq} tokens, {'left' if left else 'right'}-padded, {kind}")
    reverse = verify_reverse(pair, bool(args.quantize), options)
    verdict = "yes" if reverse["same_objects"] and reverse["bit_exact"] and not reverse["still_patched"] else "NO"
    say(f"reverse restored the original exactly (same module and parameter objects, same bytes): {verdict}")
    if reverse.get("detail"):
        say(f"  {reverse['detail']}")
    sizes = f"original {original_bytes / MIB:.1f} MiB, patched {patched_bytes / MIB:.1f} MiB"
    say(f"model memory (parameters and buffers): {sizes}")
    exact_ok = all(p["exactness"]["ok"] is not False for p in points)
    ok = exact_ok and reverse["ok"]
    if args.plot:
        what = args.attention or args.quantize or ",".join(args.patch or [])
        title = f"{type(model).__name__} {what}: {batch}x{seq}, {kind}"
        plot(points, args.plot, title)
        say(f"plot: {args.plot}")
    say("bench OK" if ok else "bench FAILED")
    if args.json:
        result = {
            "schema": SCHEMA,
            "source": str(source),
            "model_class": type(model).__name__,
            "random_weights": random_weights,
            "dtype": str(dtype).removeprefix("torch."),
            "device": args.device,
            "threads": torch.get_num_threads(),
            "compile": bool(args.compile),
            "apply": {
                "arguments": {k: v for k, v in apply_kwargs.items() if v is not None},
                "applied": dict(getattr(pair.report, "applied", {})),
                "swaps": len(pair.report.swaps),
                "skipped": len(pair.report.skipped),
                "report": str(pair.report),
            },
            "workload": {
                "batch": batch,
                "seq": seq,
                "padding": work.padding,
                "inputs": str(work.text) if work.text else None,
                "generate": args.generate,
                "padding_side": "left" if left else "right",
            },
            "sweep": args.sweep,
            "points": points,
            "model_mib": {"original": original_bytes / MIB, "patched": patched_bytes / MIB},
            "reverse": reverse,
            "plot": args.plot,
            "ok": ok,
        }
        print(json.dumps(result, indent=2))
    return 0 if ok else 1


def _say_point(say: Callable[[str], None], point: dict[str, Any], judged: bool) -> None:
    exact, speed, memory = point["exactness"], point["speed"], point["memory"]
    if exact["metric"] == "greedy_tokens_equal":
        state = "equal" if exact["value"] else f"DIFFERENT (first at step {exact['first_difference_step']})"
        line = f"greedy tokens: {state} in {exact['rows_equal']}/{exact['rows']} rows"
    else:
        line = (
            f"outputs on {exact['compared']}: max |patched - original| = {exact['value']:.2e} "
            f"(relative {exact['relative']:.1e}"
        )
        line += f", tolerance {exact['tolerance']:.0e})" if judged else "; a quantizer is not exact, not judged)"
    if exact["ok"] is False:
        line += "  <- FAILED"
    say(line)
    tokens = ""
    if "patched_tokens_per_s" in speed:
        tokens = f" ({speed['original_tokens_per_s']:.0f} -> {speed['patched_tokens_per_s']:.0f} tokens/s)"
    say(
        f"speed: original {speed['original_ms']:.1f} ms, patched {speed['patched_ms']:.1f} ms per call -> speed-up "
        f"{speed['speedup']:.2f}x{tokens} (median of {speed['repeats']} alternating runs, per-pair range "
        f"{speed['pair_range'][0]:.2f}x..{speed['pair_range'][1]:.2f}x, {speed['threads']} threads)"
    )
    if speed["busy"]:
        say(f"note: {speed['busy']}; this speed-up is not a fair figure, rerun on an idle machine")
    o, p = memory["original_peak_growth_mib"], memory["patched_peak_growth_mib"]
    if o is not None and p is not None:
        say(f"peak memory growth during a call: original {o:.0f} MiB, patched {p:.0f} MiB")


def _say_sweep(say: Callable[[str], None], points: list[dict[str, Any]], workload: str) -> None:
    """One row per padding share, then the busy-machine notes."""
    say(f"sweep over padding: {workload}")
    generate = points[0]["exactness"]["metric"] == "greedy_tokens_equal"
    head = "greedy tokens" if generate else "max |diff|"
    say(f"padding  {head:>13}  original ms  patched ms  speed-up  per-pair range")
    for p in points:
        e, sp = p["exactness"], p["speed"]
        exact = ("equal" if e["value"] else "DIFFERENT") if generate else f"{e['value']:.2e}"
        if e["ok"] is False:
            exact += "!"
        say(
            f"{p['padding']:>7.0%}  {exact:>13}  {sp['original_ms']:>11.1f}  {sp['patched_ms']:>10.1f}  "
            f"{sp['speedup']:>7.2f}x  {sp['pair_range'][0]:.2f}x..{sp['pair_range'][1]:.2f}x"
        )
    busy = [f"{100 * p['padding']:.0f}%" for p in points if p["speed"]["busy"]]
    threads = points[0]["speed"]["threads"]
    say(f"(median of {points[0]['speed']['repeats']} alternating runs per row, {threads} threads)")
    if busy:
        say(f"note: the machine looked busy during the rows {', '.join(busy)}; those speed-ups are not fair figures")


def main() -> None:  # pragma: no cover - `python -m patchkit.commands.bench`
    from ..cli import main as cli_main

    sys.exit(cli_main(["bench", *sys.argv[1:]]))
