"""Refusing a move to the meta device while quantized, before anything moves.

``model.to("meta")`` (or ``to_empty(device="meta")``) reaches every module through
``nn.Module._apply``, children first: on a quantized model bitsandbytes' parameter classes raise
half-way, after the modules visited earlier were already moved, and the quantized weights cannot
come back from meta (reverse has nothing to dequantize, ``load_state_dict`` is refused). So the
model root (journaled in the patchers' ``setup``) and each quantized layer (an attribute of the
layer patchkit built) get an instance ``_apply`` that asks where the move goes first, on a
zero-element tensor, and refuses a move to meta with :class:`PatchedModelError`; every other
``_apply`` (``.to("cpu")``, ``.half()``, ``.cuda()``) is the class method, unchanged. No class is
modified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from patchkit import PatchedModelError

ATTR = "_apply"


def moves_to_meta(fn: Callable[[torch.Tensor], Any]) -> bool:
    """True when ``fn`` (the function ``_apply`` maps over tensors) puts a tensor on the meta device."""
    try:
        probe = fn(torch.empty(0))
    except Exception:  # a conversion this probe cannot run: not a meta move patchkit can tell; let it run
        return False
    return isinstance(probe, torch.Tensor) and probe.device.type == "meta"


class MetaMoveGuard:
    """The instance ``_apply`` of a quantized layer or of the quantized model's root.

    An object holding its module, not a closure: a deep copy of the model gets a guard of the copy.
    ``previous`` is an instance ``_apply`` that was there before (called instead of the class method).
    """

    def __init__(self, module: nn.Module, previous: Any = None) -> None:
        self.module, self.previous = module, previous

    def __call__(self, fn: Callable[[torch.Tensor], Any], recurse: bool = True) -> nn.Module:
        if moves_to_meta(fn):
            raise PatchedModelError(
                f"moving {type(self.module).__name__} to the meta device is refused: it holds bitsandbytes layers "
                "quantized by patchkit, whose packed weights cannot come back from meta (reverse and "
                "load_state_dict would be impossible). Nothing was moved. Call patchkit.reverse(model) first, "
                "then move the model"
            )
        if self.previous is not None:
            return self.previous(fn, recurse)
        return type(self.module)._apply(self.module, fn, recurse)


def guard_root(root: nn.Module, set_attr: Callable[[Any, str, Any], None]) -> None:
    """Install the guard on ``root`` through ``set_attr`` (the journaled ``ctx.set_attr``)."""
    set_attr(root, ATTR, MetaMoveGuard(root, root.__dict__.get(ATTR)))


def guard_layer(layer: nn.Module) -> None:
    """Install the guard on a quantized layer patchkit built (it leaves the model with reverse)."""
    layer.__dict__[ATTR] = MetaMoveGuard(layer)
