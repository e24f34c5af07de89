"""The toolkit for plugin authors: what attention and quantization patchers share, in one place.

Import from here, not from the modules behind it::

    from patchkit.toolkit import governed, grouped_sdpa, hooked_modules, plan_groups, require_known

What it offers (each name's docstring states its contract):

- **Varlen attention without a varlen kernel** (:mod:`patchkit.varlen`): :class:`Group`,
  :func:`plan_groups`, :func:`grouped_sdpa`.
- **Re-padding packed keys/values for a KV cache**: :class:`PaddedBuffers`.
- **Running a packed region on the free cores of a busy CPU**: :func:`governed`.
- **Attention kernels by name**: :class:`AttentionBackend`, :func:`resolve_backend`.
- **Hook detection**: :func:`foreign_hooks`, :func:`global_hooks`, :func:`hooked_modules`, and
  :func:`share_hooks` for a replacement built from scratch (``patchkit.share_as`` shares hooks itself).
- **Dispatch detection**: :func:`dispatch_keywords` (which keywords a method passes to a named
  dispatch call, read from its source).
- **Source fingerprints** of the library code a re-derived path mirrors: :func:`fingerprint`,
  :func:`require_known`, :func:`trusted`.

Stability: every name in ``__all__`` is part of plugin API 1 (``patchkit.registry.PLUGIN_API_VERSION``):
within API 1 it keeps its signature and meaning; new names and new keyword arguments with defaults
may be added (a minor API version). Anything else under ``patchkit`` that this module re-exports
(``patchkit.varlen``, ``patchkit.padded``, ``patchkit.threads``, ``patchkit.attention_backends``) is
where the code lives today, not a promise. The toolkit knows no architecture: it names no model
class and imports no model library.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from torch import nn

from .attention_backends import AttentionBackend, resolve_backend
from .errors import UnsupportedError
from .padded import PaddedBuffers
from .threads import governed
from .varlen import Group, grouped_sdpa, plan_groups

__all__ = [
    "GLOBAL_HOOK_DICTS",
    "HOOK_DICTS",
    "SHARED_HOOK_DICTS",
    "TRUST_ENV",
    "TRUST_OPTION",
    "AttentionBackend",
    "Group",
    "PaddedBuffers",
    "dispatch_keywords",
    "fingerprint",
    "foreign_hooks",
    "global_hooks",
    "governed",
    "grouped_sdpa",
    "hooked_modules",
    "is_inert_hook",
    "plan_groups",
    "require_known",
    "resolve_backend",
    "share_hooks",
    "trusted",
]

# -- hook detection ------------------------------------------------------------------------------

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
"""The per-instance ``nn.Module`` dicts that hold forward / pre-forward / backward hooks (handle id -> hook)."""

SHARED_HOOK_DICTS = (
    *HOOK_DICTS,
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
""":data:`HOOK_DICTS` plus torch's per-hook flags (which hooks take kwargs / always run): what
:func:`share_hooks` shares. State-dict and load hooks are not among them."""

GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
"""The process-wide dicts in ``torch.nn.modules.module`` behind ``register_module_*_hook``."""


def is_inert_hook(hook: Any) -> bool:
    """True for transformers' ``output_capturing_hook``: a no-op unless a call asks for hidden states or
    attentions (``output_hidden_states`` / ``output_attentions``), and it stays installed after one such
    call. A patcher that counts it as inert must itself send capturing calls down the original path."""
    return getattr(hook, "__name__", None) == "output_capturing_hook" and str(
        getattr(hook, "__module__", "")
    ).startswith("transformers.")


def _names(hooks: Any) -> list[str]:
    return [getattr(h, "__name__", type(h).__name__) for h in (hooks or {}).values() if not is_inert_hook(h)]


def foreign_hooks(module: nn.Module) -> list[str]:
    """Names of the forward, pre-forward (with or without kwargs) and backward hooks registered on
    ``module`` itself (not its children), other than inert ones (:func:`is_inert_hook`), in
    :data:`HOOK_DICTS` order. Empty: calling ``module`` runs only its ``forward``. Reads only; cheap
    when there are none (a few dict lookups), so it may run on every forward."""
    d = getattr(module, "__dict__", {})
    if not any(d.get(attr) for attr in HOOK_DICTS):
        return []
    return [name for attr in HOOK_DICTS for name in _names(d.get(attr))]


def global_hooks() -> list[str]:
    """Names of the process-wide module hooks (``torch.nn.modules.module.register_module_forward_hook``
    and friends, :data:`GLOBAL_HOOK_DICTS`), other than inert ones. They fire on every module call, so
    a path that calls modules differently from the original is seen by them."""
    from torch.nn.modules import module as torch_module

    return [name for attr in GLOBAL_HOOK_DICTS for name in _names(getattr(torch_module, attr, None))]


def hooked_modules(region: Any, exempt: Collection[Any] = (), *, include_global: bool = True) -> list[str]:
    """Where a hook would see calls that a re-derived path makes differently from the original, or not
    at all, in ``region`` (an ``nn.Module``): ``"<qualified name> (<class>): [hook names]"`` for every
    module strictly inside ``region`` (``region`` itself is called as unpatched) with
    :func:`foreign_hooks`, except the ``exempt`` modules (ones the path calls exactly as the original
    does; compared by identity), then, with ``include_global``, ``"global module hooks [names]"`` when
    :func:`global_hooks` finds any. Empty: no hook can tell the difference. Reads only; built to run on
    every forward (one cheap pass over the modules when no hook is registered)."""
    found = []
    # Cheap first pass: almost every module has four empty hook dicts.
    modules = region.modules()
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules):
        for name, module in region.named_modules():
            if module is region or any(module is e for e in exempt):
                continue
            if hooks := foreign_hooks(module):
                found.append(f"{name} ({type(module).__name__}): {hooks}")
    if include_global and (hooks := global_hooks()):
        found.append(f"global module hooks {hooks}")
    return found


def share_hooks(original: nn.Module, replacement: nn.Module) -> None:
    """Make ``replacement`` use ``original``'s forward/backward hook dicts (:data:`SHARED_HOOK_DICTS`,
    the same dict objects, not copies): a hook registered or removed on either while patched has the
    same effect on the other, so it is still there (or still gone) after reverse. For replacements
    not built with ``patchkit.share_as`` (which shares every hook dict itself). Journaling is the
    caller's business: call it on a freshly built replacement, before the swap."""
    for name in SHARED_HOOK_DICTS:
        replacement.__dict__[name] = getattr(original, name)


# -- source fingerprints -------------------------------------------------------------------------

TRUST_ENV = "PATCHKIT_TRUST_TRANSFORMERS"
"""Environment variable: set (to anything but ``""`` or ``"0"``) to patch unrecorded library sources."""
TRUST_OPTION = "trust_transformers"
"""The ``apply`` keyword option with the same effect as :data:`TRUST_ENV`; declare it in your patcher's
``options``."""


@functools.cache
def _source(fn: Callable[..., Any]) -> str:
    return textwrap.dedent(inspect.getsource(fn))  # getsource unwraps decorators (and includes their lines)


def fingerprint(functions: Sequence[Callable[..., Any]]) -> str:
    """sha256 (hex) over the qualified name and dedented source text of each of ``functions``, in
    order. Any change to the text (a comment included) changes it; the source is read once per
    function and process. Record its value per library release a re-derived path was checked on."""
    digest = hashlib.sha256()
    for fn in functions:
        digest.update(f"{fn.__qualname__}\n{_source(fn)}\n".encode())
    return digest.hexdigest()


def trusted(ctx: Any) -> bool:
    """The user asked to patch whatever library source is installed: :data:`TRUST_ENV` is set, or
    ``ctx`` (a ``PatchContext``, or ``None``) carries the option :data:`TRUST_OPTION`."""
    return os.environ.get(TRUST_ENV, "") not in ("", "0") or bool(ctx is not None and ctx.option(TRUST_OPTION))


def _library(functions: Sequence[Callable[..., Any]]) -> tuple[str, str]:
    """(top-level package of the first function, ``"<package> <version>"`` as installed)."""
    top = str(getattr(functions[0], "__module__", "") or "").split(".")[0] if functions else ""
    version = getattr(sys.modules.get(top), "__version__", None)
    return top or "its library", f"{top} {version}" if version else (top or "library")


def require_known(what: str, functions: Sequence[Callable[..., Any]], known: Mapping[str, str], ctx: Any = None) -> str:
    """Check that the installed source of ``functions`` (the library methods the path ``what``
    re-derives) is one the path was checked on: ``known`` maps release -> :func:`fingerprint`.

    Returns the matching release, or ``""`` when none matches but the user trusts the installed
    source (:func:`trusted`). Otherwise raises :class:`patchkit.UnsupportedError` naming ``what``, the
    functions, the installed library and version and the recorded releases, and saying how to go
    on (``strict=False`` leaves the module alone with that reason; :data:`TRUST_ENV` /
    :data:`TRUST_OPTION` patch anyway). Call it from ``check``; it changes nothing."""
    value = fingerprint(functions)
    for release, expected in known.items():
        if value == expected:
            return release
    if trusted(ctx):
        return ""
    names = ", ".join(fn.__qualname__ for fn in functions)
    package, installed = _library(functions)
    raise UnsupportedError(
        f"{what} re-derives {names} from {package}; their source in the installed {installed} "
        f"differs from the releases it was checked against ({', '.join(known)}). "
        f"Leave the model unpatched (strict=False), or, after checking the results, set {TRUST_ENV}=1 "
        f"or pass {TRUST_OPTION}=True to patch anyway"
    )


@functools.cache
def dispatch_keywords(method: Callable[..., Any], table: str, call: str) -> frozenset[str] | None:
    """The keyword names ``method`` passes to ``call(...)``, read from its source, when the source
    looks its callee up in the dispatch table named ``table`` (for transformers' attention:
    ``table="ALL_ATTENTION_FUNCTIONS"``, ``call="attention_interface"``); ``None`` when it does not
    dispatch through that table, or has no source. A pure function of the source: cached per method.
    A patcher that routes the table's calls to its own kernel compares these names with what the
    kernel implements, and refuses the rest."""
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return None
    if table not in source or f"{call}(" not in source:
        return None
    keywords: set[str] = set()
    for found in re.finditer(rf"{re.escape(call)}\((.*?)\n\s*\)", source, re.S):
        keywords.update(re.findall(r"\b([a-z_]+)\s*=", found.group(1)))
    return frozenset(keywords)
