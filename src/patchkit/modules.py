"""Helpers for patchers that replace a module: build the replacement around the same parameters."""

from __future__ import annotations

import functools
import types
from typing import Any, TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)

# nn.Module's hook registries (_forward_hooks, _backward_pre_hooks, _state_dict_hooks, ...) and the
# bookkeeping of which forward hooks take kwargs / always run: shared, never copied.
_SHARED_SUFFIXES = ("hooks", "_with_kwargs", "_always_called")


def share_as(module: nn.Module, cls: type[M]) -> M:
    """A new instance of ``cls`` (a subclass of ``type(module)``) that shares everything with ``module``.

    Parameters, buffers and submodules are the *same objects* (training the replacement trains the
    user's tensors); their containers are fresh copies, so a swap inside the replacement does not
    leak into the original. The hook dicts are *shared*: a hook registered or removed on either
    module while patched has the same effect on the other, so it is still there (or still gone)
    after reverse. ``__init__`` is not called.

    A forward wrapper installed on the instance (accelerate's device/offload hook: ``forward`` a
    partial bound to the module, ``_old_forward`` its bound method) is rebound to the replacement,
    so the replacement carries the original's hook and runs its own ``forward`` inside it.
    """
    if not (isinstance(cls, type) and issubclass(cls, type(module))):
        raise TypeError(f"share_as needs a subclass of {type(module).__name__}, got {cls!r}")
    replacement = cls.__new__(cls)
    state = dict(module.__dict__)
    for key, value in state.items():
        # nn.Module keeps its registries (parameters, buffers, modules, hooks) in private dicts/sets.
        if key.startswith("_") and isinstance(value, (dict, set)) and not key.endswith(_SHARED_SUFFIXES):
            state[key] = value.copy()
    _rebind_instance_forward(module, replacement, cls, state)
    replacement.__dict__.update(state)
    return replacement


def _rebind_instance_forward(
    original: nn.Module, replacement: nn.Module, cls: type[nn.Module], state: dict[str, Any]
) -> None:
    old = state.get("_old_forward")
    if isinstance(old, types.MethodType) and old.__self__ is original:
        state["_old_forward"] = types.MethodType(cls.forward, replacement)
    fwd = state.get("forward")
    if isinstance(fwd, functools.partial) and fwd.args and fwd.args[0] is original:
        inner = state.get("_old_forward", types.MethodType(cls.forward, replacement))
        rebound = functools.partial(fwd.func, replacement, *fwd.args[1:], **fwd.keywords)
        state["forward"] = functools.update_wrapper(rebound, inner)
    elif isinstance(fwd, types.MethodType) and fwd.__self__ is original:
        state["forward"] = types.MethodType(fwd.__func__, replacement)
