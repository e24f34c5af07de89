"""Test-only patchers and model utilities (no mocks: real modules, real registries)."""

from __future__ import annotations

import io
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import patchkit
from patchkit import Patcher, Registry


class ScaledLinear(nn.Linear):
    """A Linear subclass whose output is doubled: easy to tell apart, shares the original's params."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 2


def registry_with(*patchers: Patcher, name: str = "testplugin") -> Registry:
    """A fresh registry holding ``patchers`` registered through a real pluggy hook."""
    module = types.ModuleType(name)

    @patchkit.hookimpl
    def register_patchers(register: Callable[[Any], None]) -> None:
        for patcher in patchers:
            register(patcher)

    module.register_patchers = register_patchers  # type: ignore[attr-defined]
    registry = Registry()
    info = registry.add_plugin(module, name=name)
    assert info.status == "loaded", info
    return registry


def without_patchers(*names: str) -> Registry:
    """The installed plugins' patchers except ``names``, in a fresh registry: tests of one patcher's
    refusal use it where a lower-priority patcher would otherwise take the module (e.g. the verified
    BERT path refuses, ``sdpa-generic-encoder`` runs the model's own code instead)."""
    full = Registry()
    full.load_entry_points()
    assert all(any(p.name == n for p in full.patchers()) for n in names), names
    return registry_with(*(p for p in full.patchers() if p.name not in names), name="without")


def scaled_linear_patcher(fail_at: int | None = None, **kw: Any) -> Patcher:
    """Swap every nn.Linear for a ScaledLinear; raise on the ``fail_at``-th build (fault injection)."""
    calls = {"n": 0}

    def build(module: nn.Module, ctx: patchkit.PatchContext) -> nn.Module:
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise RuntimeError(f"injected failure at build {fail_at}")
        ctx.set_attr(module, "patched_marker", calls["n"])  # an attribute change, journaled too
        return patchkit.share_as(module, ScaledLinear)

    kw.setdefault("name", "scaled-linear")
    kw.setdefault("kind", "other")
    kw.setdefault("family", "scale")
    return Patcher(match=nn.Linear, build=build, **kw)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything reverse must restore: module and parameter identities, state bytes, flags, hooks."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return {
        "modules": [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "params": [
            (name, id(p), p.data_ptr(), p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)
        ],
        "buffers": [(name, id(b)) for name, b in model.named_buffers(remove_duplicate=False)],
        "state": buf.getvalue(),
        "training": [m.training for m in model.modules()],
        "hooks": [(tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values())) for m in model.modules()],
        "dict_keys": [sorted(m.__dict__) for m in model.modules()],
    }
