"""``keep_original=``: the core keeps what a replacement does not share, for a bit-identical reverse.

Any patcher may take tensors out of the original module (a quantizer frees the full-precision
weight in its commit step). With ``apply(..., keep_original=...)`` the core, not the patcher,
keeps every parameter and buffer of the original's subtree that the replacement does not hold,
right after ``build`` (before any commit step can free it):

- ``"cpu"``: in RAM (a CPU tensor is kept as it is, no copy; others are copied to the CPU);
- a folder: one safetensors file per swapped module (unique names: folders may be shared);
- ``"checkpoint"``: nothing is copied; reverse re-reads the tensors from the files
  ``patchkit.from_pretrained`` loaded them from, verified by size and SHA-256.

On reverse, after the patcher's ``restore`` step, the kept values are put back into the very same
tensor objects (``tensor.data = kept``), bit for bit, and the kept files are deleted. If the
replacement's own tensors were replaced since apply (an adapter merged into it), its current
weights win: the kept copy is dropped and the patcher's ``restore`` decides, with a note.
"""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import PatchError, UnsupportedError

OPTION = "keep_original"
MARKER = "_patchkit_kept_as"  # a zero-element buffer on the replacement: follows casts and moves
DESCRIPTION = (
    "keep what a replacement does not share, for a bit-identical reverse: 'cpu', a folder, or 'checkpoint' "
    "(after patchkit.from_pretrained)"
)


def check_value(value: Any) -> str | None:
    """``keep_original``'s value as a string (``None`` when unset); :class:`UnsupportedError` otherwise."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise UnsupportedError(
            f"keep_original={value!r}: pass 'cpu' (RAM), a folder path (kept files), or 'checkpoint' (re-read from the "
            "files patchkit.from_pretrained loaded)"
        )
    if value not in ("cpu", "checkpoint"):
        if os.path.exists(value) and not os.path.isdir(value):
            raise UnsupportedError(f"keep_original={value!r} exists and is not a directory; pass 'cpu' or a folder")
        parent = value if os.path.isdir(value) else os.path.dirname(os.path.abspath(value))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent or ".", os.W_OK):
            raise UnsupportedError(f"keep_original={value!r}: {parent!r} is not writable")
    return value


def lost_tensors(original: nn.Module, replacement: nn.Module | None) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers of ``original``'s subtree that ``replacement`` does not hold (by identity)."""
    if replacement is None:
        return []
    held = {id(t) for t in (*replacement.parameters(), *replacement.buffers())}
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for name, tensor in (*original.named_parameters(), *original.named_buffers()):
        if id(tensor) not in held and id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


@dataclass(eq=False)
class Kept:
    """What the core kept of one swapped original: the tensor objects and where their values are."""

    mode: str
    tensors: list[tuple[str, torch.Tensor]]
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # "cpu", and buffers in "checkpoint"
    sources: dict[str, Any] = field(default_factory=dict)  # "checkpoint": name -> TensorSource
    file: str | None = None  # a folder: the kept file
    # The replacement's parameters at build (objects, not ids: a deepcopy maps them to the copy's).
    replacement_tensors: list[torch.Tensor] = field(default_factory=list)
    dtype: torch.dtype | None = None  # the floating dtype the kept tensors had (what the marker started as)
    done: bool = False  # put back or dropped: a reverse resumed after a failure has nothing more to do here

    def describe(self) -> str:
        """Where the original is, for the report."""
        if self.file is not None:
            return f"original kept in {self.file}, reverse is bit-identical"
        if self.mode == "checkpoint":
            return "original stays in the checkpoint files, reverse re-reads it bit-identical"
        return "original kept in RAM, reverse is bit-identical"

    def unchanged(self, replacement: nn.Module) -> bool:
        """Whether the replacement still holds the parameters it was built with (nothing merged into it).
        Buffers are not compared: every ``.to()``/``.half()`` gives a module new buffer objects."""
        now = list(replacement.parameters())
        built = self.replacement_tensors
        return len(now) == len(built) and all(a is b for a, b in zip(now, built, strict=True))

    def gather(self, where: str) -> dict[str, torch.Tensor]:
        """The kept values, read back and checked against the tensors they belong to; changes nothing."""
        if self.file is not None:
            if not os.path.exists(self.file):
                raise PatchError(
                    f"{where}: the kept original {self.file!r} is missing; put the file back (or move the folder back) "
                    "and call patchkit.reverse(model) again. The model is still patched and nothing was changed"
                )
            from safetensors.torch import load_file

            values = load_file(self.file)
        else:
            values = dict(self.values)
            for name, source in self.sources.items():
                values[name] = source.read(where)
        for name, tensor in self.tensors:
            value = values.get(name)
            if value is None or value.shape != _shape(tensor, value) or value.dtype != tensor.dtype:
                raise PatchError(
                    f"{where}: the kept original of {name!r} does not match the tensor it belongs to; restore the kept "
                    "files and call patchkit.reverse(model) again. The model is still patched and nothing was changed"
                )
        return values

    def put_back(self, values: dict[str, torch.Tensor], replacement: nn.Module) -> None:
        """Give every kept tensor object its kept values again. A model-wide cast or move made while
        patched reached the replacement's marker buffer: the values follow it, as they would have
        followed it in the unpatched model."""
        marker = replacement._buffers.get(MARKER)
        for name, tensor in self.tensors:
            value = values[name]
            device = marker.device if marker is not None and marker.device.type != "meta" else tensor.device
            if marker is not None and value.is_floating_point() and marker.dtype != self.dtype:
                value = value.to(marker.dtype)
            tensor.data = value.to(device=device) if value.device != device else value
        self.discard()

    def discard(self) -> None:
        """Drop the kept copy (and its file)."""
        if self.file is not None and os.path.exists(self.file):
            os.remove(self.file)
        self.done = True
        self.file = None
        self.values = {}
        self.sources = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> Kept:
        # A deep-copied model reverses on its own: it gets its own kept file (its reverse deletes it).
        new = Kept.__new__(Kept)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo) if key != "sources" else dict(value)
        if self.file is not None and os.path.exists(self.file):
            new.file = _unique_name(os.path.dirname(self.file), os.path.basename(self.file).split(".")[0])
            shutil.copyfile(self.file, new.file)
        return new


def _shape(tensor: torch.Tensor, value: torch.Tensor) -> torch.Size:
    # A freed tensor (quantizers free it to zero elements) has lost its shape: trust the kept one then.
    return value.shape if tensor.numel() == 0 else tensor.shape


def _unique_name(folder: str, stem: str) -> str:
    return os.path.join(folder, f"{stem or 'root'}.{uuid.uuid4().hex[:12]}.safetensors")


def keep(mode: str, original: nn.Module, replacement: nn.Module, path: str, checkpoint_source: Any) -> Kept | None:
    """Keep ``original``'s tensors that ``replacement`` does not hold (``None`` when it shares them all).

    ``checkpoint_source(tensor)``: the loader's :class:`~patchkit.TensorSource` of a tensor, or ``None``.
    Raises :class:`UnsupportedError` for ``"checkpoint"`` outside ``patchkit.from_pretrained``.
    """
    lost = lost_tensors(original, replacement)
    if not lost:
        return None
    floating = next((t for _, t in lost if t.is_floating_point()), None)
    if floating is not None and MARKER not in replacement._buffers:
        # Zero elements, not saved: model-wide casts and moves reach it (see Kept.put_back).
        marker = torch.empty(0, dtype=floating.dtype, device=floating.device)
        replacement.register_buffer(MARKER, marker, persistent=False)
    kept = Kept(
        mode,
        lost,
        replacement_tensors=list(replacement.parameters()),
        dtype=floating.dtype if floating is not None else None,
    )
    if mode == "checkpoint":
        for name, tensor in lost:
            source = checkpoint_source(tensor)
            if source is not None and source.digest is not None:
                kept.sources[name] = source
            elif isinstance(tensor, nn.Parameter):
                raise UnsupportedError(
                    "keep_original='checkpoint' reads the original weights back from the files the model was loaded "
                    f"from, but {path}.{name} was not read from a checkpoint here: load the model with "
                    "patchkit.from_pretrained(..., keep_original='checkpoint'), or pass keep_original='cpu' or a folder"
                )
            else:  # a buffer the checkpoint does not hold (non-persistent): small, kept in RAM
                kept.values[name] = _in_ram(tensor)
    elif mode == "cpu":
        kept.values = {name: _in_ram(tensor) for name, tensor in lost}
    else:
        from safetensors.torch import save_file

        os.makedirs(mode, exist_ok=True)
        kept.file = _unique_name(mode, path)
        save_file({name: t.detach().contiguous().cpu() for name, t in lost}, kept.file)
    return kept


def _in_ram(tensor: torch.Tensor) -> torch.Tensor:
    # A CPU tensor is kept as it is: the patcher's commit replaces the tensor's data, it does not
    # write into it (build must not destroy what a rollback needs), so these bytes stay the original's.
    return tensor.detach() if tensor.device.type == "cpu" else tensor.detach().to("cpu", copy=True)
