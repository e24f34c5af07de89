"""The journal: every change patchkit makes to one model, undone last-in first-out.

It lives on the model instance (``model._patchkit_journal``) and holds direct references to the
objects it changed (parents, modules, configs), never qualified names, so reverse still works
after the model was wrapped (PEFT, TRL, DDP) and never rebuilds anything from a config.

Three rules keep it exact under faults and copies:
- **Intent first.** An entry is recorded before its change is made, and undoing an entry whose
  change never happened is harmless, so an interrupt between the two loses nothing.
- **Prepare, then commit.** Reverse first *prepares* every entry (a patcher's ``restore`` gathers
  what it needs and changes nothing), then commits them newest first, dropping each entry only
  once it is undone: a failure leaves the journal (and the save guard) describing exactly what is
  still patched, and calling reverse again continues.
- **Data, not closures.** Entries hold objects as attributes (patcher, context, modules), so
  ``copy.deepcopy`` of a patched model maps every reference onto the copy through its memo.
  Closures would keep pointing at the original model: the journal refuses to be deep-copied
  when it holds one that references modules, and refuses to be pickled at all.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import ConflictError, PatchedModelError

if TYPE_CHECKING:
    from .keep import Kept
    from .patcher import PatchContext, Patcher

JOURNAL_ATTR = "_patchkit_journal"


def applied_label(key: str, family: str) -> str:
    """How reports, plans and errors name an applied stage: the keyword of ``apply`` and its value
    (``attention=sdpa``, ``quantize=int8``, ``patch=nodropout``), for an :func:`applied` key."""
    return f"{key.split(':', 1)[0]}={family}"


class _Missing:
    """'No instance attribute before': one object, kept the same through copies and pickles."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __reduce__(self) -> str:
        return "_MISSING"

    def __copy__(self) -> _Missing:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Missing:
        return self

    def __repr__(self) -> str:
        return "<no previous value>"


_MISSING = _Missing()


@dataclass(eq=False)
class _Replace:
    original: nn.Module
    replacement: nn.Module
    edges: list[tuple[nn.Module, str]]
    patcher: Patcher | None = None  # its ``restore`` runs first on reverse
    ctx: PatchContext | None = None
    kept: Kept | None = None  # keep_original: what the core kept of the original

    def prepare(self, rollback: bool = False) -> Any:
        """Gather what undoing needs, changing nothing: the kept values (``keep_original``) and the
        patcher's restore step (API >= 1.1). A rollback needs neither: nothing destructive ran, the
        original is intact, so the patcher's ``restore`` is never called then."""
        if rollback:
            return None
        where = self.ctx.path if self.ctx is not None else ""
        values = None
        if self.kept is not None and not self.kept.done and self.kept.unchanged(self.replacement):
            values = self.kept.gather(where or "<root>")
        step = None
        if self.patcher is not None and self.patcher.restore is not None:
            assert self.ctx is not None
            self.ctx.phase = "restore"
            result = self.patcher.restore(self.original, self.replacement, self.ctx)
            step = result if callable(result) else None
        return step, values

    def commit(self, prepared: Any, rollback: bool = False) -> None:
        if rollback:
            if self.kept is not None:
                self.kept.discard()
        else:
            step, values = prepared if prepared is not None else (None, None)
            if step is not None:
                step()
            if self.kept is not None and not self.kept.done:
                # Last, so that nothing a patcher's restore writes can change the kept bytes.
                if values is not None:
                    self.kept.put_back(values, self.replacement)
                    note = "reverse: original put back bit-identical from what patchkit kept"
                else:
                    self.kept.discard()
                    note = "reverse: the replacement's weights were replaced since apply; the kept original was dropped"
                if self.ctx is not None:
                    self.ctx.note(note)
            # The original missed any train()/eval() call made while it was detached (a rollback's
            # replacement never served: the original keeps its own mode).
            self.original.training = self.replacement.training
        for parent, name in self.edges:
            parent._modules[name] = self.original

    def problem(self, undone_later: dict[int, nn.Module]) -> str | None:
        """Why this swap cannot be undone exactly, given what newer layers will put back first."""
        for parent, name in self.edges:
            now = parent._modules.get(name)
            while now is not None and id(now) in undone_later:  # a newer layer replaced our replacement
                now = undone_later[id(now)]
            if now is not self.replacement and now is not self.original:
                return (
                    f"slot {name!r} of a {type(parent).__name__} should hold patchkit's "
                    f"{type(self.replacement).__name__} but holds {type(now).__name__}: something wrapped or "
                    "replaced it after patching (a PEFT adapter?). Unload or merge it first "
                    "(peft_model.unload() / merge_and_unload()), then reverse"
                )
        return None

    def touched(self) -> set[tuple[int, str]]:
        keys = {(id(parent), "slot:" + name) for parent, name in self.edges}
        return keys | {(id(self.original), "*"), (id(self.replacement), "*")}


@dataclass(eq=False)
class _SetAttr:
    obj: Any
    name: str
    old: Any

    def prepare(self, rollback: bool = False) -> None:
        return None

    def commit(self, prepared: None, rollback: bool = False) -> None:
        if self.old is _MISSING:
            # Never set (an interrupt between record and change) is the same as undone.
            if self.name in getattr(self.obj, "__dict__", {}):
                delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.old)

    def describe(self) -> str:
        return f"set {type(self.obj).__name__}.{self.name}"

    def touched(self) -> set[tuple[int, str]]:
        return {(id(self.obj), "attr:" + self.name)}


@dataclass(eq=False)
class _Call:
    undo_fn: Callable[[], None]
    what: str

    def prepare(self, rollback: bool = False) -> None:
        return None

    def commit(self, prepared: None, rollback: bool = False) -> None:
        self.undo_fn()

    def describe(self) -> str:
        return self.what

    def touched(self) -> set[tuple[int, str]]:
        return {(id(self.undo_fn), "call")}


@dataclass(eq=False)
class Layer:
    """One ``apply`` call's worth of entries, with what it applied (e.g. ``{"attention": "flash2"}``)."""

    applied: dict[str, str]
    entries: list[Any] = field(default_factory=list)
    report: Any = None
    patchers: dict[str, Any] = field(default_factory=dict)  # name -> Patcher used in this layer

    def touched(self) -> set[tuple[int, str]]:
        out: set[tuple[int, str]] = set()
        for entry in self.entries:
            out |= entry.touched()
        return out


class Journal:
    """Changes to one model, grouped in layers (one per ``apply``), undone in reverse order.

    ``base`` holds what every layer relies on (the save guard): it is undone with the last layer.
    """

    def __init__(self) -> None:
        self.layers: list[Layer] = []
        self.base = Layer({})

    @property
    def _entries(self) -> list[Any]:
        if not self.layers:
            raise RuntimeError("journal has no open layer; start one with begin()")
        return self.layers[-1].entries

    def begin(self, applied: dict[str, str]) -> Layer:
        """Open a layer for one apply call."""
        layer = Layer(dict(applied))
        self.layers.append(layer)
        return layer

    def applied_kinds(self) -> dict[str, str]:
        """Kind -> family of everything currently applied."""
        merged: dict[str, str] = {}
        for layer in self.layers:
            merged.update(layer.applied)
        return merged

    def patchers(self) -> list[Any]:
        """Every patcher used by a layer still applied."""
        return [p for layer in self.layers for p in layer.patchers.values()]

    def replace(
        self,
        original: nn.Module,
        replacement: nn.Module,
        edges: list[tuple[nn.Module, str]],
        patcher: Patcher | None = None,
        ctx: PatchContext | None = None,
        kept: Kept | None = None,
    ) -> None:
        """Put ``replacement`` at every ``(parent, name)`` edge that held ``original``."""
        entry = _Replace(original, replacement, list(edges), patcher, ctx, kept)
        self._entries.append(entry)  # intent first: undoing a swap that never happened is harmless
        for parent, name in entry.edges:
            parent._modules[name] = replacement

    def set_attr(self, obj: Any, name: str, value: Any, *, base: bool = False) -> None:
        """``setattr(obj, name, value)``; undo restores the old value, or deletes an instance attribute
        that shadowed a class attribute (e.g. a guarded ``save_pretrained``). ``base=True`` records
        it in :attr:`base` (undone with the last layer)."""
        in_instance = name in getattr(obj, "__dict__", {})
        descriptor = getattr(type(obj), name, None)
        is_data_descriptor = hasattr(descriptor, "__set__")
        old = getattr(obj, name) if (in_instance or is_data_descriptor) else _MISSING
        if isinstance(obj, nn.Module) and not in_instance and not is_data_descriptor:
            # nn.Module.__getattr__ finds parameters/buffers/submodules; those are swapped, not set.
            if name in obj._parameters or name in obj._buffers or name in obj._modules:
                raise ValueError(f"use a replacement module to change {name!r}, not set_attr")
        (self.base.entries if base else self._entries).append(_SetAttr(obj, name, old))  # intent first
        setattr(obj, name, value)

    def call(self, undo: Callable[[], None], what: str) -> None:
        """Record an arbitrary undo step (it must tolerate running when its change was not made)."""
        self._entries.append(_Call(undo, what))

    def check(self, layers: list[Layer] | None = None) -> None:
        """Raise ConflictError, changing nothing, unless ``layers`` (default: all, newest first) can be
        undone exactly: every slot patchkit filled must still hold what patchkit put there."""
        undone_later: dict[int, nn.Module] = {}
        for layer in layers if layers is not None else list(reversed(self.layers)):
            for entry in reversed(layer.entries):
                if isinstance(entry, _Replace):
                    problem = entry.problem(undone_later)
                    if problem is not None:
                        raise ConflictError(f"cannot reverse exactly: {problem}")
                    undone_later[id(entry.replacement)] = entry.original

    def prepare(self, layers: list[Layer] | None = None, *, rollback: bool = False) -> list[tuple[Layer, list[Any]]]:
        """Phase one of undoing ``layers`` (default: all; newest first): every entry's restore gathers
        what it needs. Changes nothing; raises if any restore cannot succeed. ``rollback``: undoing a
        failed apply, whose originals are intact: no restore runs."""
        chosen = list(layers) if layers is not None else list(reversed(self.layers))
        if len(chosen) == len(self.layers):
            chosen.append(self.base)  # the last layer goes: the guard goes too
        if rollback:
            return [(layer, [entry.prepare(rollback=True) for entry in layer.entries]) for layer in chosen]
        return [(layer, [entry.prepare() for entry in layer.entries]) for layer in chosen]

    def commit(self, prepared: list[tuple[Layer, list[Any]]], *, rollback: bool = False) -> None:
        """Phase two: undo the prepared layers' entries newest first, dropping each once undone.

        If one fails, what was undone is dropped and the rest stays recorded (still patched, still
        guarded): calling reverse again continues where this stopped.
        """
        for layer, ready in prepared:
            while layer.entries:
                entry, prepared_entry = layer.entries[-1], ready[len(layer.entries) - 1]
                if rollback:
                    entry.commit(prepared_entry, rollback=True)
                else:
                    entry.commit(prepared_entry)
                layer.entries.pop()
            if layer is not self.base:
                self.layers = [other for other in self.layers if other is not layer]

    def undo(self, layer: Layer, *, rollback: bool = False) -> None:
        """Undo one layer (both phases); ``rollback`` for a failed apply (no restore runs)."""
        self.commit(self.prepare([layer], rollback=rollback), rollback=rollback)

    def independent(self, layer: Layer) -> str | None:
        """Why ``layer`` cannot be undone before the layers applied after it, or ``None``."""
        index = next(i for i, other in enumerate(self.layers) if other is layer)
        mine = layer.touched()
        for other in self.layers[index + 1 :]:
            if mine & other.touched():
                what = ", ".join(f"{k}={v}" for k, v in other.applied.items())
                return f"a later apply ({what}) changed the same modules or attributes"
        return None

    @contextlib.contextmanager
    def attributes_as_before(self, keep: Callable[[Any], bool]) -> Iterator[None]:
        """Temporarily show the original value of every journaled attribute for which ``keep(obj)``
        is False (e.g. config fields while saving), then put the patched values back."""
        changed: list[tuple[_SetAttr, Any, bool]] = []
        try:
            for layer in [*reversed(self.layers), self.base]:
                for entry in reversed(layer.entries):
                    if isinstance(entry, _SetAttr) and not keep(entry.obj):
                        had = entry.name in getattr(entry.obj, "__dict__", {})
                        current = getattr(entry.obj, entry.name, None)
                        changed.append((entry, current, had))
                        entry.commit(None)
            yield
        finally:
            for entry, current, had in reversed(changed):
                if had or entry.old is not _MISSING:
                    setattr(entry.obj, entry.name, current)

    # -- copies -------------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> Journal:
        for layer in [*self.layers, self.base]:
            for entry in layer.entries:
                for value in _callables(entry):
                    if _closure_over_objects(value):
                        raise PatchedModelError(
                            f"cannot deep-copy this patched model: the journal entry {entry.describe()!r} holds a "
                            f"closure ({getattr(value, '__qualname__', value)!r}) that would keep pointing at the "
                            "original model. Deep-copy before patching, or patchkit.reverse(model) first "
                            "(plugin authors: journal callables as bound methods or objects, not closures)"
                        )
        new = Journal.__new__(Journal)
        memo[id(self)] = new
        new.layers = copy.deepcopy(self.layers, memo)
        new.base = copy.deepcopy(self.base, memo)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise PatchedModelError(
            "a patchkit-patched model cannot be pickled (torch.save(model), pickle, multiprocessing): its journal "
            "refers to the live original modules and kept weights. Call patchkit.reverse(model) first and save or "
            "send the unpatched model, then apply again on the other side; or save a state_dict / "
            "patchkit.save_pretrained(model, path, quantized=True)"
        )


def _callables(entry: Any) -> list[Any]:
    if isinstance(entry, _Call):
        return [entry.undo_fn]
    if isinstance(entry, _SetAttr):
        current = getattr(entry.obj, "__dict__", {}).get(entry.name)
        return [v for v in (entry.old, current) if callable(v)]
    return []


def _closure_over_objects(value: Any) -> bool:
    """True for a function whose closure cells hold something other than plain data or functions."""
    fn = value.func if hasattr(value, "func") and hasattr(value, "args") else value  # functools.partial
    if isinstance(fn, types.MethodType) or not isinstance(fn, types.FunctionType):
        return False
    for cell in fn.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if not isinstance(content, (str, int, float, bool, bytes, type(None), types.FunctionType, type)):
            return True
    return False


def find_journal(model: nn.Module) -> tuple[nn.Module, Journal] | None:
    """The module holding a journal: ``model`` itself, or the first module inside it that holds one."""
    found = find_journals(model)
    return found[0] if found else None


def find_journals(model: nn.Module) -> list[tuple[nn.Module, Journal]]:
    """Every module in ``model``'s tree (itself first) holding a journal with something left to undo."""
    out = []
    for module in model.modules():
        journal = module.__dict__.get(JOURNAL_ATTR)
        if journal is not None and (journal.layers or journal.base.entries):
            out.append((module, journal))
    return out
