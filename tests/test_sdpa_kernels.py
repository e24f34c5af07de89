"""The sdpa fastpath takes its varlen kernels from the registry (issue 11.4): a third party's
kernel reaches it, and a kernel that fails is reported once and replaced by exact grouped masked SDPA calls."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from exactness import batch, logits, tiny_bert, tiny_opt

import patchkit
from patchkit import AttentionBackend, Registry

pytest.importorskip("transformers")


def _registry_with_kernel(varlen: Callable[..., Any]) -> Registry:
    registry = Registry()
    registry.load_entry_points()
    plugin = types.ModuleType("cpu_kernel_plugin")

    @patchkit.hookimpl
    def register_attention_backends(register: Callable[[Any], None]) -> None:
        register(
            AttentionBackend(
                name="test-cpu-varlen",
                varlen=varlen,
                unavailable=lambda device, dtype, needs: None if str(device) == "cpu" else "CPU only",
                priority=100,
                features=frozenset({"backward", "gqa", "dropout"}),
                description="a third party's CPU varlen kernel (the reference loop, counted)",
            )
        )

    plugin.register_attention_backends = register_attention_backends  # type: ignore[attr-defined]
    assert registry.add_plugin(plugin, name="cpu_kernel_plugin").status == "loaded"
    return registry


@pytest.mark.parametrize("make", [tiny_bert, tiny_opt], ids=["bert", "opt"])
def test_a_registered_kernel_reaches_the_sdpa_fastpath(make: Callable[[], torch.nn.Module]) -> None:
    from patchkit_flash2.backends import reference_varlen

    calls: list[int] = []

    def counted(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(q.shape[0])
        return reference_varlen(q, *args, **kwargs)

    model = make()
    inputs = batch()
    ref = logits(model, inputs)
    patchkit.apply(model, attention="sdpa", registry=_registry_with_kernel(counted))
    out = logits(model, inputs)
    valid = inputs["attention_mask"].bool()
    assert calls, "the registered kernel was never called"
    assert torch.allclose(out[valid], ref[valid], atol=1e-5)
    patchkit.reverse(model)


def test_a_failing_kernel_is_reported_once_and_the_fallback_stays_exact() -> None:
    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("no kernel for this head size")

    model = tiny_bert()
    inputs = batch()
    ref = logits(model, inputs)
    patchkit.apply(model, attention="sdpa", registry=_registry_with_kernel(broken))
    with pytest.warns(patchkit.PatchkitWarning, match="test-cpu-varlen.*grouped masked SDPA calls"):
        out = logits(model, inputs)
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(out[valid], ref[valid], atol=1e-5)
    patchkit.reverse(model)
