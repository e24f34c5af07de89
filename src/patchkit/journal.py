"""The journal: every change patchkit makes to one model, undone last-in first-out.

It lives on the model instance (``model._patchkit_journal``) and holds direct references to the
objects it changed (parents, modules, configs), never qualified names, so reverse still works
after the model was wrapped (PEFT, TRL, DDP) and never rebuilds anything from a config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConflictError

JOURNAL_ATTR = "_patchkit_journal"
_MISSING = object()


@dataclass
class _Replace:
    original: nn.Module
    replacement: nn.Module
    edges: list[tuple[nn.Module, str]]
    restore: Callable[[], None] | None

    def undo(self) -> None:
        if self.restore is not None:
            self.restore()
        # The original missed any train()/eval() call made while it was detached.
        self.original.training = self.replacement.training
        for parent, name in self.edges:
            parent._modules[name] = self.original

    def describe(self) -> str:
        return f"replace {type(self.original).__name__} -> {type(self.replacement).__name__}"

    def problem(self, undone_later: dict[int, nn.Module]) -> str | None:
        """Why this swap cannot be undone exactly, given what newer layers will put back first."""
        for parent, name in self.edges:
            now = parent._modules.get(name)
            while now is not None and id(now) in undone_later:  # a newer layer replaced our replacement
                now = undone_later[id(now)]
            if now is not self.replacement:
                return (
                    f"slot {name!r} of a {type(parent).__name__} should hold patchkit's "
                    f"{type(self.replacement).__name__} but holds {type(now).__name__}: something wrapped or "
                    "replaced it after patching (a PEFT adapter?). Unload or merge it first "
                    "(peft_model.unload() / merge_and_unload()), then reverse"
                )
        return None


@dataclass
class _SetAttr:
    obj: Any
    name: str
    old: Any

    def undo(self) -> None:
        if self.old is _MISSING:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.old)

    def describe(self) -> str:
        return f"set {type(self.obj).__name__}.{self.name}"


@dataclass
class _Call:
    undo_fn: Callable[[], None]
    what: str

    def undo(self) -> None:
        self.undo_fn()

    def describe(self) -> str:
        return self.what


@dataclass
class Layer:
    """One ``apply`` call's worth of entries, with what it applied (e.g. ``{"attention": "flash2"}``)."""

    applied: dict[str, str]
    entries: list[Any] = field(default_factory=list)
    report: Any = None
    patchers: dict[str, Any] = field(default_factory=dict)  # name -> Patcher used in this layer


class Journal:
    """Changes to one model, grouped in layers (one per ``apply``), undone in reverse order."""

    def __init__(self) -> None:
        self.layers: list[Layer] = []

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

    def replace(
        self,
        original: nn.Module,
        replacement: nn.Module,
        edges: list[tuple[nn.Module, str]],
        restore: Callable[[], None] | None = None,
    ) -> None:
        """Put ``replacement`` at every ``(parent, name)`` edge that held ``original``."""
        entry = _Replace(original, replacement, list(edges), restore)
        for parent, name in entry.edges:
            parent._modules[name] = replacement
        self._entries.append(entry)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``; undo restores the old value, or deletes an instance attribute
        that shadowed a class attribute (e.g. a guarded ``save_pretrained``)."""
        in_instance = name in getattr(obj, "__dict__", {})
        descriptor = getattr(type(obj), name, None)
        is_data_descriptor = hasattr(descriptor, "__set__")
        old = getattr(obj, name) if (in_instance or is_data_descriptor) else _MISSING
        if isinstance(obj, nn.Module) and not in_instance and not is_data_descriptor:
            # nn.Module.__getattr__ finds parameters/buffers/submodules; those are swapped, not set.
            if name in obj._parameters or name in obj._buffers or name in obj._modules:
                raise ValueError(f"use a replacement module to change {name!r}, not set_attr")
        setattr(obj, name, value)
        self._entries.append(_SetAttr(obj, name, old))

    def call(self, undo: Callable[[], None], what: str) -> None:
        """Record an arbitrary undo step."""
        self._entries.append(_Call(undo, what))

    def check(self, layers: int | None = None) -> None:
        """Raise ConflictError, changing nothing, unless the newest ``layers`` (default: all) can be
        undone exactly: every slot patchkit filled must still hold what patchkit put there."""
        undone_later: dict[int, nn.Module] = {}
        for layer in list(reversed(self.layers))[: layers or len(self.layers)]:
            for entry in reversed(layer.entries):
                if isinstance(entry, _Replace):
                    problem = entry.problem(undone_later)
                    if problem is not None:
                        raise ConflictError(f"cannot reverse exactly: {problem}")
                    undone_later[id(entry.replacement)] = entry.original

    def undo_layer(self) -> Layer:
        """Undo and drop the newest layer; returns it."""
        layer = self.layers[-1]
        errors: list[BaseException] = []
        for entry in reversed(layer.entries):
            try:
                entry.undo()
            except BaseException as exc:  # keep undoing: a half-reversed model is the worst outcome
                errors.append(exc)
        self.layers.pop()
        if errors:
            raise errors[0]
        return layer

    def __len__(self) -> int:
        return sum(len(layer.entries) for layer in self.layers)


def find_journal(model: nn.Module) -> tuple[nn.Module, Journal] | None:
    """The module holding a journal: ``model`` itself, or a module inside a wrapper around it."""
    journal = model.__dict__.get(JOURNAL_ATTR)
    if journal is not None:
        return model, journal
    for module in model.modules():
        journal = module.__dict__.get(JOURNAL_ATTR)
        if journal is not None:
            return module, journal
    return None
