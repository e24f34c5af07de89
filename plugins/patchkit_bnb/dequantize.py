"""Dequantizing bitsandbytes layers back to full-precision weights (reverse and error measurement)."""

from __future__ import annotations

import copy
from types import ModuleType
from typing import Any

import torch


def int8_weight(bnb: ModuleType, layer: Any) -> torch.Tensor:
    """The fp32 weight a ``Linear8bitLt`` computes with: int8 rows times their scales / 127."""
    weight = layer.weight
    scb = getattr(weight, "SCB", None)
    if scb is None:  # the first forward moves the scales from the parameter to the layer state
        scb = layer.state.SCB
    if scb is None:
        raise RuntimeError("this Linear8bitLt has no row scales (SCB); it was never quantized")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()


def unpacked_4bit(bnb: ModuleType, data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """``(qweight, state)`` in bitsandbytes' portable layout, without touching the live layer.

    On CPUs with AVX512-BF16 the first inference forward repacks a ``Linear4bit`` for its CPU
    kernel (``packing_format_for_cpu``); the nibbles are recovered losslessly on a copy of the state.
    """
    if not getattr(state, "packing_format_for_cpu", False):
        return data, state
    inverse = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise RuntimeError(
            "this bitsandbytes version repacked the layer for its CPU kernel and offers no inverse; "
            "use keep_original='cpu' to reverse such layers"
        )
    qweight, recovered = inverse(data, copy.copy(state))
    return qweight, recovered


def fourbit_weight(bnb: ModuleType, layer: Any, canonical: Any = None) -> torch.Tensor:
    """The fp32 weight of a ``Linear4bit``; ``canonical`` (the state as quantized) overrides the live one."""
    weight = layer.weight
    qweight, live = unpacked_4bit(bnb, weight.data, weight.quant_state)
    state = canonical if canonical is not None else live
    if qweight.device != state.absmax.device:
        qweight = qweight.to(state.absmax.device)
    return bnb.functional.dequantize_4bit(qweight, state).float()
