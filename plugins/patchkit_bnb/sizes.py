"""How many bytes the linear layers' weights take, quantization state included (for reports and tests)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .record import record_of


def _state_tensors(state: Any) -> list[torch.Tensor]:
    if state is None:
        return []
    found = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        found += [getattr(nested, "absmax", None), getattr(nested, "code", None)]
    return [t for t in found if isinstance(t, torch.Tensor)]


def layer_weight_bytes(layer: nn.Module) -> int:
    """Bytes of ``layer``'s weight plus everything needed to dequantize it (bias excluded).

    Counts int8 row scales (``SCB``), 4-bit block scales, codebooks and nested scales, and the
    copy of the 4-bit state patchkit keeps when bitsandbytes' CPU kernel rewrote the live one.
    """
    weight = layer._parameters.get("weight")
    if weight is None:
        return 0
    tensors = [weight.data]
    tensors += [
        t
        for t in (getattr(weight, "SCB", None), getattr(getattr(layer, "state", None), "SCB", None))
        if isinstance(t, torch.Tensor)
    ]
    tensors += _state_tensors(getattr(weight, "quant_state", None))
    record = record_of(layer)
    if record is not None:
        tensors += _state_tensors(record.canonical)
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def linear_weight_bytes(model: nn.Module) -> int:
    """Sum of :func:`layer_weight_bytes` over every ``nn.Linear`` (bitsandbytes layers included) in ``model``."""
    return sum(layer_weight_bytes(m) for m in model.modules() if isinstance(m, nn.Linear))
