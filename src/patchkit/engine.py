"""apply / reverse / plan / patched: the engine. Validate everything, then mutate; undo on failure."""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import ConflictError, NotPatchedError, PatchedModelError, PatchError, UnsupportedError
from .journal import JOURNAL_ATTR, Journal, Layer, find_journal, find_journals
from .patcher import PatchContext, Patcher
from .planning import Plan, Skipped, Stage, _table, build_plan, plan_family, requested_stages
from .registry import Registry, default_registry
from .tree import compile_patterns

GUARDED_METHODS = ("save_pretrained", "push_to_hub")


class PatchkitWarning(UserWarning):
    """A module was left unpatched because a requirement was not met (``strict=False``)."""


@dataclass
class Swap:
    """One patched module in a report.

    ``paths``: every qualified name the module sits at (``list[str]``; ``""`` is the root).
    ``original``: its class name (``str``). ``replacement``: the replacement's class name, or
    ``"<original class> (in place)"`` when ``build`` returned ``None``. ``patcher`` and ``plugin``:
    names (``str``; ``plugin:patcher`` is the scoped name). ``notes``: ``list[str]`` the patcher
    added with ``ctx.note`` (reverse may append more, e.g. a dequantization error).
    """

    paths: list[str]
    original: str
    replacement: str
    patcher: str
    plugin: str
    notes: list[str] = field(default_factory=list)


@dataclass
class PatchReport:
    """What one ``apply`` did. ``str(report)`` is a readable table, 100 columns wide (notes wrap).

    ``applied``: :func:`applied`-style keys (``attention``, ``quantize``, ``patch:<family>``) to
    families. ``swaps``: one :class:`Swap` per patched module. ``skipped``: one
    :class:`~patchkit.planning.Skipped` per candidate left alone. ``notes``: model-level lines from
    the patchers' ``setup``.
    """

    applied: dict[str, str]
    swaps: list[Swap]
    skipped: list[Skipped]
    notes: list[str] = field(default_factory=list)  # model-level notes from patchers' setup()

    def __str__(self) -> str:
        what = ", ".join(applied_label(k, v) for k, v in self.applied.items())
        parts = [f"patchkit applied {what}: {len(self.swaps)} patched, {len(self.skipped)} left alone"]
        parts += [f"  {note}" for note in self.notes]
        if self.swaps:
            rows = [
                (
                    ", ".join(s.paths) or "<root>",
                    s.replacement if s.replacement.endswith("(in place)") else f"{s.original} -> {s.replacement}",
                    f"{s.plugin}:{s.patcher}" if s.plugin else s.patcher,
                    "; ".join(s.notes),
                )
                for s in self.swaps
            ]
            parts.append(_table(rows, ("path", "change", "patcher", "notes")))
        if self.skipped:
            rows2 = [(s.path or "<root>", s.module_class, s.patcher, s.reason) for s in self.skipped]
            parts.append(_table(rows2, ("left alone", "class", "patcher", "reason")))
        return "\n".join(parts)


def plan(
    model: nn.Module,
    *,
    attention: str | None = None,
    quantize: str | None = None,
    patch: str | Iterable[str] | None = None,
    backend: str = "auto",
    only: Any = None,
    skip: Any = None,
    strict: bool = True,
    registry: Registry | None = None,
    **options: Any,
) -> Plan:
    """What :func:`apply` would do with the same arguments, with every check run and nothing changed.

    Works on models on the ``meta`` device. Raises what ``apply`` would raise.
    """
    registry = registry or default_registry()
    stages = requested_stages(attention, quantize, patch)
    _check_not_applied(model, stages)
    return build_plan(
        model,
        stages,
        only=only,
        skip=skip,
        strict=strict,
        backend=backend,
        options=options,
        registry=registry,
    )


def apply(
    model: nn.Module,
    *,
    attention: str | None = None,
    quantize: str | None = None,
    patch: str | Iterable[str] | None = None,
    backend: str = "auto",
    only: Any = None,
    skip: Any = None,
    strict: bool = True,
    registry: Registry | None = None,
    **options: Any,
) -> PatchReport:
    """Patch ``model`` in place and return a report of every swap and every candidate left alone.

    ``attention`` names an attention family (``"flash2"``, ``"sdpa"``, ``"auto"``), ``quantize`` a
    quantizer (``"int8"``, ``"fp4"``, ``"nf4"``), ``patch`` any other families. ``only``/``skip``
    filter by qualified name (exact or prefix at a module boundary, or regex via ``re.compile`` /
    ``"re:..."``). ``strict=False`` leaves unsupported modules alone instead of raising. Extra
    keyword ``options`` reach the patchers. Everything is checked before anything changes; if a
    patcher fails midway, everything done so far is undone and the error re-raised.
    """
    registry = registry or default_registry()
    stages = requested_stages(attention, quantize, patch)
    if not stages:
        raise ValueError("nothing to apply: pass attention=..., quantize=... or patch=...")
    _check_not_applied(model, stages)
    with _gc_paused():
        return _apply(model, stages, backend, only, skip, strict, registry, options)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # Swapping thousands of modules allocates many small objects; cyclic GC passes over a large
    # model's object graph made apply superlinear in depth (measured: 5x per doubling at 320 layers).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _apply(
    model: nn.Module,
    stages: list[tuple[str, str]],
    backend: str,
    only: Any,
    skip: Any,
    strict: bool,
    registry: Registry,
    options: dict[str, Any],
) -> PatchReport:
    ddp = _check_wrappers(model)
    # Validate every stage up front, on the model as it is; nothing has changed if this raises.
    upfront = build_plan(
        model, stages, only=only, skip=skip, strict=strict, backend=backend, options=options, registry=registry
    )
    holder, journal = _journal_for(model)
    layer = journal.begin({_stage_key(k, f): f for k, f in stages})
    swaps: list[Swap] = []
    skipped: list[Skipped] = []
    notes: list[str] = []
    commits: list[Any] = []  # destructive steps, run once every build and setup succeeded
    try:
        if not journal.base.entries:
            _guard_saving(model, journal)  # first, so that it is undone last
        only_p, skip_p = compile_patterns(only), compile_patterns(skip)
        for index, (kind, family) in enumerate(stages):
            # Later stages are re-planned on the tree as the previous stage left it.
            stage = (
                upfront.stages[0]
                if index == 0
                else plan_family(model, kind, family, only_p, skip_p, strict, backend, options, registry)
            )
            swaps += _run_stage(model, stage, journal, backend, options, registry, notes, ddp, commits)
            stage.cache.clear()  # the contexts stay in the journal; what plugins cached must not
            layer.patchers.update({p.patcher_obj.qualname: p.patcher_obj for p in stage.patches})
            skipped += stage.skipped
    except BaseException as exc:
        _roll_back(holder, journal, layer, exc)
        raise
    if not swaps:  # a no-op apply (strict=False, nothing matched) leaves no trace
        _roll_back(holder, journal, layer, None)
    for step in commits:
        # Past this point the apply has succeeded: a step that raises (an interrupt) leaves the
        # model patched and consistent, with only part of the memory freed.
        step()
    report = PatchReport(dict(layer.applied), swaps, skipped, notes)
    unsupported = [s for s in skipped if s.unsupported]
    if unsupported:  # strict=False: fall back loudly, never silently
        lines = "\n".join(f"  {s.path or '<root>'} ({s.module_class}): {s.reason}" for s in unsupported[:10])
        more = f"\n  ... and {len(unsupported) - 10} more" if len(unsupported) > 10 else ""
        warnings.warn(
            f"patchkit left {len(unsupported)} module(s) unpatched (strict=False):\n{lines}{more}",
            PatchkitWarning,
            stacklevel=3,
        )
    layer.report = report
    return report


def _roll_back(holder: nn.Module, journal: Journal, layer: Layer, cause: BaseException | None) -> None:
    """Undo a failed (or no-op) apply's layer; the journal goes when nothing else is recorded."""
    try:
        journal.undo(layer)
    except BaseException as error:
        if cause is None:
            raise
        raise PatchError(
            f"apply failed ({type(cause).__name__}: {cause}) and undoing it failed too ({type(error).__name__}: "
            f"{error}); the journal still records what is patched: fix the cause and call patchkit.reverse(model)"
        ) from cause
    if not journal.layers:
        _drop_journal(holder)


def _run_stage(
    root: nn.Module,
    stage: Stage,
    journal: Journal,
    backend: str,
    options: Any,
    registry: Registry,
    notes: list[str],
    ddp: bool,
    commits: list[Any],
) -> list[Swap]:
    swaps: list[Swap] = []
    by_patcher: dict[str, tuple[Patcher, list[str]]] = {}
    for planned in stage.patches:
        patcher, node = planned.patcher_obj, planned.node
        ctx = PatchContext(
            root,
            patcher,
            paths=tuple(node.paths),
            options=options,
            backend=backend,
            journal=journal,
            registry=registry,
            cache=stage.cache,
            commits=commits,
        )
        replacement = patcher.build(node.module, ctx)
        if replacement is None:
            new_class = type(node.module).__name__ + " (in place)"
        else:
            if not isinstance(replacement, nn.Module):
                raise TypeError(f"patcher {patcher.name!r} build() returned {replacement!r}, not an nn.Module or None")
            if ddp and not _shares_parameters(node.module, replacement):
                raise UnsupportedError(
                    f"patcher {patcher.name!r} gives {planned.paths[0]} new parameters, but the model is already "
                    "wrapped in DistributedDataParallel, which registered the old ones: patch the model before "
                    "wrapping it (nothing was changed)"
                )
            journal.replace(node.module, replacement, node.edges, patcher, ctx)
            new_class = type(replacement).__name__
        swaps.append(Swap(list(node.paths), planned.module_class, new_class, patcher.name, patcher.plugin, ctx.notes))
        by_patcher.setdefault(patcher.qualname, (patcher, []))[1].extend(node.paths)
    run_setups(root, by_patcher, stage, journal, backend, options, registry, notes, commits)
    return swaps


def run_setups(
    root: nn.Module,
    by_patcher: dict[str, tuple[Patcher, list[str]]],
    stage: Stage,
    journal: Journal,
    backend: str,
    options: Any,
    registry: Registry,
    notes: list[str],
    commits: list[Any],
) -> None:
    """Run each patcher's ``setup`` once, with the paths it swapped in this stage (``ctx.selected``)."""
    for patcher, paths in by_patcher.values():
        if patcher.setup is not None:
            ctx = PatchContext(
                root,
                patcher,
                options=options,
                backend=backend,
                journal=journal,
                selected=tuple(paths),
                registry=registry,
                cache=stage.cache,
                commits=commits,
            )
            patcher.setup(root, ctx)
            notes += [f"{patcher.name}: {note}" for note in ctx.notes]


def _shares_parameters(original: nn.Module, replacement: nn.Module) -> bool:
    mine = {id(p) for p in original.parameters()}
    return all(id(p) in mine for p in replacement.parameters())


def _check_wrappers(model: nn.Module) -> bool:
    """Refuse FSDP (it flattens and shards parameters: no module swap can be exact through it);
    return whether DDP wraps the model (then replacements must keep the parameters DDP registered)."""
    fsdp_types: tuple[type, ...] = ()
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        fsdp_types = (FullyShardedDataParallel, FSDPModule)
    except ImportError:  # torch built without distributed
        pass
    ddp = False
    for module in model.modules():
        if fsdp_types and isinstance(module, fsdp_types):
            raise UnsupportedError(
                f"{type(module).__name__} at the model's root or inside it shards parameters; patchkit cannot swap "
                "modules through it: patch the model before wrapping it in FSDP"
            )
        ddp = ddp or isinstance(module, DistributedDataParallel)
    return ddp


def reverse(model: nn.Module) -> nn.Module:
    """Undo everything patchkit did to ``model`` and to every module inside it, last change first;
    returns ``model``.

    Works on the patched model itself or on a wrapper holding it (PEFT, TRL, DDP), and on a
    container whose parts were patched separately. Afterwards the model holds the same module,
    parameter and buffer objects, hooks and flags as before apply; a quantizer's weights come back
    bit-identical only with ``keep_original`` (else dequantized, its error is in the report).

    Atomic: every check and every patcher's restore runs first (kept files read, weights
    gathered) and nothing changes if one fails. If undoing still fails midway, the model stays
    patched and guarded for what is left: fix the cause and call ``reverse`` again.
    Raises :class:`NotPatchedError` if there is nothing to undo.
    """
    found = find_journals(model)
    if not found:
        raise NotPatchedError(
            f"{type(model).__name__} is not patched by patchkit (no journal on it or its submodules): "
            "nothing to reverse"
        )
    for _, journal in found:
        journal.check()
    with _gc_paused():
        prepared = [(holder, journal, journal.prepare()) for holder, journal in found]
        for holder, journal, ready in prepared:
            journal.commit(ready)
            _drop_journal(holder)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, **kwargs: Any) -> Iterator[PatchReport]:
    """Apply on entry, undo exactly that apply on exit (also when the block raises).

    Patches applied inside the block stay. If one of them changed the same modules or attributes,
    the exit raises :class:`ConflictError` and undoes nothing (reverse the inner apply first). A
    ``reverse`` inside the block leaves nothing to undo at exit.
    """
    report = apply(model, **kwargs)
    found = find_journal(model) if report.swaps else None
    layer = found[1].layers[-1] if found else None
    try:
        yield report
    finally:
        if found is not None and layer is not None and any(other is layer for other in found[1].layers):
            holder, journal = found
            problem = journal.independent(layer)
            if problem is not None:
                raise ConflictError(
                    f"cannot undo this patched() block's {report.applied}: {problem}. Reverse that apply before "
                    "leaving the block"
                )
            journal.check([layer])
            journal.undo(layer)
            if not journal.layers:
                _drop_journal(holder)


def is_patched(model: nn.Module) -> bool:
    """True when patchkit has changes recorded on ``model`` (or on a module inside it)."""
    found = find_journal(model)
    return found is not None


def applied(model: nn.Module) -> dict[str, str]:
    """Kind -> family of everything currently applied to ``model`` (empty when unpatched)."""
    found = find_journal(model)
    return found[1].applied_kinds() if found else {}


def save_pretrained(model: nn.Module, path: str | os.PathLike[str], *, quantized: bool = False, **kwargs: Any) -> None:
    """Save ``model`` with its host's ``save_pretrained``.

    Unpatched, or patched only by patchers whose checkpoint equals the original (attention
    patchers): exactly what the unpatched ``model.save_pretrained(path, **kwargs)`` writes (tensors
    and config values as before patching). Patched with a quantizer and ``quantized=True``: the
    quantizer's ``save`` writes a checkpoint the host reloads quantized (for bitsandbytes:
    ``from_pretrained`` with a ``BitsAndBytesConfig``); the model is not changed. Patched
    otherwise: :class:`PatchedModelError` naming both ways out.
    """
    found = find_journals(model)
    if not found or (not quantized and all(p.saves_as_original for _, j in found for p in j.patchers())):
        _save_as_original(model, "save_pretrained", (path,), kwargs)
        return
    if not quantized:
        raise PatchedModelError(_refusal(model, "save_pretrained"))
    savers = {p.save for _, j in found for p in j.patchers() if p.kind == "quantize" and p.save}
    if not savers:
        raise UnsupportedError(
            "quantized=True needs a quantizer applied whose patcher can write a checkpoint; none is: "
            f"applied {applied(model)}"
        )
    if len(savers) > 1:
        raise UnsupportedError("several quantizers with different checkpoint writers are applied; save is ambiguous")
    savers.pop()(model, path)


def _save_as_original(module: nn.Module, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call the class's ``name`` (save_pretrained / push_to_hub) with every journaled attribute of a
    non-module object (a config field) shown as it was before patching."""
    method = getattr(type(module), name)
    with contextlib.ExitStack() as stack:
        for _, journal in find_journals(module) or _journals_above(module):
            stack.enter_context(journal.attributes_as_before(keep=lambda obj: isinstance(obj, nn.Module)))
        return method(module, *args, **kwargs)


def _journals_above(module: nn.Module) -> list[tuple[nn.Module, Journal]]:
    guard = module.__dict__.get("save_pretrained")
    root = guard.root if isinstance(guard, _SaveGuard) else None
    return find_journals(root) if root is not None else []


def _journal_for(model: nn.Module) -> tuple[nn.Module, Journal]:
    found = find_journal(model)
    if found is not None:
        return found
    journal = Journal()
    model.__dict__[JOURNAL_ATTR] = journal
    return model, journal


def _drop_journal(holder: nn.Module) -> None:
    holder.__dict__.pop(JOURNAL_ATTR, None)


def _stage_key(kind: str, family: str) -> str:
    return kind if kind != "other" else f"patch:{family}"


def applied_label(key: str, family: str) -> str:
    """How reports, plans and errors name an applied stage: the keyword of ``apply`` and its value
    (``attention=sdpa``, ``quantize=int8``, ``patch=nodropout``), for an :func:`applied` key."""
    return f"{key.split(':', 1)[0]}={family}"


def _check_not_applied(model: nn.Module, stages: list[tuple[str, str]]) -> None:
    keys = [_stage_key(kind, family) for kind, family in stages]
    if len(set(keys)) != len(keys):
        raise ConflictError(f"each kind may be requested once per apply, got {stages}")
    current = applied(model)
    for (_, family), key in zip(stages, keys, strict=False):
        if key in current:
            what = applied_label(key, current[key])
            again = " again" if current[key] == family else ""
            raise ConflictError(
                f"{what} is already applied to this model; call patchkit.reverse(model) before applying "
                f"{applied_label(key, family)}{again}"
            )


def _guard_saving(model: nn.Module, journal: Journal) -> None:
    """Guard save_pretrained / push_to_hub on the model and on every module inside it that has them
    (the inner model of a torch.compile / DDP / PEFT wrapper, a base model). The guard is a
    journaled instance attribute in the journal's base (undone with the last layer): reverse
    deletes it and the class method shows through."""
    for module in model.modules():  # modules() yields each shared module once
        for name in GUARDED_METHODS:
            if callable(getattr(type(module), name, None)):
                journal.set_attr(module, name, _SaveGuard(name, module, model), base=True)


class _SaveGuard:
    """The instance attribute standing in for ``save_pretrained`` / ``push_to_hub`` while patched.

    Saves what the unpatched model would save when every applied patcher says its checkpoint is
    the original's (attention patchers); refuses otherwise. An object, not a closure: a deep copy
    of the model gets a guard pointing at the copy.
    """

    def __init__(self, name: str, module: nn.Module, root: nn.Module) -> None:
        self.name, self.module, self.root = name, module, root

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        found = find_journals(self.root)
        if all(p.saves_as_original for _, journal in found for p in journal.patchers()):
            return _save_as_original(self.module, self.name, args, kwargs)
        raise PatchedModelError(_refusal(self.root, self.name, self.module))


def _refusal(root: nn.Module, name: str, module: nn.Module | None = None) -> str:
    kinds = ", ".join(applied_label(k, v) for k, v in applied(root).items()) or "patches"
    owner = type(module if module is not None else root).__name__
    return (
        f"{owner}.{name}() refused: the model is patched by patchkit ({kinds}) and its checkpoint would differ "
        f"from the original's. Call patchkit.reverse(model) first, then {name}() writes the original model; or "
        "write the quantized checkpoint with patchkit.save_pretrained(model, path, quantized=True)"
    )
