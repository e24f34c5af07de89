"""``patchkit quantize SOURCE DEST --quantize nf4``: a quantized checkpoint, never holding the full model.

The checkpoint streams through :func:`patchkit.from_pretrained` (each layer quantized as its weight
arrives, the full-precision copy freed at once), then :func:`patchkit.save_pretrained` with
``quantized=True`` writes what ``AutoModel*.from_pretrained(DEST)`` reloads. The files are written
to a temporary folder beside DEST and renamed into place at the end: a failure or an interrupt
leaves no DEST behind (and an existing DEST, replaced only with ``--overwrite``, untouched).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..cli import UsageError, _parse_options
from ..errors import PatchError
from .common import add_apply_options, add_progress_flags, model_class, one_line, parse_dtype, show_progress

# Files besides the weights that make DEST usable on its own (tokenizer, processor, chat template).
_COMPANIONS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
MIB = 1024 * 1024


def add_parser(sub: Any) -> None:
    """Register ``patchkit quantize`` on the ``patchkit`` subparsers."""
    p = sub.add_parser(
        "quantize",
        help="stream a checkpoint through the quantizer and write a quantized checkpoint transformers reloads",
        description="Write a quantized checkpoint that transformers reloads, never holding the full-precision model.",
    )
    p.add_argument("source", help="checkpoint folder (config.json + model.safetensors or an index and its shards)")
    p.add_argument("dest", help="folder to write (must not exist unless --overwrite)")
    add_apply_options(p, quantize_required=True)
    p.add_argument("--dtype", default="auto", help="dtype of the layers left unquantized (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    add_progress_flags(p)
    p.set_defaults(func=run)


def _check_paths(source: Path, dest: Path, overwrite: bool) -> None:
    if not source.is_dir():
        what = "a file" if source.exists() else "missing"
        raise UsageError(f"{source}: expected a checkpoint folder (config.json and safetensors weights); it is {what}")
    if dest.exists() or dest.is_symlink():
        if dest.resolve() == source.resolve():
            raise UsageError(f"{dest}: DEST is SOURCE; write the quantized checkpoint to another folder")
        if not overwrite:
            raise UsageError(f"{dest} exists; pass --overwrite to replace it, or choose another DEST")
    if source.resolve() in dest.resolve().parents:
        raise UsageError(f"{dest}: DEST is inside SOURCE; write the quantized checkpoint elsewhere")


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _make_parent(dest: Path) -> list[Path]:
    """Create DEST's missing parents; returns those created (removed again on failure)."""
    created = []
    for parent in reversed(dest.parents):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    return created


def run(args: argparse.Namespace) -> int:
    """Quantize ``args.source`` into ``args.dest``; returns 0, raises UsageError (exit 2) on bad input."""
    import patchkit

    source, dest = Path(args.source), Path(args.dest)
    _check_paths(source, dest, args.overwrite)
    options = _parse_options(args.option)
    dtype = parse_dtype(args.dtype)
    cls, _ = model_class(source)
    start = time.perf_counter()
    created: list[Path] = []
    tmp: Path | None = None
    try:
        created = _make_parent(dest.absolute())
        # beside DEST: same file system, so the final rename is atomic
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".patchkit-tmp", dir=dest.absolute().parent))
        model, report = patchkit.from_pretrained(
            cls,
            source,
            quantize=args.quantize,
            dtype=dtype,
            only=args.only,
            skip=args.skip,
            strict=not args.lenient,
            progress=show_progress(args.progress),
            return_report=True,
            **options,
        )
        loaded = time.perf_counter()
        patchkit.save_pretrained(model, tmp, quantized=True)
        for name in _COMPANIONS:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        written = _size(tmp)
        _replace(tmp, dest)
        tmp = None
    except (PatchError, OSError) as exc:
        raise UsageError(one_line(exc)) from exc
    except Exception as exc:  # safetensors' and transformers' own errors about the files
        if type(exc).__module__.split(".")[0] not in ("safetensors", "transformers", "huggingface_hub"):
            raise
        raise UsageError(one_line(exc)) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            for parent in reversed(created):
                try:
                    parent.rmdir()
                except OSError:
                    break
    quantized = sum(1 for s in report.swaps) if report is not None else 0
    print(report)
    print(
        f"wrote {dest}: {written / MIB:.1f} MiB ({_size_of_weights(source) / MIB:.1f} MiB of weights in {source}), "
        f"{quantized} modules quantized={args.quantize}; loaded in {loaded - start:.1f} s, "
        f"written in {time.perf_counter() - loaded:.1f} s"
    )
    print(f"reload: {cls.__name__}.from_pretrained({str(dest)!r}) (transformers; the quantizer's package installed)")
    return 0


def _size_of_weights(source: Path) -> int:
    return sum(f.stat().st_size for f in source.iterdir() if f.name.endswith(".safetensors"))


def _replace(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest``; an existing ``dest`` is moved aside first and deleted only afterwards."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".patchkit-old", dir=dest.absolute().parent))
        os.rename(dest, old / dest.name)
    try:
        os.rename(tmp, dest)
    except OSError:
        if old is not None:
            os.rename(old / dest.name, dest)
            old.rmdir()
        raise
    if old is not None:
        if (old / dest.name).is_dir() and not (old / dest.name).is_symlink():
            shutil.rmtree(old)
        else:
            (old / dest.name).unlink()
            old.rmdir()
