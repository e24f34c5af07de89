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
from .attention_backends import AttentionBackend
from .errors import PluginError
from .patcher import KINDS, Patcher

ENTRY_POINT_GROUP = "patchkit"
PLUGIN_API_VERSION = "1.0"

Status = Literal["loaded", "skipped", "failed"]


@dataclass
class PluginInfo:
    """One plugin as ``patchkit plugins`` lists it."""

    name: str
    version: str | None
    status: Status
    reason: str = ""
    patchers: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)


def _strict_plugins() -> bool:
    return os.environ.get("PATCHKIT_STRICT_PLUGINS", "") not in ("", "0")


def _disabled_plugins() -> set[str]:
    raw = os.environ.get("PATCHKIT_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def _version_problem(plugin: Any) -> str | None:
    """Why ``plugin``'s declared ``PATCHKIT_API`` / ``REQUIRES`` rule it out here, or ``None``."""
    wanted: dict[str, str] = {}
    api = getattr(plugin, "PATCHKIT_API", None)
    requires: Mapping[str, str] = getattr(plugin, "REQUIRES", None) or {}
    if api is not None:
        wanted["patchkit plugin API"] = str(api)
    wanted.update({str(k): str(v) for k, v in requires.items()})
    for package, spec in wanted.items():
        try:
            SpecifierSet(spec)
        except InvalidSpecifier as exc:
            raise PluginError(f"invalid version specifier {spec!r} for {package!r}: {exc}") from exc
        if package == "patchkit plugin API":
            have: str | None = PLUGIN_API_VERSION
        else:
            try:
                have = metadata.version(package)
            except metadata.PackageNotFoundError:
                have = None
        if have is None:
            return f"needs {package}{spec}, which is not installed"
        if Version(have) not in SpecifierSet(spec, prereleases=True):
            return f"needs {package}{spec}, found {have}"
    return None


class Registry:
    """Plugins, their patchers and their attention backends.

    ``Registry()`` is empty; :meth:`load_entry_points` fills it from installed distributions and
    :meth:`add_plugin` from an object in hand (tests, notebooks). :func:`default_registry` is the
    process-wide one that ``patchkit.apply`` uses unless given another.
    """

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        self._patchers: dict[str, Patcher] = {}
        self._backends: dict[str, AttentionBackend] = {}

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

        Returns its :class:`PluginInfo`. Version mismatches skip it; exceptions fail it (or raise
        :class:`PluginError` under ``PATCHKIT_STRICT_PLUGINS=1``).
        """
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self._infos and self._infos[name].status == "loaded":
            raise PluginError(f"a plugin named {name!r} is already registered")
        if name in _disabled_plugins():
            info = PluginInfo(name, version, "skipped", "disabled by PATCHKIT_DISABLE_PLUGINS")
            self._infos[name] = info
            return info
        try:
            problem = _version_problem(plugin)
        except PluginError as exc:
            return self._fail(name, version, str(exc), exc)
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
        try:
            self._call_hooks(
                name, "register_patchers", lambda obj: patchers.append(self._check_patcher(name, obj, patchers))
            )
            self._call_hooks(
                name, "register_attention_backends", lambda obj: backends.append(self._check_backend(name, obj))
            )
        except Exception as exc:
            self._pm.unregister(name=name)
            return self._fail(name, version, f"{exc!r}" if not isinstance(exc, PluginError) else str(exc), exc)
        for patcher in patchers:
            self._patchers[patcher.name] = patcher
        for backend in backends:
            self._backends[backend.name] = backend
        info = PluginInfo(name, version, "loaded", "", [p.name for p in patchers], [b.name for b in backends])
        self._infos[name] = info
        return info

    def _call_hooks(self, plugin_name: str, hook_name: str, register: Callable[[Any], None]) -> None:
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == plugin_name:
                impl.function(register=register)

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
        for hook in ("build", "check", "restore", "setup"):
            value = getattr(obj, hook)
            if value is not None and not callable(value):
                problems.append(f"{hook} must be callable")
        if not obj.name or not obj.family:
            problems.append("name and family must be non-empty")
        taken = {p.name: p.plugin for p in pending} | {n: p.plugin for n, p in self._patchers.items()}
        if obj.name in taken:
            problems.append(f"the name is already taken by a patcher of plugin {taken[obj.name] or plugin!r}")
        if problems:
            raise PluginError(f"plugin {plugin!r} registered an invalid patcher {obj!r}: " + "; ".join(problems))
        return dataclasses.replace(obj, plugin=plugin)

    def _check_backend(self, plugin: str, obj: Any) -> AttentionBackend:
        if not isinstance(obj, AttentionBackend):
            raise PluginError(
                f"plugin {plugin!r} registered {obj!r}; "
                "register_attention_backends takes patchkit.AttentionBackend objects"
            )
        if obj.name in self._backends:
            raise PluginError(
                f"plugin {plugin!r} registered backend {obj.name!r}, already offered by plugin "
                f"{self._backends[obj.name].plugin!r}"
            )
        if not callable(obj.varlen) or not callable(obj.unavailable):
            raise PluginError(f"plugin {plugin!r} registered {obj!r}: varlen and unavailable must be callable")
        return dataclasses.replace(obj, plugin=plugin)

    # -- queries -----------------------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        """Every plugin seen, in name order, with its status."""
        return [self._infos[name] for name in sorted(self._infos)]

    def patchers(self) -> list[Patcher]:
        """Every registered patcher, highest priority first, then by name."""
        return sorted(self._patchers.values(), key=lambda p: (-p.priority, p.name))

    def attention_backends(self) -> dict[str, AttentionBackend]:
        """Registered attention kernels by name."""
        return dict(self._backends)


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
    "PluginInfo",
    "Registry",
    "default_registry",
    "reset_default_registry",
]
