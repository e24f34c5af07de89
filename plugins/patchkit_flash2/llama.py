"""The flash2 patcher for Llama and Mistral: through transformers' own dispatch point.

Each attention module gets a journaled ``_patchkit_flash2`` attribute (its kernel); the model's
config switches to ``"patchkit"`` (journaled); the base model gets a per-instance forward wrapper
(journaled) that marks patched forwards and runs padding-free where exact. No class is touched.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from patchkit import Patcher, UnsupportedError
from patchkit.paths import OPTION as PATH_OPTION

from . import dispatch
from .common import check_output_attentions, pick_backend, require_base, route_through_patchkit


@functools.cache
def classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """``(attention classes, base model classes)``; imported on first use only."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaModel
    from transformers.models.mistral.modeling_mistral import MistralAttention, MistralModel

    return (LlamaAttention, MistralAttention), (LlamaModel, MistralModel)


def match(module: nn.Module, path: str, root: nn.Module) -> bool:
    """Llama / Mistral attention modules (and subclasses)."""
    import sys

    if "transformers" not in sys.modules:
        return False
    return isinstance(module, classes()[0])


def _needs(module: Any) -> set[str]:
    needs: set[str] = set()
    if getattr(module.config, "sliding_window", None) is not None:
        from transformers.models.mistral.modeling_mistral import MistralAttention

        if isinstance(module, MistralAttention):
            needs.add("window")
    if module.training and getattr(module, "attention_dropout", 0.0):
        needs.add("dropout")
    return needs


def check(module: Any, ctx: Any) -> str | None:
    """Refuse (UnsupportedError) when no kernel fits or the model cannot be patched as a whole."""
    require_base(ctx.root, module, classes()[1])
    check_output_attentions(module.config)
    if module.config._attn_implementation == dispatch.KEY and dispatch.STATE_ATTR in module.__dict__:
        raise UnsupportedError("this attention module is already patched by flash2: reverse first")
    pick_backend(module, ctx, _needs(module))
    return None


def build(module: Any, ctx: Any) -> None:
    """Store the kernel on the module instance (journaled); the module object stays in place."""
    backend = pick_backend(module, ctx, _needs(module))
    ctx.note(f"kernel: {backend.name} ({backend.plugin})")
    ctx.set_attr(module, dispatch.STATE_ATTR, dispatch.Flash2State(backend=backend))
    return None


def setup(root: nn.Module, ctx: Any) -> None:
    """Switch each patched base model's config to ``"patchkit"`` and wrap its forward (journaled)."""
    dispatch.register_keys()
    _, base_classes = classes()
    bases: list[Any] = [m for m in root.modules() if isinstance(m, base_classes)]
    padding_free = bool(ctx.option("padding_free", True))
    for base in bases:
        if not any(dispatch.STATE_ATTR in m.__dict__ for m in base.modules()):
            continue
        route_through_patchkit(base, ctx, padding_free)


def patcher() -> Patcher:
    """The registered patcher."""
    return Patcher(
        name="flash2-llama",
        kind="attention",
        family="flash2",
        match=match,
        check=check,
        build=build,
        setup=setup,
        priority=20,
        description="FlashAttention-2 varlen kernels for Llama and Mistral, padding-free where exact",
        covers=("LlamaAttention", "MistralAttention", "Llama", "Mistral"),
        options={"padding_free": "pack valid tokens across the model (default True)", **PATH_OPTION},
    )
