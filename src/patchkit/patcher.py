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
4. ``restore(original, replacement, ctx)`` (optional): called during reverse for patchers that
   moved state out of the original (quantizers). Since plugin API 1.1 reverse is two-phase:
   ``restore`` runs first for every swap being undone and must only *gather* (read kept files,
   dequantize), raising if anything is missing, and return a callable that makes the change
   (assign the weight, delete the file); the callables run after every restore succeeded, newest
   swap first. A ``restore`` that changes the model itself and returns ``None`` still works (API
   1.0), but then a failure elsewhere can leave that swap half-undone. ``restore`` runs only for
   ``reverse`` (and the exit of ``patched()``): the rollback of a failed apply never calls it, since
   nothing destructive has run then (see two-phase apply below) and the original is intact.

``setup(root, ctx)`` (optional) runs once per apply after all of the patcher's swaps, for
model-level changes (a config field, an instance ``forward``); every change it makes through
``ctx`` is journaled and reversed with the rest.

Two-phase apply: ``build`` and ``setup`` must not destroy anything a rollback needs (free the
original weight, overwrite a file); they register such steps with ``ctx.on_commit`` and the engine
runs them only after every build and setup of every stage succeeded.

``options``: the keyword options the patcher reads, ``{name: one-line description}``; ``apply``
refuses a keyword no stage declares, and a stage's patchers see only the options their stage
declares (a stage with a patcher that declares nothing, ``None``, sees every option).
``same_checkpoint``: ``False`` declares that saving the patched model must be refused. Anything
else is not trusted: saving while patched writes the checkpoint only when the patched state dict
equals, key for key and byte for byte, the one reverse would leave (see
:mod:`patchkit.original_view`), and refuses naming the patcher otherwise.

``save(model, path)`` (optional, quantizers): write the *patched* model as a checkpoint its host
library can load (``patchkit.save_pretrained(model, path, quantized=True)`` calls it).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

from torch import nn

from .errors import PluginError

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
    restore: Callable[[nn.Module, nn.Module, PatchContext], Callable[[], None] | None] | None = None
    setup: Callable[[nn.Module, PatchContext], None] | None = None
    save: Callable[[nn.Module, Any], None] | None = None
    priority: int = 0
    requires: Requirements = field(default_factory=Requirements)
    description: str = ""
    options: Mapping[str, str] | None = None  # option name -> description; None: undeclared (accept any)
    same_checkpoint: bool | None = None  # False: saving while patched is refused; else verified, never trusted
    covers: tuple[str, ...] = ()  # what it patches, in words users search for: classes, architectures
    plugin: str = ""  # filled in by the registry: which plugin registered it

    @property
    def qualname(self) -> str:
        """``plugin:name``: unique in a registry (bare names may repeat across plugins)."""
        return f"{self.plugin}:{self.name}" if self.plugin else self.name

    def __deepcopy__(self, memo: dict[int, Any]) -> Patcher:
        return self  # immutable plugin data: a copied model's journal refers to the same patcher

    def matches(self, module: nn.Module, path: str, root: nn.Module) -> bool:
        """True when ``module`` (found at ``path`` under ``root``) is a candidate for this patcher."""
        if isinstance(self.match, (type, tuple)):
            return isinstance(module, self.match)
        return bool(self.match(module, path, root))


Phase = Literal["plan", "check", "build", "setup", "restore"]


class PatchContext:
    """What a patcher's callbacks receive: where they are, the user's options, journaled helpers.

    Built in one place (:mod:`patchkit.pipeline`) for every phase. ``phase`` says which:
    ``"plan"`` (``patchkit.plan`` / ``patchkit plan``: nothing will be built), ``"check"`` (the
    checks of an ``apply`` or a load), ``"build"``, ``"setup"``, ``"restore"``. In ``plan`` and
    ``check`` the context is read-only: the mutating helpers raise :class:`PluginError`, so a
    ``check`` that tries to change the model fails loudly instead of half-patching it.
    """

    def __init__(
        self,
        root: nn.Module,
        patcher: Patcher,
        *,
        phase: Phase,
        registry: Registry,
        paths: tuple[str, ...] = (),
        options: Mapping[str, Any] | None = None,
        backend: str = "auto",
        journal: Journal | None = None,
        selected: tuple[str, ...] = (),
        cache: dict[Any, Any] | None = None,
        commits: list[Callable[[], None]] | None = None,
        sources: Mapping[int, tuple[Any, Any]] | None = None,
    ) -> None:
        self.root = root
        self.patcher = patcher
        self.phase: Phase = phase
        self.paths = paths
        self.options: Mapping[str, Any] = options if options is not None else {}
        self.backend = backend
        self.journal = journal if phase in ("build", "setup", "restore") else None
        self.selected = selected  # in setup(): the paths this patcher swapped in this apply
        self.registry = registry  # the registry this apply/plan runs against (backends, patchers)
        self.notes: list[str] = []
        # Lives for one stage of one apply (or one plan): facts a plugin computes once per model.
        self.cache: dict[Any, Any] = cache if cache is not None else {}
        self._commits = commits
        # patchkit.from_pretrained: id(tensor) -> (tensor, TensorSource) for the tensors just read.
        self._sources = sources

    def __deepcopy__(self, memo: dict[int, Any]) -> PatchContext:
        # A copied model's journal keeps its contexts: the model objects follow the memo, the
        # patcher and registry are shared, the per-apply cache and commit list are not kept.
        new = PatchContext.__new__(PatchContext)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key in ("patcher", "registry"):
                new.__dict__[key] = value
            elif key == "cache":
                new.__dict__[key] = {}
            elif key in ("_commits", "_sources"):
                new.__dict__[key] = None
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    @property
    def path(self) -> str:
        """The first qualified name of the module being handled ('' for the root)."""
        return self.paths[0] if self.paths else ""

    @property
    def plan_only(self) -> bool:
        """True when called from ``patchkit.plan`` (nothing will be built): a check may accept a model
        on the meta device that it could not actually patch yet."""
        return self.phase == "plan"

    @property
    def dry_run(self) -> bool:
        """Deprecated since plugin API 1.1 (kept for 1.0 plugins): use :attr:`plan_only`."""
        warnings.warn(
            f"ctx.dry_run (patcher {self.patcher.qualname!r}) is deprecated since patchkit plugin API 1.1 and "
            "will be removed in API 2.0: use ctx.plan_only",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.plan_only

    @property
    def keep_original(self) -> str | None:
        """The user's ``keep_original=`` (``"cpu"``, ``"checkpoint"`` or a folder), or ``None``.

        The core keeps what a replacement does not share with the original (and puts it back
        bit-identical on reverse, after ``restore``): a patcher does not keep anything itself and may
        skip costly work in ``restore`` (dequantizing) when this is set.
        """
        value = self.options.get("keep_original")
        return None if value is None else str(value)

    def option(self, name: str, default: Any = None) -> Any:
        """A user option passed as ``apply(..., name=value)``; ``default`` when absent."""
        return self.options.get(name, default)

    def note(self, text: str) -> None:
        """Add a line to this module's entry in the report (e.g. a measured error)."""
        self.notes.append(text)

    def _need_journal(self) -> Journal:
        if self.journal is None:
            raise PluginError(
                f"patcher {self.patcher.qualname!r} tried to change the model in {self.phase}; only build, setup and "
                "restore may change it (check must not)"
            )
        return self.journal

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value``, journaled: reverse restores the old value (or deletes it)."""
        self._need_journal().set_attr(obj, name, value)

    def on_reverse(self, undo: Callable[[], None], what: str) -> None:
        """Register ``undo`` to run at its place in reverse (last in, first out).

        Recorded *before* the change it undoes is made: call it first, then make the change, and
        write ``undo`` so that it is harmless when the change was never made. Use a module-level
        function, a bound method or a ``functools.partial`` over objects, not a closure: a
        deep-copied model must undo its own objects.
        """
        self._need_journal().call(undo, what)

    def checkpoint_source(self, tensor: Any) -> Any:
        """Where ``tensor`` was read from, while ``patchkit.from_pretrained`` is loading the model.

        A :class:`patchkit.TensorSource` (file, key, byte range, file size and, when the load was
        asked to fingerprint, the SHA-256 of the bytes read) for a tensor the loader has just read
        into the module being checked and built; ``None`` outside such a load or for any other
        tensor. Valid during ``check`` and ``build`` of a module planned for the quantize stage of a
        load (the loader checks it again, then builds it, as soon as its tensors arrived): record
        what you need from it. A check may leave work for its build in ``ctx.cache``.
        """
        found = self._sources.get(id(tensor)) if self._sources is not None else None
        return found[1] if found is not None and found[0] is tensor else None

    def release_sources(self) -> None:
        """Forget the loader's source map (called by the loader once ``build`` returned)."""
        self._sources = None

    def on_commit(self, step: Callable[[], None]) -> None:
        """Run ``step`` once every build and setup of this apply succeeded (two-phase apply).

        For the destructive part of a patch that a rollback could not undo exactly, e.g. freeing
        the original weight's storage. Steps run in registration order, with interrupts held until
        the last one ran; they must not fail (one that raises does not stop the others).
        """
        self._need_journal()
        if self._commits is None:
            raise PluginError(f"patcher {self.patcher.qualname!r}: on_commit is only available in build/setup")
        self._commits.append(step)
