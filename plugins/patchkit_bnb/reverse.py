"""Putting the original weight back into the original Parameter object (``Patcher.restore``)."""

from __future__ import annotations

import torch
from torch import nn

from patchkit import PatchContext, PatchError

from .dequantize import fourbit_weight, int8_weight
from .keep import load_from_disk
from .record import record_of
from .runtime import load_bnb


def restore(original: nn.Module, replacement: nn.Module, ctx: PatchContext) -> None:
    """Refill ``original.weight`` before the engine puts ``original`` back.

    Kept weights (``keep_original``) come back bit-identical. Otherwise, or when the quantized
    weight was replaced since apply (an adapter merged into it), the layer's current weights are
    dequantized into the original dtype. The weight lands on the device the quantized layer is on
    now (the model may have moved). The outcome is added to the apply report's notes.
    """
    record = record_of(replacement)
    if record is None:
        raise PatchError(
            f"{ctx.path or '<root>'}: the bitsandbytes layer lost patchkit's record; "
            "its original weight cannot be restored"
        )
    weight = original.weight
    current = replacement._parameters.get("weight")
    changed = current is not record.param
    if current is None:
        raise PatchError(f"{ctx.path}: the quantized layer has no weight anymore; cannot restore the original")
    device = current.device
    if record.freed:
        bnb = load_bnb()
        if changed or (record.kept is None and record.kept_file is None):
            with torch.no_grad():
                if record.family == "int8":
                    values = int8_weight(bnb, replacement)
                else:
                    values = fourbit_weight(bnb, replacement, None if changed else record.canonical)
            values = values.to(device=device, dtype=record.dtype).reshape(record.shape)
            if changed:
                ctx.note(
                    "reverse: the quantized weight was replaced since apply (merged adapter?); "
                    "its dequantized values were restored"
                )
            else:
                ctx.note(f"reverse: dequantized, max|dW| {record.error:.3g}")
        else:
            kept = record.kept if record.kept is not None else load_from_disk(str(record.kept_file))
            values = kept.to(device=device)
            ctx.note("reverse: original restored bit-identical")
        if record.kept_file is not None and changed:
            load_from_disk(record.kept_file)  # deletes the now-stale file
        record.kept = None
        record.kept_file = None
        weight.data = values
        record.freed = False  # a second restore (never expected) must not dequantize again
    bias = original.bias
    if bias is not None and record.bias_dtype is not None and bias.dtype != record.bias_dtype:
        # bitsandbytes casts a shared bias to the input dtype in forward; give it its dtype back.
        bias.data = bias.data.to(record.bias_dtype)
        ctx.note(f"reverse: bias cast back to {record.bias_dtype}")
