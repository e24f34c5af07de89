"""What a plugin registers: a :class:`Patcher`, and the :class:`PatchContext` it is called with.

A patcher is plain data plus four callables. The engine calls them in this order:

1. ``match(module, path, root)``: is this module a candidate? (or ``match`` is a class / tuple of
   classes and the engine uses ``isinstance``; never a class-name string).
2. ``check(module, ctx)``: may it be patched here? Return ``None`` to go ahead, a string to leave
   the module alone with that reason, or raise :class:`~patchkit.UnsupportedError`. Runs during
   planning, so it must not change anything.
3. ``build(module, ctx)``: return the replacement module (the engine puts it at every path that
   held the original), or ``None`` when the patcher changed the module in place through the
   journaled helpers of ``ctx``.
4. ``restore(original, replacement, ctx)`` (optional): called during reverse, before the original
   goes back in place, for patchers that moved state out of the original (quantizers).

``setup(root, ctx)`` (optional) runs once per apply after all of the patcher's swaps, for
model-level changes (a config field, an instance ``forward``); every change it makes through
``ctx`` is journaled and reversed with the rest.

``save(model, path)`` (optional, quantizers): write the *patched* model as a checkpoint its host
library can load (``patchkit.save_pretrained(model, path, quantized=True)`` calls it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

from torch import nn

if TYPE_CHECKING:
    from .journal import Journal
    from .registry import Registry

Kind = Literal["attention", "quantize", "other"]
KINDS: tuple[str, ...] = ("attention", "quantize", "other")

Predicate = Callable[[nn.Module, str, nn.Module], bool]
Match = Union[type, tuple[type, ...], Predicate]  # noqa: UP007 (a runtime alias; py3.10 has no | on typing aliases)


@dataclass(frozen=True)
class Requirements:
    """What a patcher needs; the engine checks these before any ``check`` callback runs.

    ``devices``: device types the module may live on (``"cpu"``, ``"cuda"``...); empty = any.
    ``dtypes``: floating dtypes the module's parameters may have; empty = any.
    ``training``: whether the replacement supports ``module.training == True``.
    ``packages``: ``{"distribution": "specifier"}``, e.g. ``{"bitsandbytes": ">=0.45"}``.
    Modules on the ``meta`` device pass the device check (planning a model before loading it).
    """

    devices: frozenset[str] = frozenset()
    dtypes: frozenset[Any] = frozenset()
    training: bool = True
    packages: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Patcher:
    """A declared module patch. See the module docstring for the call order."""

    name: str
    kind: Kind
    family: str
    match: Match
    build: Callable[[nn.Module, PatchContext], nn.Module | None]
    check: Callable[[nn.Module, PatchContext], str | None] | None = None
    restore: Callable[[nn.Module, nn.Module, PatchContext], None] | None = None
    setup: Callable[[nn.Module, PatchContext], None] | None = None
    save: Callable[[nn.Module, Any], None] | None = None
    priority: int = 0
    requires: Requirements = field(default_factory=Requirements)
    description: str = ""
    plugin: str = ""  # filled in by the registry: which plugin registered it

    def matches(self, module: nn.Module, path: str, root: nn.Module) -> bool:
        """True when ``module`` (found at ``path`` under ``root``) is a candidate for this patcher."""
        if isinstance(self.match, (type, tuple)):
            return isinstance(module, self.match)
        return bool(self.match(module, path, root))


class PatchContext:
    """What a patcher's callbacks receive: where they are, the user's options, journaled helpers.

    During planning ``journal`` is ``None`` and the mutating helpers raise, so a ``check`` that
    tries to change the model fails loudly instead of half-patching it.
    """

    def __init__(
        self,
        root: nn.Module,
        patcher: Patcher,
        *,
        paths: tuple[str, ...] = (),
        options: Mapping[str, Any] | None = None,
        backend: str = "auto",
        journal: Journal | None = None,
        selected: tuple[str, ...] = (),
        registry: Registry | None = None,
        dry_run: bool = False,
    ) -> None:
        self.root = root
        self.patcher = patcher
        self.paths = paths
        self.options: Mapping[str, Any] = options if options is not None else {}
        self.backend = backend
        self.journal = journal
        self.selected = selected  # in setup(): the paths this patcher swapped in this apply
        self._registry = registry
        # True when called from patchkit.plan() (nothing will be built): a check may accept a
        # model on the meta device that it could not actually patch yet.
        self.dry_run = dry_run
        self.notes: list[str] = []

    @property
    def registry(self) -> Registry:
        """The registry this apply/plan runs against (its attention backends, its patchers)."""
        if self._registry is None:
            from .registry import default_registry

            self._registry = default_registry()
        return self._registry

    @property
    def path(self) -> str:
        """The first qualified name of the module being handled ('' for the root)."""
        return self.paths[0] if self.paths else ""

    def option(self, name: str, default: Any = None) -> Any:
        """A user option passed as ``apply(..., name=value)``; ``default`` when absent."""
        return self.options.get(name, default)

    def note(self, text: str) -> None:
        """Add a line to this module's entry in the report (e.g. a measured error)."""
        self.notes.append(text)

    def _need_journal(self) -> Journal:
        if self.journal is None:
            raise RuntimeError(
                f"patcher {self.patcher.name!r} tried to change the model while planning; "
                "only build/setup/restore may change it"
            )
        return self.journal

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value``, journaled: reverse restores the old value (or deletes it)."""
        self._need_journal().set_attr(obj, name, value)

    def on_reverse(self, undo: Callable[[], None], what: str) -> None:
        """Register ``undo`` to run at its place in reverse (last in, first out)."""
        self._need_journal().call(undo, what)
