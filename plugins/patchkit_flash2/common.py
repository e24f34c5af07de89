"""Helpers shared by the Llama/Mistral and Falcon patchers: backend choice, base-model lookup."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from patchkit import UnsupportedError
from patchkit.toolkit import AttentionBackend, resolve_backend


def first_param(module: nn.Module) -> torch.Tensor | None:
    """A parameter of ``module`` (its device and dtype stand for the module's)."""
    return next(module.parameters(), None)


def pick_backend(module: nn.Module, ctx: Any, needs: set[str]) -> AttentionBackend:
    """Resolve ``ctx.backend`` for ``module``'s device/dtype and the features it ``needs``; raises
    :class:`UnsupportedError` (saying what to change) when no kernel fits. Changes nothing."""
    param = first_param(module)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    if module.training:
        needs = needs | {"backward"}
    return resolve_backend(ctx.registry.attention_backends(), ctx.backend, device, dtype, frozenset(needs))


def owning_base(root: nn.Module, module: nn.Module, base_classes: tuple[type, ...]) -> nn.Module | None:
    """The base model (an instance of ``base_classes``) under ``root`` that contains ``module``."""
    for candidate in root.modules():
        if isinstance(candidate, base_classes) and any(m is module for m in candidate.modules()):
            return candidate
    return None


def require_base(root: nn.Module, module: nn.Module, base_classes: tuple[type, ...]) -> nn.Module:
    """:func:`owning_base`, or :class:`UnsupportedError` when ``root`` holds no such base model."""
    base = owning_base(root, module, base_classes)
    if base is None:
        names = " / ".join(cls.__name__ for cls in base_classes)
        raise UnsupportedError(
            f"flash2 patches attention through its {names}: apply it to the whole model (or its {names}), "
            "not to a lone layer"
        )
    return base


def check_output_attentions(config: Any) -> None:
    """Refuse a config that asks for attention weights (varlen kernels compute none)."""
    if getattr(config, "output_attentions", False):
        raise UnsupportedError(
            "config.output_attentions is True but flash2 computes no attention weights: set it to False"
        )


def route_through_patchkit(
    base: nn.Module,
    ctx: Any,
    padding_free: bool,
    why_not: str = "",
    carrier: str = "kwargs",
    off_reason: tuple[str, str] | None = None,
) -> None:
    """Point ``base``'s config at ``"patchkit"`` and wrap its forward (padding-free or not), both
    journaled, and note it in the report; ``why_not`` says why padding-free is off, if it is.

    ``carrier="context"``: the host passes no per-call kwargs to its layers (Falcon), so a packed
    call's boundaries travel in :class:`dispatch.ActiveForward`; ``off_reason`` is the warning a
    call that could have been padding-free gives (see :class:`padfree.PatchedForward`)."""
    from . import dispatch, padfree

    config = base.config
    # recorded before the change (a harmless no-op if acquire never happens); a partial over
    # objects, not a closure, so that a deep copy of the model releases its own config
    ctx.on_reverse(functools.partial(dispatch.release_config, config, base), "config attention implementation back")
    previous = dispatch.acquire_config(config, base)
    from patchkit.paths import LOG_ATTR, check_choice

    from .paths import describe_rule

    wrapper = padfree.make_forward(
        base,
        base.forward,
        padding_free=padding_free,
        pass_kwargs=padding_free and carrier == "kwargs",
        carrier=carrier,
        off_reason=off_reason,
        path=check_choice(ctx.option("path")),
    )
    ctx.set_attr(base, "forward", wrapper)
    ctx.set_attr(base, LOG_ATTR, wrapper.log)
    ctx.note(f"path per call: {describe_rule()}")
    ctx.note(
        f"{type(base).__name__}: attention via {dispatch.KEY!r} (was {previous!r}), "
        f"padding-free {'on' if padding_free else 'off'}" + (f" ({why_not})" if why_not else "")
    )
