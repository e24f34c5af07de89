"""``Linear4bit`` that never casts the user's shared bias in place.

bitsandbytes' ``Linear4bit.forward`` casts the input to ``compute_dtype`` and then does
``self.bias.data = self.bias.data.to(x.dtype)`` when the bias has another dtype
(``Linear8bitLt.forward`` does the same with the input's dtype). patchkit shares the bias Parameter
with the user's original layer, so that in-place cast would round the user's tensor on the first
forward (and reverse could not be bit-identical).

The subclasses here run bitsandbytes' own forward on a :class:`_BiasView` of the layer: every
attribute read and write goes to the layer, except ``bias``, which is a copy cast (out of place,
differentiable) to the dtype bitsandbytes would have cast it to. The arithmetic is exactly
bitsandbytes' (same kernel call, same bias values), the user's Parameter keeps its dtype and bytes,
and nothing on the layer is swapped during the call (safe with concurrent forwards). Importing
this module imports bitsandbytes: only :mod:`patchkit_bnb.quantize` does, lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn


class _BiasView:
    """``layer`` as its own forward sees it, except that ``bias`` is ``bias`` (a cast copy)."""

    def __init__(self, layer: nn.Module, bias: torch.Tensor) -> None:
        self.__dict__.update(_layer=layer, bias=bias)

    def __getattr__(self, name: str) -> Any:  # only for names not in the view's own __dict__
        return getattr(self.__dict__["_layer"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "bias":  # a forward re-assigning the bias changes only the copy
            self.__dict__["bias"] = value
        else:
            setattr(self.__dict__["_layer"], name, value)


def call_keeping_bias(
    layer: nn.Module, forward: Callable[[Any, torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``forward(layer, x)`` (an unbound bitsandbytes forward) that never casts ``layer``'s bias in place.

    ``dtype`` is the dtype the forward wants the bias in. A bias of another dtype is handed to the
    forward as a cast copy (gradients still reach the user's Parameter, in its own dtype).
    """
    bias = layer._parameters.get("bias")
    if bias is None or bias.dtype == dtype:
        return forward(layer, x)
    return forward(_BiasView(layer, bias.to(dtype)), x)


class PatchkitLinear4bit(bnb.nn.Linear4bit):
    """A ``bnb.nn.Linear4bit`` (same state dict, same PEFT dispatch) that leaves its bias' dtype alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' forward, computing exactly what it computes; the bias is cast out of place."""
        if not self.compute_type_is_set:  # what bitsandbytes' forward does first (it may pick compute_dtype)
            self.set_compute_type(x)
            self.compute_type_is_set = True
        dtype = self.compute_dtype if self.compute_dtype is not None else x.dtype
        return call_keeping_bias(self, bnb.nn.Linear4bit.forward, x, dtype)
