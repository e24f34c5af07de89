"""``Linear4bit`` that never casts the user's shared bias in place.

bitsandbytes' ``Linear4bit.forward`` does ``self.bias.data = self.bias.data.to(x.dtype)`` when the
input dtype differs from the bias dtype. patchkit shares the bias Parameter with the user's
original layer, so that in-place cast would change the user's tensor (and reverse could not be
bit-identical). This subclass runs bitsandbytes' forward without the bias in that case and adds
a cast copy of it instead. Importing this module imports bitsandbytes: only
:mod:`patchkit_bnb.quantize` does, lazily.
"""

from __future__ import annotations

from collections.abc import Callable

import bitsandbytes as bnb
import torch


def call_keeping_bias(
    layer: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """``forward(x)`` for a bitsandbytes layer, never casting its (shared) bias Parameter in place."""
    bias = layer._parameters.get("bias")
    if bias is None or bias.dtype == x.dtype:
        return forward(x)
    layer._parameters["bias"] = None
    try:
        out = forward(x)
    finally:
        layer._parameters["bias"] = bias
    return out + bias.to(out.dtype)


class PatchkitLinear4bit(bnb.nn.Linear4bit):
    """A ``bnb.nn.Linear4bit`` (same state dict, same PEFT dispatch) that leaves its bias' dtype alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' forward; with a bias of another dtype than ``x``, the bias is added out of place."""
        return call_keeping_bias(self, super().forward, x)
