"""What a quantized layer remembers about the layer it replaced, so reverse can put it back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Attribute on the *replacement* (a bitsandbytes layer patchkit created); the user's modules get nothing.
RECORD_ATTR = "_patchkit_bnb"


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
    bias_dtype: torch.dtype | None = None
    canonical: Any = None
    kept: torch.Tensor | None = None
    kept_file: str | None = None


def record_of(module: nn.Module) -> QuantRecord | None:
    """The record patchkit left on a bitsandbytes layer it built, or ``None``."""
    found = module.__dict__.get(RECORD_ATTR)
    return found if isinstance(found, QuantRecord) else None
