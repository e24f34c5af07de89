"""Planning: which patcher takes which module, and why the others are left alone. Changes nothing."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from .errors import ConflictError, UnsupportedError
from .patcher import PatchContext, Patcher
from .registry import Registry
from .tree import Node, Pattern, compile_patterns, name_matches, walk


@dataclass
class PlannedPatch:
    """One module a patcher will take: every path it sits at, and who patches it."""

    paths: list[str]
    module_class: str
    patcher: str
    plugin: str
    kind: str
    node: Node = field(repr=False)
    patcher_obj: Patcher = field(repr=False)


@dataclass
class Skipped:
    """A candidate module left alone, with the reason."""

    path: str
    module_class: str
    patcher: str
    reason: str
    unsupported: bool = False  # left alone because a check raised UnsupportedError (strict=False)


@dataclass
class Stage:
    """Everything one kind (attention, quantize, other) will do in one apply."""

    kind: str
    family: str
    patches: list[PlannedPatch] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # ctx.cache for this stage's calls

    @property
    def label(self) -> str:
        """The stage as ``apply``'s keyword and value: ``attention=sdpa``, ``patch=nodropout``."""
        return f"{KEYWORDS[self.kind]}={self.family}"


KEYWORDS = {"attention": "attention", "quantize": "quantize", "other": "patch"}  # kind -> apply() keyword


TABLE_WIDTH = 100  # reports and plans fit a 100-column terminal: the last column wraps


def _table(rows: Sequence[Sequence[str]], header: Sequence[str], width: int = TABLE_WIDTH) -> str:
    """A plain-text table; the last column (notes, reasons) wraps so lines stay within ``width``
    (unless the other columns alone are wider)."""
    import textwrap

    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    indent = sum(widths[:-1]) + 2 * (len(widths) - 1)
    last = max(24, width - indent)
    widths[-1] = min(widths[-1], last)

    def render(row: Sequence[str]) -> list[str]:
        head = "  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=False))
        wrapped = textwrap.wrap(str(row[-1]), last, break_on_hyphens=False) or [""]
        lines = [(head + "  " if len(row) > 1 else "") + wrapped[0]]
        lines += [" " * indent + more for more in wrapped[1:]]
        return [line.rstrip() for line in lines]

    out = render(header) + ["  ".join("-" * w for w in widths)]
    for row in rows:
        out += render(row)
    return "\n".join(out)


@dataclass
class Plan:
    """What ``apply`` would do with the same arguments. ``str(plan)`` is a readable table."""

    stages: list[Stage]

    @property
    def patches(self) -> list[PlannedPatch]:
        """Every planned patch, all stages."""
        return [p for s in self.stages for p in s.patches]

    @property
    def skipped(self) -> list[Skipped]:
        """Every candidate left alone, all stages."""
        return [s for st in self.stages for s in st.skipped]

    def __str__(self) -> str:
        parts = []
        for stage in self.stages:
            parts.append(f"{stage.label}: {len(stage.patches)} to patch, {len(stage.skipped)} left alone")
            if stage.patches:
                rows = [(", ".join(p.paths) or "<root>", p.module_class, p.patcher, p.plugin) for p in stage.patches]
                parts.append(_table(rows, ("path", "class", "patcher", "plugin")))
            if stage.skipped:
                rows2 = [(s.path or "<root>", s.module_class, s.patcher, s.reason) for s in stage.skipped]
                parts.append(_table(rows2, ("left alone", "class", "patcher", "reason")))
        return "\n".join(parts)


def _module_device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    tensor: torch.Tensor
    for tensor in module.parameters():
        device = device or tensor.device
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in module.buffers():
        device = device or tensor.device
        if tensor.is_floating_point() and dtype is None:
            dtype = tensor.dtype
    return device, dtype


@functools.cache
def _installed_version(package: str) -> str | None:
    # Reading distribution metadata costs ~2 ms; a 70B plan asks once per linear layer.
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_requirements(patcher: Patcher, module: nn.Module) -> None:
    """Raise :class:`UnsupportedError` when ``module`` fails ``patcher.requires``."""
    req = patcher.requires
    for package, spec in req.packages.items():
        have = _installed_version(package)
        if have is None:
            raise UnsupportedError(
                f"patcher {patcher.name!r} needs the package {package}{spec}, which is not installed: "
                f"pip install '{package}{spec}'"
            )
        if Version(have) not in SpecifierSet(spec, prereleases=True):
            raise UnsupportedError(f"patcher {patcher.name!r} needs {package}{spec}, found {have}: upgrade {package}")
    device, dtype = _module_device_dtype(module)
    if req.devices and device is not None and device.type != "meta" and device.type not in req.devices:
        raise UnsupportedError(
            f"patcher {patcher.name!r} runs on {sorted(req.devices)}, the module is on {device.type}: move the model "
            f"with model.to(...) first"
        )
    if req.dtypes and dtype is not None and dtype not in req.dtypes:
        names = sorted(str(d).replace("torch.", "") for d in req.dtypes)
        raise UnsupportedError(
            f"patcher {patcher.name!r} supports dtypes {names}, the module is {str(dtype).replace('torch.', '')}: "
            f"cast the model, e.g. model.to(torch.{names[0]})"
        )
    if not req.training and module.training:
        raise UnsupportedError(
            f"patcher {patcher.name!r} is inference-only and the module is in training mode: call model.eval() first"
        )


def select_patchers(registry: Registry, kind: str, family: str) -> list[Patcher]:
    """Patchers of ``kind`` that ``family`` selects, highest priority first.

    ``family`` is a family name (``"int8"``), ``"auto"`` (every patcher of that kind), or scoped to
    one plugin as ``"plugin:family"`` (``"bnb:int8"``: only plugin ``bnb``'s, when another plugin
    offers a family of the same name). Raises :class:`UnsupportedError` naming what is available,
    and the install hint when an unavailable plugin offers the family.
    """
    plugin, _, bare = family.rpartition(":")
    candidates = [
        p
        for p in registry.patchers()
        if p.kind == kind and (bare == "auto" or p.family == bare) and (not plugin or p.plugin == plugin)
    ]
    if not candidates:
        keyword = KEYWORDS[kind]
        known = sorted({p.family for p in registry.patchers() if p.kind == kind})
        offered = [
            p
            for p in registry.unavailable_patchers()
            if p.kind == kind and p.family == bare and (not plugin or p.plugin == plugin)
        ]
        if offered:
            info = {i.name: i for i in registry.plugins()}.get(offered[0].plugin)
            why = info.reason if info is not None else "unavailable"
            raise UnsupportedError(
                f"{keyword}={family!r} is offered by plugin {offered[0].plugin!r}, which is unavailable here: {why}"
            )
        raise UnsupportedError(
            f"no {keyword} patcher of family {family!r} is registered; available: {known or 'none'}. "
            f"Run `patchkit plugins` to see which plugins loaded and why others did not"
        )
    return candidates


def plan_stage(
    root: nn.Module,
    kind: str,
    family: str,
    patchers: Sequence[Patcher],
    *,
    only: Sequence[Pattern],
    skip: Sequence[Pattern],
    strict: bool,
    backend: str,
    options: Mapping[str, Any],
    registry: Registry,
) -> Stage:
    """Choose a patcher for each module of ``root`` for one kind, running every check; mutate nothing."""
    stage = Stage(kind, family)
    taken: set[str] = set()  # paths selected in this stage: their descendants are not visited

    def inside_taken(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in taken for i in range(1, len(parts)))

    for node in walk(root):
        module = node.module
        candidates = [p for p in patchers if p.matches(module, node.paths[0], root)]
        if not candidates or all(inside_taken(path) for path in node.paths):
            continue
        path = node.paths[0]
        cls = type(module).__name__
        skipped_by = next((pat for p in node.paths if (pat := name_matches(p, skip))), None)
        if skipped_by is not None:
            stage.skipped.append(Skipped(path, cls, candidates[0].name, f"skip pattern {_show(skipped_by)}"))
            continue
        if only and not any(name_matches(p, only) for p in node.paths):
            stage.skipped.append(Skipped(path, cls, candidates[0].name, "not selected by `only`"))
            continue
        chosen, reasons, first_error = _choose(candidates, module, root, node, backend, options, registry, stage.cache)
        if chosen is None:
            if first_error is not None and strict:
                raise UnsupportedError(f"cannot patch {path or '<root>'} ({cls}): {first_error}") from first_error
            stage.skipped.append(Skipped(path, cls, candidates[0].name, "; ".join(reasons), first_error is not None))
            continue
        stage.patches.append(PlannedPatch(list(node.paths), cls, chosen.name, chosen.plugin, kind, node, chosen))
        taken.update(node.paths)
    return stage


def _choose(
    candidates: Sequence[Patcher],
    module: nn.Module,
    root: nn.Module,
    node: Node,
    backend: str,
    options: Mapping[str, Any],
    registry: Registry,
    cache: dict[Any, Any],
) -> tuple[Patcher | None, list[str], UnsupportedError | None]:
    """The highest-priority candidate whose checks pass; a tie between two passing ones is a conflict."""
    reasons: list[str] = []
    first_error: UnsupportedError | None = None
    chosen: Patcher | None = None
    for patcher in candidates:
        if chosen is not None and patcher.priority < chosen.priority:
            break
        ctx = PatchContext(
            root,
            patcher,
            paths=tuple(node.paths),
            options=options,
            backend=backend,
            registry=registry,
            cache=cache,
        )
        try:
            check_requirements(patcher, module)
            reason = patcher.check(module, ctx) if patcher.check is not None else None
        except UnsupportedError as exc:
            first_error = first_error or exc
            reasons.append(f"{patcher.name}: {exc}")
            continue
        if reason is not None:
            reasons.append(f"{patcher.name}: {reason}")
            continue
        if chosen is not None:
            raise ConflictError(
                f"patchers {chosen.name!r} (plugin {chosen.plugin!r}) and {patcher.name!r} (plugin {patcher.plugin!r}) "
                f"both claim {node.paths[0] or '<root>'} ({type(module).__name__}) with priority {patcher.priority}; "
                f"give one a higher priority, or disable a plugin with PATCHKIT_DISABLE_PLUGINS"
            )
        chosen = patcher
    return chosen, reasons, first_error


def _show(pattern: Pattern) -> str:
    return f"re:{pattern.pattern}" if not isinstance(pattern, str) else repr(pattern)


def requested_stages(
    attention: str | None, quantize: str | None, patch: str | Iterable[str] | None
) -> list[tuple[str, str]]:
    """(kind, family) pairs in the order apply runs them: attention, then quantize, then others."""
    stages: list[tuple[str, str]] = []
    if attention is not None:
        stages.append(("attention", attention))
    if quantize is not None:
        stages.append(("quantize", quantize))
    if patch is not None:
        for family in [patch] if isinstance(patch, str) else patch:
            stages.append(("other", family))
    return stages


def plan_family(
    root: nn.Module,
    kind: str,
    family: str,
    only: Sequence[Pattern],
    skip: Sequence[Pattern],
    strict: bool,
    backend: str,
    options: Mapping[str, Any],
    registry: Registry,
) -> Stage:
    """:func:`plan_stage` with the patchers ``family`` selects (a later stage of an apply or a load
    is planned on the tree as the previous stage left it)."""
    return plan_stage(
        root,
        kind,
        family,
        select_patchers(registry, kind, family),
        only=only,
        skip=skip,
        strict=strict,
        backend=backend,
        options=options,
        registry=registry,
    )


def build_plan(
    root: nn.Module,
    stages: Sequence[tuple[str, str]],
    *,
    only: Any,
    skip: Any,
    strict: bool,
    backend: str,
    options: Mapping[str, Any],
    registry: Registry,
) -> Plan:
    """Plan every requested stage against ``root`` as it is now."""
    check_options(registry, stages, options)
    only_p, skip_p = compile_patterns(only), compile_patterns(skip)
    planned = []
    for kind, family in stages:
        patchers = select_patchers(registry, kind, family)
        stage = plan_stage(
            root,
            kind,
            family,
            patchers,
            only=only_p,
            skip=skip_p,
            strict=strict,
            backend=backend,
            options=options,
            registry=registry,
        )
        if strict and not stage.patches:
            why = "; ".join(f"{s.path}: {s.reason}" for s in stage.skipped[:3])
            raise UnsupportedError(
                f"{KEYWORDS[kind]}={family!r} found nothing to patch in {type(root).__name__}"
                + (f" ({why})" if why else f"; patchers tried: {[p.name for p in patchers]}")
                + ". Pass strict=False to accept a no-op"
            )
        planned.append(stage)
    return Plan(planned)


def check_options(registry: Registry, stages: Sequence[tuple[str, str]], options: Mapping[str, Any]) -> None:
    """Raise :class:`UnsupportedError` for a keyword option no patcher of the requested stages reads.

    Patchers declare what they read (``Patcher.options``); one that declares nothing (an older
    plugin) switches the check off, since it may read anything.
    """
    if not options:
        return
    declared: dict[str, str] = {}
    for kind, family in stages:
        for patcher in select_patchers(registry, kind, family):
            if patcher.options is None:
                return
            declared.update({name: patcher.name for name in patcher.options})
    unknown = sorted(set(options) - set(declared))
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, list(declared), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    families = ", ".join(f"{KEYWORDS[k]}={f!r}" for k, f in stages)
    raise UnsupportedError(
        f"unknown option {name!r} for {families}.{hint} Valid options: {sorted(declared) or 'none'} "
        "(see `patchkit plugins` and the patcher docs)"
    )
