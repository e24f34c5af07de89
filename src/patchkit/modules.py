"""Helpers for patchers that replace a module: build the replacement around the same parameters."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def share_as(module: nn.Module, cls: type[M]) -> M:
    """A new instance of ``cls`` (a subclass of ``type(module)``) that shares everything with ``module``.

    Parameters, buffers and submodules are the *same objects* (training the replacement trains the
    user's tensors); their containers and the hook dicts are fresh copies, so later changes to the
    replacement's containers do not leak into the original. ``__init__`` is not called.
    """
    if not (isinstance(cls, type) and issubclass(cls, type(module))):
        raise TypeError(f"share_as needs a subclass of {type(module).__name__}, got {cls!r}")
    replacement = cls.__new__(cls)
    state = dict(module.__dict__)
    for key, value in state.items():
        # nn.Module keeps its registries (parameters, buffers, modules, hooks) in private dicts/sets.
        if key.startswith("_") and isinstance(value, (dict, set)):
            state[key] = value.copy()
    replacement.__dict__.update(state)
    return replacement
