"""The ``patchkit`` command: ``plugins``, ``plan`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import PatchError


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import default_registry

    infos = default_registry().plugins()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
    else:
        for info in infos:
            line = f"{info.name} {info.version or '?'}: {info.status}"
            if info.reason:
                line += f" ({info.reason})"
            print(line)
            for patcher in info.patchers:
                print(f"    patcher  {patcher}")
            for backend in info.backends:
                print(f"    backend  {backend}")
    return 1 if any(info.status == "failed" for info in infos) else 0


def build_meta_model(source: str | Path) -> Any:
    """A transformers model built on the meta device from a ``config.json`` (or a checkpoint folder).

    Only the config is read: no remote code, no weight file is opened, nothing is unpickled.
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError as exc:  # transformers is an optional extra
        raise PatchError("`patchkit plan` needs transformers: pip install 'patchkit[transformers]'") from exc
    path = Path(source)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise PatchError(f"{source}: expected a config.json file or a checkpoint folder containing one")
    raw = json.loads(config_file.read_text())
    if "auto_map" in raw:
        raise PatchError(f"{config_file} asks for remote code (auto_map); patchkit never runs code from a checkpoint")
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def _cmd_plan(args: argparse.Namespace) -> int:
    from .engine import plan

    model = build_meta_model(args.source)
    result = plan(
        model,
        attention=args.attention,
        quantize=args.quantize,
        backend=args.backend,
        only=args.only,
        skip=args.skip,
        strict=not args.lenient,
    )
    print(f"{type(model).__name__} (built on the meta device from {args.source})")
    print(result)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``patchkit`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="patchkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_plugins = sub.add_parser("plugins", help="list plugins, their patchers and status")
    p_plugins.add_argument("--json", action="store_true")
    p_plugins.set_defaults(func=_cmd_plugins)
    p_plan = sub.add_parser("plan", help="show what apply would do, on a model built on the meta device")
    p_plan.add_argument("source", help="config.json or checkpoint folder (only its config.json is read)")
    p_plan.add_argument("--attention")
    p_plan.add_argument("--quantize")
    p_plan.add_argument("--backend", default="auto")
    p_plan.add_argument("--only", action="append")
    p_plan.add_argument("--skip", action="append")
    p_plan.add_argument("--lenient", action="store_true", help="strict=False: list unsupported modules, don't fail")
    p_plan.set_defaults(func=_cmd_plan)
    p_demo = sub.add_parser("demo", help="patch an embedded model, compare outputs and speed, reverse")
    p_demo.add_argument("--quick", action="store_true", help="smaller batch, fewer timing repeats")
    p_demo.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PatchError as exc:
        print(f"patchkit: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
