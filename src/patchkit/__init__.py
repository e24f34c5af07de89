"""patchkit: patch PyTorch / Hugging Face models in place through plugins, and reverse exactly.

import patchkit
report = patchkit.apply(model, attention="sdpa")   # or quantize="int8", ...
print(report)
patchkit.reverse(model)                             # the original objects, back in place
"""

from __future__ import annotations

from .attention_backends import AttentionBackend
from .checkpoint import TensorSource
from .demo import Demo, DemoCase
from .engine import applied, apply, is_patched, patched, plan, reverse, save_pretrained
from .errors import (
    ArgumentError,
    ConflictError,
    NotPatchedError,
    PatchedModelError,
    PatchError,
    PluginError,
    UnsupportedError,
)
from .hookspecs import hookimpl
from .loading import from_pretrained
from .modules import share_as
from .patcher import PatchContext, Patcher, Requirements
from .pipeline import PatchkitWarning, PatchReport, Swap
from .planning import Plan
from .registry import PluginInfo, Registry, default_registry


def plugins() -> list[PluginInfo]:
    """Every discovered plugin: name, version, status (loaded / unavailable / skipped / failed), reason
    (with the install hint when unavailable), patchers (scoped names, kind, family, what they cover)
    and attention backends (with why one cannot run here)."""
    return default_registry().plugins()


__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "AttentionBackend",
    "ConflictError",
    "Demo",
    "DemoCase",
    "NotPatchedError",
    "PatchContext",
    "PatchError",
    "PatchReport",
    "PatchedModelError",
    "PatchkitWarning",
    "Patcher",
    "Plan",
    "PluginError",
    "PluginInfo",
    "Registry",
    "Requirements",
    "Swap",
    "TensorSource",
    "UnsupportedError",
    "applied",
    "apply",
    "default_registry",
    "from_pretrained",
    "hookimpl",
    "is_patched",
    "patched",
    "plan",
    "plugins",
    "reverse",
    "save_pretrained",
    "share_as",
]
