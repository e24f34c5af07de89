"""One pipeline for ``apply`` and ``from_pretrained``: plan each stage, build, set up, commit.

``apply``:            plan every stage on the model as it is (nothing changes if that raises), open
                      a journal layer, then per stage: plan it on the tree the previous stage left,
                      build every planned patch, run the setups; install the guards; run the commit
                      steps with interrupts held. Any failure before the commit rolls the layer back
                      without calling a single ``restore`` (nothing destructive ran).
``from_pretrained``:  the same :class:`Run`, except that the quantize stage's patches are checked
                      again and built one by one as their tensors arrive (:meth:`Run.build_patch`
                      with ``recheck``), their commit steps run at once (the model is new).
"""

from __future__ import annotations

import contextlib
import textwrap
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import guards, keep
from .atomic import interrupts_held, run_all
from .errors import ConflictError, PatchError, UnsupportedError
from .journal import JOURNAL_ATTR, Journal, Layer, _Replace, applied_label, find_journal
from .patcher import Patcher
from .planning import (
    PlannedPatch,
    Request,
    Skipped,
    Stage,
    _table,
    check_one,
    new_context,
    plan_stage,
    plugin_call,
)


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
        # Notes are prose: wrapped to the report's width (a terminal, a log line), continued indented.
        parts += [textwrap.fill(note, 100, initial_indent="  ", subsequent_indent="    ") for note in self.notes]
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


def stage_key(kind: str, family: str) -> str:
    """The :func:`patchkit.applied` key of a stage: its kind, or ``patch:<family>`` for other patchers."""
    return kind if kind != "other" else f"patch:{family}"


def check_not_applied(model: nn.Module, stages: list[tuple[str, str]]) -> None:
    """:class:`ConflictError` when a kind is requested twice, or is already applied to ``model``."""
    keys = [stage_key(kind, family) for kind, family in stages]
    if len(set(keys)) != len(keys):
        raise ConflictError(f"each kind may be requested once per apply, got {stages}")
    found = find_journal(model)
    current = found[1].applied_kinds() if found else {}
    for (_, family), key in zip(stages, keys, strict=False):
        if key in current:
            what = applied_label(key, current[key])
            again = " again" if current[key] == family else ""
            raise ConflictError(
                f"{what} is already applied to this model; call patchkit.reverse(model) before applying "
                f"{applied_label(key, family)}{again}"
            )


class Run:
    """One apply (or load) of a request onto a model: its journal layer and what it did."""

    def __init__(self, model: nn.Module, request: Request, *, ddp: bool = False) -> None:
        self.model, self.request, self.ddp = model, request, ddp
        self.holder: nn.Module = model
        self.journal: Journal | None = None
        self.layer: Layer | None = None
        self.swaps: list[Swap] = []
        self.skipped: list[Skipped] = []
        self.notes: list[str] = []
        self.commits: list[Callable[[], None]] = []
        self._built: dict[int, dict[str, tuple[Patcher, list[str]]]] = {}  # id(stage) -> patcher -> paths

    # -- the journal layer --------------------------------------------------------------------------------
    def open_layer(self) -> None:
        """Attach the journal (if the model has none) and open this run's layer."""
        found = find_journal(self.model)
        self.holder = found[0] if found is not None else self.model
        if found is None:
            self.model.__dict__[JOURNAL_ATTR] = Journal()
        self.journal = self.holder.__dict__[JOURNAL_ATTR]
        self.layer = self.journal.begin({stage_key(k, f): f for k, f in self.request.stages})

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Open this run's journal layer. On any exception, an interrupt included (also one that lands
        before the layer exists), undo what was recorded, without calling ``restore``, and re-raise."""
        found = find_journal(self.model)
        before = len(found[1].layers) if found is not None else 0
        self.holder = found[0] if found is not None else self.model
        try:
            self.open_layer()
            yield
        except BaseException as exc:
            self._roll_back(before, exc)
            raise

    def _roll_back(self, before: int, cause: BaseException | None) -> None:
        journal = self.holder.__dict__.get(JOURNAL_ATTR)
        if not isinstance(journal, Journal):
            return
        try:
            with interrupts_held():
                for layer in reversed(journal.layers[before:]):
                    journal.undo(layer, rollback=True)
        except BaseException as error:
            if cause is None:
                raise
            raise PatchError(
                f"apply failed ({type(cause).__name__}: {cause}) and undoing it failed too ({type(error).__name__}: "
                f"{error}); the journal still records what is patched: fix the cause and call patchkit.reverse(model)"
            ) from cause
        if not journal.layers and not journal.base.entries:
            self.holder.__dict__.pop(JOURNAL_ATTR, None)

    # -- stages -------------------------------------------------------------------------------------------
    def plan(self, index: int) -> Stage:
        """Plan stage ``index`` on the tree as it is now (after the earlier stages)."""
        return plan_stage(self.model, self.request, index, "check")

    def run_stage(self, stage: Stage) -> None:
        """Build every planned patch of ``stage``, then its setups."""
        for planned in stage.patches:
            self.build_patch(stage, planned)
        self.finish_stage(stage)

    def finish_stage(self, stage: Stage) -> None:
        """Run ``stage``'s setups (once per patcher, with the paths it swapped) and record the stage."""
        assert self.layer is not None
        for patcher, paths in self._built.pop(id(stage), {}).values():
            if patcher.setup is not None:
                ctx = new_context(
                    self.model,
                    patcher,
                    stage,
                    self.request,
                    "setup",
                    journal=self.journal,
                    commits=self.commits,
                    selected=tuple(paths),
                )
                with plugin_call(patcher, "setup"):
                    patcher.setup(self.model, ctx)
                self.notes += [f"{patcher.name}: {note}" for note in ctx.notes]
        stage.cache.clear()  # the contexts stay in the journal; what plugins cached must not
        self.layer.patchers.update({p.patcher_obj.qualname: p.patcher_obj for p in stage.patches})
        self.skipped += stage.skipped

    def build_patch(
        self,
        stage: Stage,
        planned: PlannedPatch,
        *,
        recheck: bool = False,
        sources: Any = None,
        commits: list[Callable[[], None]] | None = None,
    ) -> Swap | None:
        """Build one planned patch and journal the swap; ``None`` when a recheck leaves it alone.

        ``recheck``: run the requirements and ``check`` again first (the loader, now that the
        module's tensors arrived; ``sources``: the loader's tensor sources). ``commits``: where the
        build's commit steps go (default: this run's, run after every stage succeeded).
        """
        assert self.journal is not None
        patcher, node = planned.patcher_obj, planned.node
        paths = tuple(node.paths)
        if recheck:
            checking = new_context(self.model, patcher, stage, self.request, "check", paths=paths, sources=sources)
            try:
                reason = check_one(patcher, node.module, checking)
            except UnsupportedError as exc:
                if self.request.strict:
                    raise UnsupportedError(
                        f"cannot patch {paths[0] or '<root>'} ({planned.module_class}): {exc}"
                    ) from exc
                stage.skipped.append(
                    Skipped(paths[0], planned.module_class, patcher.name, f"{patcher.name}: {exc}", True)
                )
                return None
            finally:
                checking.release_sources()
            if reason is not None:
                stage.skipped.append(Skipped(paths[0], planned.module_class, patcher.name, f"{patcher.name}: {reason}"))
                return None
        ctx = new_context(
            self.model,
            patcher,
            stage,
            self.request,
            "build",
            paths=paths,
            journal=self.journal,
            commits=self.commits if commits is None else commits,
            sources=sources,
        )
        try:
            with plugin_call(patcher, "build"):
                replacement = patcher.build(node.module, ctx)
            if replacement is None:
                new_class = type(node.module).__name__ + " (in place)"
            else:
                new_class = self._swap_in(planned, replacement, ctx)
        finally:
            ctx.release_sources()
        swap = Swap(list(paths), planned.module_class, new_class, patcher.name, patcher.plugin, ctx.notes)
        self.swaps.append(swap)
        self._built.setdefault(id(stage), {}).setdefault(patcher.qualname, (patcher, []))[1].extend(paths)
        return swap

    def _swap_in(self, planned: PlannedPatch, replacement: Any, ctx: Any) -> str:
        assert self.journal is not None
        patcher, node = planned.patcher_obj, planned.node
        if not isinstance(replacement, nn.Module):
            raise TypeError(f"patcher {patcher.qualname!r} build() returned {replacement!r}, not an nn.Module or None")
        if self.ddp and not _shares_parameters(node.module, replacement):
            raise UnsupportedError(
                f"patcher {patcher.name!r} gives {planned.paths[0]} new parameters, but the model is already "
                "wrapped in DistributedDataParallel, which registered the old ones: patch the model before "
                "wrapping it (nothing was changed)"
            )
        kept = None
        if self.request.keep_original is not None:
            kept = keep.keep(self.request.keep_original, node.module, replacement, ctx.path, ctx.checkpoint_source)
            if kept is not None:
                ctx.note(kept.describe())
        # The replacement serves in the original's mode: reverse hands its mode back to the original.
        replacement.training = node.module.training
        edges = [(parent, name) for parent, name in node.edges if parent._modules.get(name) is node.module]
        self.journal.replace(node.module, replacement, edges, patcher, ctx, kept)
        guards.guard_replacement(replacement)
        return type(replacement).__name__

    # -- the end ------------------------------------------------------------------------------------------
    def finish(self) -> PatchReport:
        """Guard the patched model (saving, loading, pickling), or drop a no-op layer; the report."""
        assert self.journal is not None and self.layer is not None
        if self.swaps:
            parents = [
                parent for entry in self.layer.entries if isinstance(entry, _Replace) for parent, _ in entry.edges
            ]
            guards.install(self.model, self.journal, parents)
        report = PatchReport(dict(self.layer.applied), self.swaps, self.skipped, self.notes)
        self.layer.report = report
        if not self.swaps:  # a no-op apply (strict=False, nothing matched) leaves no trace
            self._roll_back(len(self.journal.layers) - 1, None)
        return report

    def commit(self) -> None:
        """Run the commit steps (freeing originals) with interrupts held: the apply has succeeded."""
        steps, self.commits = self.commits, []
        run_all(steps)

    def warn_unsupported(self) -> None:
        """``strict=False``: fall back loudly, never silently."""
        unsupported = [s for s in self.skipped if s.unsupported]
        if unsupported:
            lines = "\n".join(f"  {s.path or '<root>'} ({s.module_class}): {s.reason}" for s in unsupported[:10])
            more = f"\n  ... and {len(unsupported) - 10} more" if len(unsupported) > 10 else ""
            warnings.warn(
                f"patchkit left {len(unsupported)} module(s) unpatched (strict=False):\n{lines}{more}",
                PatchkitWarning,
                stacklevel=4,
            )


def _shares_parameters(original: nn.Module, replacement: nn.Module) -> bool:
    mine = {id(p) for p in original.parameters()}
    return all(id(p) in mine for p in replacement.parameters())
