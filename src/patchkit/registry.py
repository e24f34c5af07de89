"""The plugin registry: discovers ``patchkit`` entry points, checks versions, collects patchers.

One broken plugin never breaks the others: its import error or hook exception is recorded on
its :class:`PluginInfo` (status ``failed``) unless ``PATCHKIT_STRICT_PLUGINS=1`` asks for an
exception. ``PATCHKIT_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from . import hookspecs
from .attention_backends import AttentionBackend, missing_packages
from .errors import PluginError
from .patcher import KINDS, Patcher

ENTRY_POINT_GROUP = "patchkit"
PLUGIN_API_VERSION = "1.1"

Status = Literal["loaded", "unavailable", "skipped", "failed"]


@dataclass
class PatcherSummary:
    """One patcher as ``patchkit plugins`` lists it: its scoped name and what it covers."""

    name: str
    qualname: str
    kind: str
    family: str
    covers: tuple[str, ...] = ()
    description: str = ""


@dataclass
class BackendSummary:
    """One attention backend as ``patchkit plugins`` lists it; ``unavailable`` says why it cannot run."""

    name: str
    unavailable: str | None = None
    description: str = ""


@dataclass
class PluginInfo:
    """One plugin as ``patchkit plugins`` lists it.

    ``status``: ``loaded``; ``unavailable`` (a package it needs is missing or too old, or its
    ``available()`` probe said no: ``reason`` has the install hint; its patchers are listed but
    not used); ``skipped`` (disabled, or written for another plugin API); ``failed`` (import error,
    hook exception, invalid registration). ``patchers`` / ``backends`` are names;
    ``patcher_details`` / ``backend_details`` add kind, family, covers, availability.
    """

    name: str
    version: str | None
    status: Status
    reason: str = ""
    patchers: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    patcher_details: list[PatcherSummary] = field(default_factory=list)
    backend_details: list[BackendSummary] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (what ``patchkit plugins --json`` prints per plugin)."""
        return dataclasses.asdict(self)


def _strict_plugins() -> bool:
    return os.environ.get("PATCHKIT_STRICT_PLUGINS", "") not in ("", "0")


def _disabled_plugins() -> set[str]:
    raw = os.environ.get("PATCHKIT_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def _api_problem(plugin: Any) -> str | None:
    """Why ``plugin``'s declared ``PATCHKIT_API`` rules it out here, or ``None``."""
    api = getattr(plugin, "PATCHKIT_API", None)
    if api is None:
        return None
    try:
        spec = SpecifierSet(str(api))
    except InvalidSpecifier as exc:
        raise PluginError(f"invalid version specifier PATCHKIT_API = {api!r}: {exc}") from exc
    if Version(PLUGIN_API_VERSION) not in spec:
        return f"needs patchkit plugin API{api}, this patchkit offers {PLUGIN_API_VERSION}"
    return None


def _availability_problem(plugin: Any) -> str | None:
    """Why ``plugin`` cannot run here (``REQUIRES`` unmet, or its ``available()`` probe), or ``None``."""
    requires: Mapping[str, str] = getattr(plugin, "REQUIRES", None) or {}
    for package, spec in requires.items():
        try:
            SpecifierSet(str(spec))
        except InvalidSpecifier as exc:
            raise PluginError(f"invalid version specifier REQUIRES = {{{package!r}: {spec!r}}}: {exc}") from exc
    problem = missing_packages({str(k): str(v) for k, v in requires.items()})
    if problem is not None:
        return problem
    probe = getattr(plugin, "available", None)
    if callable(probe):
        answer = probe()
        if answer is not None and not isinstance(answer, str):
            raise PluginError(f"available() must return None or a reason string, returned {answer!r}")
        return answer
    return None


def _where(fn: Any) -> str:
    """``module.function (file:line)`` of a hook implementation, for error messages."""
    code = getattr(fn, "__code__", None)
    place = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}{place}"


def _quote(obj: Any) -> str:
    """A short definition-like rendering of a registered object (the fields that identify it)."""
    if isinstance(obj, Patcher):
        match = obj.match
        shown = match if isinstance(match, str) else getattr(match, "__qualname__", None) or repr(match)
        return (
            f"Patcher(name={obj.name!r}, kind={obj.kind!r}, family={obj.family!r}, match={shown!r}, "
            f"covers={obj.covers!r})"
        )
    if isinstance(obj, AttentionBackend):
        return f"AttentionBackend(name={obj.name!r})"
    return repr(obj)


class Registry:
    """Plugins, their patchers and their attention backends.

    ``Registry()`` is empty; :meth:`load_entry_points` fills it from installed distributions and
    :meth:`add_plugin` from an object in hand (tests, notebooks: test a plugin without installing
    it, next to no other plugin or next to exactly the ones you add). :func:`default_registry` is
    the process-wide one that ``patchkit.apply`` uses unless given ``registry=``.

    Patcher names are scoped by plugin: ``bnb:bnb-int8`` is the ``bnb-int8`` patcher of plugin
    ``bnb``; two plugins may both register a ``bnb-int8`` without disturbing each other. A clash
    *inside* one plugin (or an attention backend name already offered) fails only the plugin that
    brings it, never one already loaded.
    """

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        self._patchers: dict[str, Patcher] = {}  # by qualname
        self._backends: dict[str, AttentionBackend] = {}
        self._demos: dict[str, Any] = {}  # "plugin:name" -> Demo
        self._unavailable: list[Patcher] = []  # offered by unavailable plugins: named in error messages

    # -- loading -----------------------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load every plugin of the entry-point ``group``, isolating failures per plugin."""
        disabled = _disabled_plugins()
        for ep in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
            version = ep.dist.version if ep.dist is not None else None
            if ep.name in self._infos:
                continue
            if ep.name in disabled:
                self._infos[ep.name] = PluginInfo(ep.name, version, "skipped", "disabled by PATCHKIT_DISABLE_PLUGINS")
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not break the host
                self._fail(ep.name, version, f"import of {ep.value!r} failed: {exc!r}", exc)
                continue
            self.add_plugin(plugin, name=ep.name, version=version)

    def add_plugin(self, plugin: Any, *, name: str | None = None, version: str | None = None) -> PluginInfo:
        """Register ``plugin`` (a module or object with hook implementations) and run its hooks.

        Returns its :class:`PluginInfo`. An API mismatch skips it; a missing package (``REQUIRES``)
        or a negative ``available()`` probe makes it ``unavailable``; exceptions and invalid
        registrations fail it (or raise :class:`PluginError` under ``PATCHKIT_STRICT_PLUGINS=1``).
        Raises :class:`PluginError` if a plugin of that name is already loaded.
        """
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self._infos and self._infos[name].status == "loaded":
            raise PluginError(
                f"cannot add plugin {name!r} ({plugin!r}): a plugin named {name!r} is already loaded; "
                "pass add_plugin(..., name='another-name')"
            )
        if ":" in name:
            return self._fail(name, version, f"plugin name {name!r} must not contain ':'", PluginError(name))
        if name in _disabled_plugins():
            info = PluginInfo(name, version, "skipped", "disabled by PATCHKIT_DISABLE_PLUGINS")
            self._infos[name] = info
            return info
        try:
            problem = _api_problem(plugin)
            unavailable = _availability_problem(plugin) if problem is None else None
        except Exception as exc:
            return self._fail(name, version, str(exc) if isinstance(exc, PluginError) else repr(exc), exc)
        if problem is not None:
            info = PluginInfo(name, version, "skipped", problem)
            self._infos[name] = info
            return info
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validates hook names and arguments here
            return self._fail(name, version, f"invalid hook implementation: {exc}", exc)
        patchers: list[Patcher] = []
        backends: list[AttentionBackend] = []
        demos: list[Any] = []
        try:
            self._call_hooks(
                name, "register_patchers", lambda obj: patchers.append(self._check_patcher(name, obj, patchers))
            )
            self._call_hooks(
                name, "register_attention_backends", lambda obj: backends.append(self._check_backend(name, obj))
            )
            self._call_hooks(name, "register_demos", lambda obj: demos.append(self._check_demo(name, obj, demos)))
        except Exception as exc:
            self._pm.unregister(name=name)
            if unavailable is not None:  # the hooks may need the missing package: still unavailable
                return self._store(name, version, "unavailable", unavailable, [], [])
            return self._fail(name, version, f"{exc!r}" if not isinstance(exc, PluginError) else str(exc), exc)
        if unavailable is not None:
            self._pm.unregister(name=name)
            self._unavailable += patchers
            return self._store(name, version, "unavailable", unavailable, patchers, backends)
        for patcher in patchers:
            self._patchers[patcher.qualname] = patcher
        for backend in backends:
            self._backends[backend.name] = backend
        for demo in demos:
            self._demos[f"{name}:{demo.name}"] = demo
        return self._store(name, version, "loaded", "", patchers, backends)

    def _store(
        self,
        name: str,
        version: str | None,
        status: Status,
        reason: str,
        patchers: list[Patcher],
        backends: list[AttentionBackend],
    ) -> PluginInfo:
        info = PluginInfo(
            name,
            version,
            status,
            reason,
            [p.name for p in patchers],
            [b.name for b in backends],
            [PatcherSummary(p.name, p.qualname, p.kind, p.family, p.covers, p.description) for p in patchers],
            [BackendSummary(b.name, missing_packages(b.packages), b.description) for b in backends],
        )
        self._infos[name] = info
        return info

    def _call_hooks(self, plugin_name: str, hook_name: str, register: Callable[[Any], None]) -> None:
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == plugin_name:
                try:
                    impl.function(register=register)
                except PluginError as exc:
                    raise PluginError(f"{exc} (in {_where(impl.function)})") from exc

    def _fail(self, name: str, version: str | None, reason: str, exc: BaseException) -> PluginInfo:
        info = PluginInfo(name, version, "failed", reason)
        self._infos[name] = info
        if _strict_plugins():
            raise PluginError(f"plugin {name!r} failed: {reason}") from exc
        return info

    # -- validation at registration (strict, quoting the offending definition) -----------------
    def _check_patcher(self, plugin: str, obj: Any, pending: list[Patcher]) -> Patcher:
        if not isinstance(obj, Patcher):
            raise PluginError(f"plugin {plugin!r} registered {obj!r}; register_patchers takes patchkit.Patcher objects")
        problems = []
        if obj.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, not {obj.kind!r}")
        if isinstance(obj.match, str):
            problems.append("match must be a class, a tuple of classes or a predicate, never a class-name string")
        elif not isinstance(obj.match, (type, tuple)) and not callable(obj.match):
            problems.append("match must be a class, a tuple of classes or a callable")
        for hook in ("build", "check", "restore", "setup", "save"):
            value = getattr(obj, hook)
            if value is not None and not callable(value):
                problems.append(f"{hook} must be callable")
        if not obj.name or not obj.family:
            problems.append("name and family must be non-empty")
        if ":" in obj.name:
            problems.append("name must not contain ':' (the registry scopes it as plugin:name)")
        if not isinstance(obj.covers, tuple) or not all(isinstance(c, str) and c for c in obj.covers):
            problems.append("covers must be a tuple of non-empty strings, e.g. ('LlamaAttention', 'MistralAttention')")
        if obj.options is not None and not isinstance(obj.options, Mapping):
            problems.append("options must be a mapping {option name: description} or None")
        if obj.same_checkpoint not in (None, True, False):
            problems.append("same_checkpoint must be True, False or None")
        if any(p.name == obj.name for p in pending):
            problems.append(f"plugin {plugin!r} already registered a patcher named {obj.name!r}")
        if problems:
            raise PluginError(f"plugin {plugin!r} registered an invalid patcher {_quote(obj)}: " + "; ".join(problems))
        return dataclasses.replace(obj, plugin=plugin)

    def _check_backend(self, plugin: str, obj: Any) -> AttentionBackend:
        if not isinstance(obj, AttentionBackend):
            raise PluginError(
                f"plugin {plugin!r} registered {obj!r}; "
                "register_attention_backends takes patchkit.AttentionBackend objects"
            )
        if obj.name in self._backends:
            raise PluginError(
                f"plugin {plugin!r} (the newcomer) registered {_quote(obj)}, a name already offered by plugin "
                f"{self._backends[obj.name].plugin!r}, which stays loaded: rename the backend"
            )
        if not callable(obj.varlen) or not callable(obj.unavailable):
            raise PluginError(f"plugin {plugin!r} registered {_quote(obj)}: varlen and unavailable must be callable")
        return dataclasses.replace(obj, plugin=plugin)

    def _check_demo(self, plugin: str, obj: Any, pending: list[Any]) -> Any:
        from .demo import Demo

        if not isinstance(obj, Demo):
            raise PluginError(f"plugin {plugin!r} registered {obj!r}; register_demos takes patchkit.Demo objects")
        if not obj.name or ":" in obj.name or not callable(obj.build):
            raise PluginError(
                f"plugin {plugin!r} registered an invalid {obj!r}: name must be non-empty without ':', build callable"
            )
        if any(d.name == obj.name for d in pending):
            raise PluginError(f"plugin {plugin!r} registered two demos named {obj.name!r}")
        return dataclasses.replace(obj, plugin=plugin)

    # -- queries -----------------------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        """Every plugin seen, in name order, with its status."""
        return [self._infos[name] for name in sorted(self._infos)]

    def patchers(self) -> list[Patcher]:
        """Every registered patcher of a loaded plugin, highest priority first, then by qualified name."""
        return sorted(self._patchers.values(), key=lambda p: (-p.priority, p.qualname))

    def patcher(self, name: str) -> Patcher:
        """The patcher ``"plugin:name"``, or the one patcher called ``name`` when only one plugin has it.

        Raises :class:`KeyError` naming the candidates when ``name`` is unknown or ambiguous.
        """
        if name in self._patchers:
            return self._patchers[name]
        found = [p for p in self._patchers.values() if p.name == name]
        if len(found) == 1:
            return found[0]
        if found:
            raise KeyError(f"patcher name {name!r} is ambiguous: say {sorted(p.qualname for p in found)}")
        raise KeyError(f"no patcher {name!r}; registered: {sorted(self._patchers)}")

    def unavailable_patchers(self) -> list[Patcher]:
        """Patchers offered by plugins that are ``unavailable`` here (not used; named in error messages)."""
        return list(self._unavailable)

    def attention_backends(self) -> dict[str, AttentionBackend]:
        """Registered attention kernels by name."""
        return dict(self._backends)

    def demos(self) -> dict[str, Any]:
        """Registered demos (``patchkit demo``) by ``"plugin:name"``."""
        return dict(self._demos)


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry, filled from entry points on first use."""
    global _default
    if _default is None:
        registry = Registry()
        registry.load_entry_points()
        _default = registry
    return _default


def reset_default_registry() -> None:
    """Forget the process-wide registry so the next use re-discovers entry points."""
    global _default
    _default = None


__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGIN_API_VERSION",
    "BackendSummary",
    "PatcherSummary",
    "PluginInfo",
    "Registry",
    "default_registry",
    "reset_default_registry",
]
