"""What a quantized layer remembers about the layer it replaced, so reverse can put it back."""

from __future__ import annotations

import copy
import os
import shutil
import uuid
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
    kept: torch.Tensor | None = None
    kept_file: str | None = None
    transposed: bool = False  # transformers' Conv1D: the quantized matrix is the weight transposed
    checkpoint: Any = None  # keep_original="checkpoint": the patchkit.TensorSource the weight was read from

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantRecord:
        # A deep-copied model reverses on its own: it gets its own kept file (reverse deletes it).
        new = QuantRecord.__new__(QuantRecord)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key in ("source", "dtype") else copy.deepcopy(value, memo)
        if self.kept_file is not None and os.path.exists(self.kept_file):
            stem = self.kept_file.rsplit(".", 2)[0]
            new.kept_file = f"{stem}.{uuid.uuid4().hex[:12]}.safetensors"
            shutil.copyfile(self.kept_file, new.kept_file)
        return new


def record_of(module: nn.Module) -> QuantRecord | None:
    """The record patchkit left on a bitsandbytes layer it built, or ``None``."""
    found = module.__dict__.get(RECORD_ATTR)
    return found if isinstance(found, QuantRecord) else None


def drop_kept(record: QuantRecord) -> None:
    """Forget the kept original: delete its folder file (if written) and drop the RAM copy. Idempotent."""
    if record.kept_file is not None and os.path.exists(record.kept_file):
        os.remove(record.kept_file)
    record.kept_file = None
    record.kept = None
