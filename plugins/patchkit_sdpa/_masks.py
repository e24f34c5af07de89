"""Read the padding out of the attention mask a host model built, or say why it is not padding.

transformers builds the encoder's mask once per forward through its mask interface: ``None`` (no
padding, sdpa), a 4D bool mask (sdpa, True = attend), a 4D additive float mask (eager: 0 or the
dtype's minimum), or the 2D ``[B, T]`` mask (flash). A user may also pass a 4D mask of their own.
Only a *pure padding* mask (every query row identical) can be replaced by packing; anything
else is reported so the caller can fall back to the original forward instead of dropping it.
"""

from __future__ import annotations

from typing import Any

import torch


def key_padding(mask: Any, batch: int, length: int) -> tuple[torch.Tensor | None, str | None]:
    """``(keep, None)`` with ``keep`` a ``[batch, length]`` bool tensor (``None``: nothing padded),
    or ``(None, reason)`` when ``mask`` is more than key padding."""
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        return None, f"attention mask of type {type(mask).__name__} is not a padding mask"
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, length):
            return None, f"2D attention mask of shape {tuple(mask.shape)} for a batch of {(batch, length)}"
        return mask.bool(), None
    if mask.dim() != 4 or mask.shape[-1] != length or mask.shape[0] not in (1, batch) or mask.shape[1] != 1:
        return None, f"attention mask of shape {tuple(mask.shape)} is not a [B, 1, T, T] padding mask"
    row = mask[:, :, :1, :]
    if not bool((mask == row).all()):
        return None, "the 4D attention mask differs between query rows (not pure key padding)"
    row = row.reshape(mask.shape[0], length)
    if mask.dtype == torch.bool:
        keep = row
    elif mask.is_floating_point():
        keep = row == 0
        # Only 0 (attend) or a huge negative bias (never attend: exp underflows to exactly 0) is padding.
        if not bool((keep | (row <= torch.finfo(mask.dtype).min / 2)).all()):
            return None, "the additive attention mask holds values other than 0 and -inf (a bias, not padding)"
    else:
        return None, f"attention mask of dtype {mask.dtype} is not a padding mask"
    return keep.expand(batch, length), None
