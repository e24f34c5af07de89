"""Planning: which patcher takes which module, and why the others are left alone. Changes nothing."""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from . import keep
from .errors import ConflictError, PatchError, UnsupportedError
from .journal import Journal
from .patcher import PatchContext, Patcher, Phase
from .registry import Registry, default_registry
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
    options: dict[str, Any] = field(default_factory=dict, repr=False)  # what this stage's patchers see

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


def plan_stage(root: nn.Module, request: Request, index: int, phase: Phase) -> Stage:
    """Choose a patcher for each module of ``root`` for stage ``index`` of ``request``, running every
    check (``phase``: ``"plan"`` for ``patchkit.plan``, ``"check"`` for apply and load); mutate nothing."""
    kind, family = request.stages[index]
    patchers = select_patchers(request.registry, kind, family)
    stage = Stage(kind, family, options=request.options[index])
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
        skipped_by = next((pat for p in node.paths if (pat := name_matches(p, request.skip))), None)
        if skipped_by is not None:
            stage.skipped.append(Skipped(path, cls, candidates[0].name, f"skip pattern {_show(skipped_by)}"))
            continue
        if request.only and not any(name_matches(p, request.only) for p in node.paths):
            stage.skipped.append(Skipped(path, cls, candidates[0].name, "not selected by `only`"))
            continue
        chosen, reasons, first_error = _choose(candidates, root, node, stage, request, phase)
        if chosen is None:
            if first_error is not None and request.strict:
                raise UnsupportedError(f"cannot patch {path or '<root>'} ({cls}): {first_error}") from first_error
            stage.skipped.append(Skipped(path, cls, candidates[0].name, "; ".join(reasons), first_error is not None))
            continue
        stage.patches.append(PlannedPatch(list(node.paths), cls, chosen.name, chosen.plugin, kind, node, chosen))
        taken.update(node.paths)
    return stage


def check_one(patcher: Patcher, module: nn.Module, ctx: PatchContext) -> str | None:
    """``patcher``'s requirements and ``check`` for ``module``: ``None`` to go ahead, or the reason to
    leave it alone; raises :class:`UnsupportedError` (a requirement, or the check itself)."""
    check_requirements(patcher, module)
    if patcher.check is None:
        return None
    with plugin_call(patcher, ctx.phase):
        return patcher.check(module, ctx)


def _choose(
    candidates: Sequence[Patcher], root: nn.Module, node: Node, stage: Stage, request: Request, phase: Phase
) -> tuple[Patcher | None, list[str], UnsupportedError | None]:
    """The highest-priority candidate whose checks pass; a tie between two passing ones is a conflict."""
    reasons: list[str] = []
    first_error: UnsupportedError | None = None
    chosen: Patcher | None = None
    for patcher in candidates:
        if chosen is not None and patcher.priority < chosen.priority:
            break
        ctx = new_context(root, patcher, stage, request, phase, paths=tuple(node.paths))
        try:
            reason = check_one(patcher, node.module, ctx)
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
                f"both claim {node.paths[0] or '<root>'} ({type(node.module).__name__}) with priority "
                f"{patcher.priority}; give one a higher priority, or disable a plugin with PATCHKIT_DISABLE_PLUGINS"
            )
        chosen = patcher
    return chosen, reasons, first_error


def new_context(
    root: nn.Module,
    patcher: Patcher,
    stage: Stage,
    request: Request,
    phase: Phase,
    *,
    paths: tuple[str, ...] = (),
    journal: Journal | None = None,
    commits: list[Callable[[], None]] | None = None,
    selected: tuple[str, ...] = (),
    sources: Mapping[int, tuple[Any, Any]] | None = None,
) -> PatchContext:
    """The one place a :class:`PatchContext` is made: what a callback of ``stage`` sees in ``phase``.

    ``plan`` / ``check`` contexts are read-only (no journal); ``build`` / ``setup`` ones carry the
    journal and the commit list. Every context of a stage shares the stage's ``cache`` and options.
    """
    return PatchContext(
        root,
        patcher,
        phase=phase,
        registry=request.registry,
        paths=paths,
        options=stage.options,
        backend=request.backend,
        journal=journal,
        selected=selected,
        cache=stage.cache,
        commits=commits,
        sources=sources,
    )


@contextlib.contextmanager
def plugin_call(patcher: Patcher, phase: str) -> Iterator[None]:
    """Tag an unexpected exception from a plugin's callback with where it came from
    (``exc.patchkit_origin``: the CLI prints it as one line naming the plugin)."""
    try:
        yield
    except PatchError:
        raise
    except Exception as exc:
        if getattr(exc, "patchkit_origin", None) is None:
            with contextlib.suppress(AttributeError, TypeError):  # exceptions that refuse new attributes
                exc.patchkit_origin = f"plugin {patcher.plugin or '?'!r}, patcher {patcher.name!r}, in {phase}"  # type: ignore[attr-defined]
        raise


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


CORE_OPTIONS = {keep.OPTION: keep.DESCRIPTION}  # options the core itself reads, valid for every stage


@dataclass
class Request:
    """One ``apply`` / ``plan`` / ``from_pretrained`` request, validated once.

    ``options[i]``: the options stage ``i`` sees: the ones its patchers declare (every option when
    one of them declares nothing, ``options=None``) plus the core's (``keep_original``).
    """

    stages: list[tuple[str, str]]
    registry: Registry
    backend: str = "auto"
    strict: bool = True
    only: list[Pattern] = field(default_factory=list)
    skip: list[Pattern] = field(default_factory=list)
    options: list[dict[str, Any]] = field(default_factory=list)
    keep_original: str | None = None

    @classmethod
    def make(
        cls,
        *,
        attention: str | None = None,
        quantize: str | None = None,
        patch: str | Iterable[str] | None = None,
        registry: Registry | None = None,
        backend: str = "auto",
        strict: bool = True,
        only: Any = None,
        skip: Any = None,
        options: Mapping[str, Any] | None = None,
    ) -> Request:
        """The request of one ``apply`` / ``plan`` / ``from_pretrained`` call, from its arguments:
        stages in run order, the registry (default: the installed plugins), patterns, option names
        and ``keep_original`` validated, the options split by stage."""
        stages = requested_stages(attention, quantize, patch)
        registry = registry if registry is not None else default_registry()
        options = dict(options or {})
        keep_original = keep.check_value(options.get(keep.OPTION))
        return cls(
            stages,
            registry,
            backend,
            strict,
            compile_patterns(only, "only"),
            compile_patterns(skip, "skip"),
            stage_options(registry, stages, options),
            keep_original,
        )


def build_plan(root: nn.Module, request: Request, phase: Phase) -> Plan:
    """Plan every requested stage against ``root`` as it is now."""
    planned = []
    for index, (kind, family) in enumerate(request.stages):
        stage = plan_stage(root, request, index, phase)
        if request.strict and not stage.patches:
            why = "; ".join(f"{s.path}: {s.reason}" for s in stage.skipped[:3])
            tried = [p.name for p in select_patchers(request.registry, kind, family)]
            raise UnsupportedError(
                f"{KEYWORDS[kind]}={family!r} found nothing to patch in {type(root).__name__}"
                + (f" ({why})" if why else f"; patchers tried: {tried}")
                + ". Pass strict=False to accept a no-op"
            )
        planned.append(stage)
    return Plan(planned)


def stage_options(
    registry: Registry, stages: Sequence[tuple[str, str]], options: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Each stage's options; :class:`UnsupportedError` for an option no stage reads.

    A stage reads what its patchers declare (``Patcher.options``); a stage with a patcher that
    declares nothing (an older plugin) reads every option. The core's own options (``keep_original``)
    reach every stage.
    """
    per_stage: list[dict[str, Any]] = []
    claimed: set[str] = set(CORE_OPTIONS)
    declared: dict[str, str] = {}
    for kind, family in stages:
        keys: set[str] = set(CORE_OPTIONS)
        for patcher in select_patchers(registry, kind, family):
            if patcher.options is None:
                keys |= set(options)
            else:
                keys |= set(patcher.options)
                declared.update({name: patcher.name for name in patcher.options})
        claimed |= keys
        per_stage.append({k: v for k, v in options.items() if k in keys})
    unknown = sorted(set(options) - claimed)
    if unknown:
        name = unknown[0]
        valid = sorted(set(declared) | set(CORE_OPTIONS))
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        families = ", ".join(f"{KEYWORDS[k]}={f!r}" for k, f in stages)
        raise UnsupportedError(
            f"unknown option {name!r} for {families}.{hint} Valid options: {valid} "
            "(see `patchkit plugins` and the patcher docs)"
        )
    return per_stage
