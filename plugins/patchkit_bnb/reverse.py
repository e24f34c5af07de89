"""Putting the original weight back into the original Parameter object (``Patcher.restore``)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from patchkit import PatchContext, PatchError

from .dequantize import fourbit_weight, int8_weight
from .quantize import error_text
from .record import DTYPE_MARKER, QuantRecord, drop_kept, record_of
from .runtime import load_bnb


def restore(original: nn.Module, replacement: nn.Module, ctx: PatchContext) -> Callable[[], None]:
    """Gather the original weight for ``original`` and return the step that puts it back.

    Two-phase (plugin API 1.1): this function changes nothing and raises if the weight cannot be
    brought back (a kept file gone or not matching); the returned step assigns it, deletes the
    kept file and notes the outcome in the apply report.

    Kept weights (``keep_original``) come back bit-identical. Otherwise, or when the quantized
    weight was replaced since apply (an adapter merged into it), the layer's current weights are
    dequantized. The weight lands on the device the quantized layer is on now and in the dtype the
    rest of the model has now (a ``model.half()`` while quantized reaches the restored weight too).
    A layer whose apply never committed (a rolled-back apply) still has its weight: nothing to do
    but drop the kept copy.
    """
    record = record_of(replacement)
    if record is None:
        raise PatchError(
            f"{ctx.path or '<root>'}: the bitsandbytes layer lost patchkit's record; "
            "its original weight cannot be restored"
        )
    if not record.freed:
        return lambda: drop_kept(record)
    current = replacement._parameters.get("weight")
    if current is None:
        raise PatchError(f"{ctx.path}: the quantized layer has no weight anymore; cannot restore the original")
    if current.device.type == "meta":
        raise PatchError(
            f"{ctx.path}: the quantized layer is on the meta device (moved there while patched), so its weight is "
            "gone; move the model back to a real device (its quantized weights intact) before reverse"
        )
    marker = replacement._buffers.get(DTYPE_MARKER)
    dtype = marker.dtype if marker is not None and marker.is_floating_point() else record.dtype
    changed = current is not record.param
    note: str
    if changed or (record.kept is None and record.kept_file is None and record.checkpoint is None):
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
            "reverse: the quantized weight was replaced since apply (merged adapter?); its dequantized values were "
            "restored"
            if changed
            else f"reverse: dequantized, {error_text(record.error)}"
        )
    elif record.checkpoint is not None:
        # Read back (memory-mapped) and verified against the size and SHA-256 recorded at load; cast the
        # way the loader cast it. Raises PatchError, changing nothing, if the files changed.
        values = record.checkpoint.read(ctx.path).to(record.dtype)
        note = "reverse: original re-read from the checkpoint, bit-identical"
    else:
        values = record.kept if record.kept is not None else _read_kept(record, ctx.path)
        note = "reverse: original restored bit-identical"
    values = values.to(device=current.device, dtype=dtype).reshape(record.shape)
    if dtype != record.dtype:
        note += f" (cast to {dtype}, the dtype the model was cast to while quantized)"

    def commit() -> None:
        original.weight.data = values
        record.freed = False  # a second restore (a reverse resumed after a failure) changes nothing
        drop_kept(record)
        bias = original.bias
        if bias is not None and bias.dtype != dtype and marker is not None:
            bias.data = bias.data.to(dtype)  # only a dtype the marker did not follow: keep the layer whole
        ctx.note(note)

    return commit


def _read_kept(record: QuantRecord, path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    name = str(record.kept_file)
    if not os.path.exists(name):
        raise PatchError(
            f"{path}: the kept original weight {name!r} is missing; put the file back (or move the folder back) "
            "and call patchkit.reverse(model) again. The model is still patched and nothing was changed"
        )
    tensor = load_file(name)["weight"]
    if tuple(tensor.shape) != tuple(record.shape) or tensor.dtype != record.dtype:
        raise PatchError(
            f"{path}: the kept file {name!r} holds a {tuple(tensor.shape)} {tensor.dtype} tensor, not the original "
            f"{tuple(record.shape)} {record.dtype} weight; restore the right file and call reverse again"
        )
    return tensor
