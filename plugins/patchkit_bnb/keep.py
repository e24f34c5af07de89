"""Keeping the original weight off the device (``keep_original="cpu"`` or a folder) for a bit-identical reverse."""

from __future__ import annotations

import os
import uuid

import torch


def keep_in_ram(weight: torch.Tensor) -> torch.Tensor:
    """The weight's values in CPU memory (the tensor itself when already there: it is being detached)."""
    return weight if weight.device.type == "cpu" else weight.to("cpu", copy=True)


def keep_on_disk(weight: torch.Tensor, folder: str, path: str) -> str:
    """Write the weight as a one-tensor safetensors file in ``folder``; returns the file name."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    # Unique per layer and per apply: two models (or two applies) may share one folder.
    name = os.path.join(folder, f"{path or 'root'}.{uuid.uuid4().hex[:12]}.safetensors")
    save_file({"weight": weight.detach().contiguous().cpu()}, name)
    return name
