"""Verify a module's code by its structure, not its name.

Model families copied from BERT by transformers' modular tooling (RoBERTa, XLM-R, ...) have
classes with different names but byte-identical forward code. Comparing compiled code objects
with the reference class proves the packed path computes what the module computes; a class whose
code differs in any way (a different residual order, relative positions) is refused.
"""

from __future__ import annotations

from collections.abc import Collection
from types import CodeType
from typing import Any


def unwrap(fn: Any) -> Any:
    """``fn`` with every decorator layer (``__wrapped__``) removed."""
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _code_key(code: CodeType) -> tuple[Any, ...]:
    consts = tuple(_code_key(c) if isinstance(c, CodeType) else (type(c).__name__, repr(c)) for c in code.co_consts)
    return (code.co_code, code.co_names, code.co_varnames, code.co_argcount, code.co_kwonlyargcount, consts)


def same_code(fn: Any, reference: Any) -> bool:
    """True when ``fn`` and ``reference`` (functions, possibly decorated) compile to the same code."""
    a, b = unwrap(fn), unwrap(reference)
    if a is b:
        return True
    ca, cb = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return ca is not None and cb is not None and _code_key(ca) == _code_key(cb)


def _accelerate_wrapped(module: Any, name: str) -> bool:
    """accelerate's device hook: ``forward`` wraps ``_old_forward``, the class's own forward, bound to
    this module. ``patchkit.share_as`` carries such a hook onto the replacement, so it is no obstacle."""
    old = module.__dict__.get("_old_forward")
    return (
        name == "forward"
        and hasattr(module, "_hf_hook")
        and getattr(old, "__self__", None) is module
        and getattr(old, "__func__", None) is getattr(type(module), name, None)
    )


def method_differs(
    module: Any, reference_cls: type, name: str = "forward", *, allow_accelerate: bool = False
) -> str | None:
    """``None`` when ``type(module).<name>`` has the reference's code and no instance override, else why not.

    ``allow_accelerate``: accept accelerate's device hook as the only override (for the module that is
    replaced, whose hook travels with it; never for modules whose forward the packed path bypasses).
    """
    if name in getattr(module, "__dict__", {}) and not (allow_accelerate and _accelerate_wrapped(module, name)):
        return f"{type(module).__name__}.{name} is overridden on the instance"
    if not same_code(getattr(type(module), name, None), getattr(reference_cls, name)):
        return f"{type(module).__name__}.{name} differs from {reference_cls.__name__}.{name}"
    return None


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _inert(hook: Any) -> bool:
    """transformers' output-capture hook: a no-op unless a capturing call is active, which the packed
    paths detect before any layer runs (``_runtime.capture_requested``) and hand to the original."""
    return getattr(hook, "__name__", None) == "output_capturing_hook" and str(
        getattr(hook, "__module__", "")
    ).startswith("transformers.")


def foreign_hooks(module: Any) -> list[str]:
    """Names of forward/backward hooks (pre, post, with kwargs) on ``module``, other than transformers'
    inert output-capturing ones."""
    d = getattr(module, "__dict__", {})
    if not any(d.get(attr) for attr in _HOOK_DICTS):
        return []  # the common case, checked for every module on every packed forward
    found = []
    for attr in _HOOK_DICTS:
        for hook in (getattr(module, attr, None) or {}).values():
            if not _inert(hook):
                found.append(getattr(hook, "__name__", type(hook).__name__))
    return found


def global_hooks() -> list[str]:
    """Names of global module hooks (``torch.nn.modules.module.register_module_*_hook``): they fire on
    every module call, so they would see the packed path's different calls."""
    from torch.nn.modules import module as globals_

    found = []
    for attr in _GLOBAL_HOOK_DICTS:
        for hook in (getattr(globals_, attr, None) or {}).values():
            if not _inert(hook):
                found.append(getattr(hook, "__name__", type(hook).__name__))
    return found


def hooked_modules(region: Any, exempt: Collection[Any] = (), *, include_global: bool = True) -> list[str]:
    """Where a hook would see a call the packed path makes differently, or not at all: ``"<path>:
    [hook names]"`` for every module strictly inside ``region`` (``region`` itself is called as
    unpatched) with :func:`foreign_hooks`, except the ``exempt`` modules (ones the packed path calls
    exactly as the original does), plus ``"global module hooks [...]"``. Empty: no difference."""
    found = []
    # Cheap first pass (called on every forward): most modules have four empty hook dicts.
    if any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in region.modules()
    ):
        for name, module in region.named_modules():
            if module is region or any(module is e for e in exempt):
                continue
            if hooks := foreign_hooks(module):
                found.append(f"{name} ({type(module).__name__}): {hooks}")
    if include_global and (hooks := global_hooks()):
        found.append(f"global module hooks {hooks}")
    return found
