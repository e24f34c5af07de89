"""Verify a module's code by its structure, not its name.

Model families copied from BERT by transformers' modular tooling (RoBERTa, XLM-R, ...) have
classes with different names but byte-identical forward code. Comparing compiled code objects
with the reference class proves the packed path computes what the module computes; a class whose
code differs in any way (a different residual order, relative positions) is refused.

Hook detection lives in the core toolkit (:func:`patchkit.toolkit.hooked_modules` and friends).
"""

from __future__ import annotations

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
