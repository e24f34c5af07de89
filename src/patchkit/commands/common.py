"""What ``patchkit bench`` and ``patchkit quantize`` share: the model class, one-line errors, progress."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..cli import UsageError, _read_config


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: its type (for library errors) and its message with the lines joined."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or repr(exc)
    return text if isinstance(exc, UsageError) else f"{type(exc).__name__}: {text}"


def model_class(source: str | Path) -> tuple[Any, dict[str, Any]]:
    """The transformers class ``from_pretrained`` would build for ``source`` (a folder or config.json),
    and the raw config: the config's first ``architectures`` entry transformers has, else a causal-LM
    head when the ``model_type`` has one, else the base model. Raises :class:`UsageError` (one line)."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError as exc:  # transformers is an optional extra
        raise UsageError("this command needs transformers: pip install 'patchkit[transformers]'") from exc
    config_file, raw = _read_config(source)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UsageError(
            f"{config_file}: unknown model_type {model_type!r} for transformers {transformers.__version__}"
        )
    names = [a for a in (raw.get("architectures") or []) if isinstance(a, str)]
    cls = next((getattr(transformers, a) for a in names if hasattr(transformers, a)), None)
    if cls is None:
        try:
            config = AutoConfig.for_model(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"{config_file}: transformers cannot read this config: {one_line(exc)}") from exc
        auto = AutoModelForCausalLM if type(config) in AutoModelForCausalLM._model_mapping else AutoModel
        cls = auto._model_mapping[type(config)]
    return cls, raw


def show_progress(flag: bool | None) -> bool:
    """Progress bars: forced by ``--progress`` / ``--no-progress``, else only when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def progress(
    items: Iterable[Any], *, show: bool, desc: str, total: int | None = None, unit: str = "it", delay: float = 1.0
) -> Iterator[Any]:
    """``items`` with a tqdm bar on stderr that appears after ``delay`` seconds (only when ``show``)."""
    if show:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with transformers; without it, no bar
            show = False
    if not show:
        yield from items
        return
    with tqdm(items, total=total, desc=f"patchkit: {desc}", unit=unit, delay=delay, leave=False) as bar:
        yield from bar


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (default: bars only on a terminal)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show bars")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="never show bars")


def add_apply_options(parser: argparse.ArgumentParser, *, quantize_required: bool = False) -> None:
    """The options of ``patchkit.apply`` as ``patchkit plan`` spells them."""
    if not quantize_required:
        parser.add_argument("--attention", help="attention family (sdpa, flash2, auto)")
        parser.add_argument("--patch", action="append", help="a family of kind 'other' (repeatable)")
        parser.add_argument("--backend", default="auto", help="attention backend (default: auto)")
    parser.add_argument(
        "--quantize",
        required=quantize_required,
        help="quantizer family (int8, fp4, nf4)" + (" [required]" * quantize_required),
    )
    parser.add_argument("--only", action="append", help="qualified-name pattern to patch only (repeatable)")
    parser.add_argument("--skip", action="append", help="qualified-name pattern to leave alone (repeatable)")
    parser.add_argument(
        "-o", "--option", action="append", metavar="KEY=VALUE", help="a patcher option, as apply(..., key=value)"
    )
    parser.add_argument("--lenient", action="store_true", help="leave unsupported modules alone instead of failing")


def parse_dtype(name: str) -> Any:
    """``--dtype``: ``"auto"`` or a floating torch dtype by name; :class:`UsageError` otherwise."""
    import torch

    if name == "auto":
        return "auto"
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UsageError(f"--dtype {name!r}: expected auto or a floating torch dtype (float32, bfloat16, float16)")
    return value
