"""What a quantized layer remembers about the layer it replaced, so reverse can put it back."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Attribute on the *replacement* (a bitsandbytes layer patchkit created); the user's modules get nothing.
RECORD_ATTR = "_patchkit_bnb"
# A zero-element, non-persistent buffer on the replacement: model-wide casts and moves reach it.
DTYPE_MARKER = "_patchkit_dtype"


@dataclass
class QuantRecord:
    """Facts about the original weight and the quantized one built from it.

    ``param`` is the quantized parameter object as built: if the layer holds another one at
    reverse time (e.g. PEFT merged an adapter into it), the current weights win over the kept ones.
    ``canonical`` (4-bit) is a shallow copy of the quantization state as built: bitsandbytes'
    CPU kernel rewrites the live state on first use (bf16 block scales), the copy keeps reverse
    and saving deterministic.
    """

    family: str
    source: type  # the original layer's class (saving needs exactly nn.Linear for transformers to reload)
    shape: torch.Size
    dtype: torch.dtype
    param: nn.Parameter
    freed: bool
    error: float
    canonical: Any = None
    transposed: bool = False  # transformers' Conv1D: the quantized matrix is the weight transposed

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantRecord:
        new = QuantRecord.__new__(QuantRecord)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key in ("source", "dtype") else copy.deepcopy(value, memo)
        return new


def record_of(module: nn.Module) -> QuantRecord | None:
    """The record patchkit left on a bitsandbytes layer it built, or ``None``."""
    found = module.__dict__.get(RECORD_ATTR)
    return found if isinstance(found, QuantRecord) else None
