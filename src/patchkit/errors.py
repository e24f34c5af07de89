"""patchkit's exceptions: one base class, one subclass per way things go wrong.

Every message says what happened *and* what to do about it.
"""

from __future__ import annotations


class PatchError(Exception):
    """Base class of every error patchkit raises on purpose."""


class UnsupportedError(PatchError):
    """A requirement is not met (device, dtype, package, model feature); nothing was changed."""


class ConflictError(PatchError):
    """Two patchers claim one module with equal priority, or a kind is applied twice."""


class NotPatchedError(PatchError):
    """`reverse` (or a journal lookup) was called on a model patchkit has not patched."""


class PatchedModelError(PatchError):
    """The model is patched and the operation (saving, pushing) needs the original; call reverse first."""


class PluginError(PatchError):
    """A plugin failed to load or registered something invalid."""


class ArgumentError(PatchError, TypeError):
    """An argument of the wrong type or form (e.g. ``only=123``); the message says what is expected."""
