"""Putting the original weight back into the original Parameter object (``Patcher.restore``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from patchkit import PatchContext, PatchError

from .dequantize import fourbit_weight, int8_weight
from .quantize import error_text
from .record import DTYPE_MARKER, QuantRecord, record_of
from .runtime import load_bnb


def restore(original: nn.Module, replacement: nn.Module, ctx: PatchContext) -> Callable[[], None]:
    """Gather the original weight for ``original`` and return the step that puts it back.

    Two-phase (plugin API 1.1): this function changes nothing and raises if the weight cannot be
    brought back; the returned step assigns it and notes the outcome in the apply report.

    With ``keep_original`` patchkit itself kept the original weight and puts it back bit-identical
    after this step (following casts and moves made while quantized): nothing to dequantize. Otherwise,
    or when the quantized weight was replaced since apply (an adapter merged into it), the layer's
    current weights are dequantized, on the device the quantized layer is on now and in the dtype the
    rest of the model has now (a ``model.half()`` while quantized reaches the restored weight too).
    A layer whose original weight was never freed (shared, or an apply that never committed) still
    has it: nothing to do.
    """
    record = record_of(replacement)
    if record is None:
        raise PatchError(
            f"{ctx.path or '<root>'}: the bitsandbytes layer lost patchkit's record; "
            "its original weight cannot be restored"
        )
    if not record.freed:
        return _nothing
    current = replacement._parameters.get("weight")
    if current is None:
        raise PatchError(f"{ctx.path}: the quantized layer has no weight anymore; cannot restore the original")
    changed = current is not record.param
    if ctx.keep_original is not None and not changed:
        return functools.partial(_unfreed, record)  # patchkit puts the kept original back after this step
    if current.device.type == "meta":
        raise PatchError(
            f"{ctx.path}: the quantized layer is on the meta device (moved there while patched), so its weight is "
            "gone; move the model back to a real device (its quantized weights intact) before reverse"
        )
    marker = replacement._buffers.get(DTYPE_MARKER)
    dtype = marker.dtype if marker is not None and marker.is_floating_point() else record.dtype
    bnb = load_bnb()
    try:
        with torch.no_grad():
            if record.family == "int8":
                values = int8_weight(bnb, replacement)
            else:
                values = fourbit_weight(bnb, replacement, None if changed else record.canonical)
    except (RuntimeError, NotImplementedError) as exc:  # e.g. its state was moved to meta
        raise PatchError(
            f"{ctx.path}: cannot read the quantized weight back ({type(exc).__name__}: {exc}). Was the model "
            "moved to the meta device or its quantization state changed? The model is still patched and "
            "nothing was changed: move it back to a real device, or keep_original= next time"
        ) from exc
    if record.transposed:
        values = values.t().contiguous()
    note = (
        "reverse: the quantized weight was replaced since apply (merged adapter?); its dequantized values were restored"
        if changed
        else f"reverse: dequantized, {error_text(record.error)}"
    )
    values = values.to(device=current.device, dtype=dtype).reshape(record.shape)
    if dtype != record.dtype:
        note += f" (cast to {dtype}, the dtype the model was cast to while quantized)"

    def commit() -> None:
        original.weight.data = values
        record.freed = False  # a second restore (a reverse resumed after a failure) changes nothing
        bias = original.bias
        if bias is not None and bias.dtype != dtype and marker is not None:
            bias.data = bias.data.to(dtype)  # only a dtype the marker did not follow: keep the layer whole
        ctx.note(note)

    return commit


def _nothing() -> None:
    return None


def _unfreed(record: QuantRecord) -> None:
    record.freed = False
