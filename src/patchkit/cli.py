"""The ``patchkit`` command: ``plugins``, ``plan``, ``demo``, ``bench`` and ``quantize``.

Bad input (a missing or malformed config, an unknown ``model_type``, an unknown family or option)
ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

from .errors import PatchError


class UsageError(PatchError):
    """The command line or the file it names cannot be used (exit status 2)."""


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import default_registry

    infos = default_registry().plugins()
    if args.json:
        print(json.dumps([info.to_json() for info in infos], indent=2))
    else:
        for info in infos:
            line = f"{info.name} {info.version or '?'}: {info.status}"
            if info.reason:
                line += f" ({info.reason})"
            print(line)
            for p in info.patcher_details:
                keyword = {"other": "patch"}.get(p.kind, p.kind)
                covers = f"  covers {', '.join(p.covers)}" if p.covers else ""
                print(f"    patcher  {p.qualname}  {keyword}={p.family}{covers}")
            for b in info.backend_details:
                state = f"  unavailable: {b.unavailable}" if b.unavailable else ""
                print(f"    backend  {b.name}{state}")
    return 1 if any(info.status == "failed" for info in infos) else 0


def _read_config(source: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(source)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise UsageError(f"{source}: expected a config.json file or a checkpoint folder containing one")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{config_file}: expected a JSON object, found {type(raw).__name__}")
    if "auto_map" in raw:
        raise UsageError(f"{config_file} asks for remote code (auto_map); patchkit never runs code from a checkpoint")
    return config_file, raw


def build_meta_model(source: str | Path, *, train: bool = False) -> Any:
    """A transformers model built on the meta device from a ``config.json`` (or a checkpoint folder).

    The class is the config's first ``architectures`` entry when transformers has it (as
    ``from_pretrained`` would build it), else a causal-LM head, else the base model. The model is
    in inference mode (``eval()``) unless ``train=True``. Only the config is read: no remote code,
    no weight file is opened, nothing is unpickled. Raises :class:`UsageError` (one line) for a
    missing or malformed config or an unknown ``model_type``.
    """
    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError as exc:  # transformers is an optional extra
        raise UsageError("`patchkit plan` needs transformers: pip install 'patchkit[transformers]'") from exc
    config_file, raw = _read_config(source)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UsageError(
            f"{config_file}: unknown model_type {model_type!r} for transformers {transformers.__version__}{hint}"
        )
    try:
        config = AutoConfig.for_model(**raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"{config_file}: transformers cannot read this config: {str(exc).splitlines()[0]}") from exc
    names = [a for a in (raw.get("architectures") or []) if isinstance(a, str)]
    cls = next((getattr(transformers, a) for a in names if hasattr(transformers, a)), None)
    with torch.device("meta"):
        try:
            if cls is not None:
                model = cls._from_config(config)
            else:
                try:
                    model = AutoModelForCausalLM.from_config(config)
                except ValueError:
                    model = AutoModel.from_config(config)
        except (ValueError, TypeError, AttributeError) as exc:
            raise UsageError(f"{config_file}: cannot build the model: {str(exc).splitlines()[0]}") from exc
    return model.train(train)


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``-o key=value`` pairs; a value is read as JSON when it parses (``true``, ``3``, ``[1,2]``), else a string."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"-o {pair!r}: expected key=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _cmd_plan(args: argparse.Namespace) -> int:
    from .engine import plan

    if not (args.attention or args.quantize or args.patch):
        raise UsageError("nothing to plan: pass --attention, --quantize or --patch (see `patchkit plan --help`)")
    options = _parse_options(args.option)
    model = build_meta_model(args.source, train=args.train)
    result = plan(
        model,
        attention=args.attention,
        quantize=args.quantize,
        patch=args.patch,
        backend=args.backend,
        only=args.only,
        skip=args.skip,
        strict=not args.lenient,
        **options,
    )
    mode = "training mode (--train)" if args.train else "inference mode (eval)"
    print(f"{type(model).__name__} (built on the meta device from {args.source}, {mode})")
    print(result)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(quick=args.quick, name=args.name)


def _for_the_cli(message: str) -> str:
    """A library message in the command's words (``strict=False`` is ``--lenient`` here)."""
    return message.replace("Pass strict=False", "Pass --lenient").replace("strict=False", "--lenient")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``patchkit`` command; returns the exit status (2: bad input, one line on stderr)."""
    parser = argparse.ArgumentParser(prog="patchkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_plugins = sub.add_parser("plugins", help="list plugins, their patchers (and what they cover), backends, status")
    p_plugins.add_argument("--json", action="store_true")
    p_plugins.set_defaults(func=_cmd_plugins)
    p_plan = sub.add_parser("plan", help="show what apply would do, on a model built on the meta device")
    p_plan.add_argument("source", help="config.json or checkpoint folder (only its config.json is read)")
    p_plan.add_argument("--attention", help="attention family (sdpa, flash2, auto)")
    p_plan.add_argument("--quantize", help="quantizer family (int8, fp4, nf4)")
    p_plan.add_argument("--patch", action="append", help="a family of kind 'other' (repeatable)")
    p_plan.add_argument("--backend", default="auto", help="attention backend (default: auto)")
    p_plan.add_argument("--only", action="append", help="qualified-name pattern to patch only (repeatable)")
    p_plan.add_argument("--skip", action="append", help="qualified-name pattern to leave alone (repeatable)")
    p_plan.add_argument(
        "-o", "--option", action="append", metavar="KEY=VALUE", help="a patcher option, as apply(..., key=value)"
    )
    p_plan.add_argument("--train", action="store_true", help="plan for a model in training mode (default: eval)")
    p_plan.add_argument("--lenient", action="store_true", help="list unsupported modules instead of failing")
    p_plan.set_defaults(func=_cmd_plan)
    p_demo = sub.add_parser("demo", help="patch a plugin's embedded model, compare outputs and speed, reverse")
    p_demo.add_argument("--quick", action="store_true", help="smaller batch, fewer timing repeats")
    p_demo.add_argument("--name", help="which demo (default: the first registered)")
    p_demo.set_defaults(func=_cmd_demo)
    from .commands import bench, quantize  # the commands on a user's own checkpoint

    bench.add_parser(sub)
    quantize.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"patchkit {args.command}: {exc}", file=sys.stderr)
        return 2
    except PatchError as exc:
        print(f"patchkit {args.command}: {type(exc).__name__}: {_for_the_cli(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        origin = getattr(exc, "patchkit_origin", None)
        if origin is None:  # not a plugin's: a bug in patchkit itself, shown with its traceback
            raise
        print(
            f"patchkit {args.command}: {origin} raised {type(exc).__name__}: {exc}. This is a bug in that plugin: "
            "report it to its authors, or disable it with PATCHKIT_DISABLE_PLUGINS",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":  # pragma: no cover
    # `python -m patchkit.cli`: run the imported module's main, so that this file's classes
    # (UsageError) are the ones the subcommands in patchkit.commands raise
    from patchkit.cli import main as _main

    sys.exit(_main())
