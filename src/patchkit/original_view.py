"""The model as ``reverse`` would leave it, read without changing anything.

Saving and loading while patched are allowed only where the patched model's state dict *is* the
original's: the same keys, shapes, dtypes and bytes as the state dict of the tree that reverse
puts back (every swapped slot holding its original module again). Nothing a patcher declares is
trusted: the two state dicts are computed and compared. Attention patchers that share the
user's parameters pass at the cost of an identity check per tensor; a patcher that fuses,
quantizes or copies weights fails, and the message names it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .journal import Journal, _Replace


def originals(journals: Iterable[Journal]) -> dict[tuple[int, str], tuple[nn.Module, Any]]:
    """``(id(parent), slot name) -> (module reverse puts back there, patcher that swapped it)``.

    A slot swapped by several applies maps to the oldest original (what the last reverse restores).
    """
    out: dict[tuple[int, str], tuple[nn.Module, Any]] = {}
    for journal in journals:
        for layer in reversed(journal.layers):
            for entry in reversed(layer.entries):
                if isinstance(entry, _Replace):
                    for parent, name in entry.edges:
                        out[(id(parent), name)] = (entry.original, entry.patcher)
    return out


def original_state_dict(
    module: nn.Module, swapped: dict[tuple[int, str], tuple[nn.Module, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dict ``module`` would have after reverse, and which patcher owns each key's subtree.

    Follows ``nn.Module.state_dict`` (its ``_save_to_state_dict`` and state-dict hooks), taking the
    original module at every swapped slot. Returns ``(state, owners)``: ``owners`` maps a key under a
    swapped slot to the patcher that swapped it.
    """
    destination: dict[str, Any] = OrderedDict()
    owners: dict[str, Any] = {}
    _visit(module, "", destination, owners, None, swapped)
    return destination, owners


def _visit(
    module: nn.Module,
    prefix: str,
    destination: dict[str, Any],
    owners: dict[str, Any],
    owner: Any,
    swapped: dict[tuple[int, str], tuple[nn.Module, Any]],
) -> None:
    for hook in module._state_dict_pre_hooks.values():
        hook(module, prefix, False)
    before = set(destination)
    module._save_to_state_dict(destination, prefix, False)
    for name, child in module._modules.items():
        found = swapped.get((id(module), name))
        child_owner = owner
        if found is not None:
            child, child_owner = found[0], found[1]
        if child is not None:
            _visit(child, prefix + name + ".", destination, owners, child_owner, swapped)
    for hook in module._state_dict_hooks.values():
        result = hook(module, destination, prefix, {"version": module._version})
        if result is not None and not getattr(hook, "_from_public_api", False):
            destination = result
    if owner is not None:
        for key in set(destination) - before:
            owners.setdefault(key, owner)


def same_tensor(a: Any, b: Any) -> bool:
    """Same dtype, shape and bytes (the same storage view is the fast path)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return a is b or bool(a == b)
    if a.dtype != b.dtype or a.shape != b.shape or type(a) is not type(b) and not _plain(a, b):
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        return a.device.type == b.device.type == "meta"
    if (
        a.device == b.device
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.stride() == b.stride()
    ):
        return True
    if a.device != b.device:
        b = b.to(a.device)
    if a.numel() == 0:
        return True
    # Bytes, not values: NaNs and -0.0 must compare as stored.
    return bool(torch.equal(_as_bytes(a), _as_bytes(b)))


def _plain(a: torch.Tensor, b: torch.Tensor) -> bool:
    """A Parameter and a plain tensor of the same data count as the same kind."""
    return {type(a), type(b)} <= {torch.Tensor, nn.Parameter}


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.reshape(-1).view(torch.uint8)


def layout_differences(module: nn.Module, journals: Iterable[Journal]) -> tuple[list[str], list[Any]]:
    """Where ``module.state_dict()`` differs from the one reverse would leave.

    Returns ``(problems, patchers)``: a few readable lines (key and what differs) and the patchers
    whose swapped subtrees hold the differing keys. Both empty when the patched state dict is the
    original's, key for key and byte for byte.
    """
    swapped = originals(journals)
    if not swapped:
        return [], []
    try:
        current = module.state_dict(keep_vars=False)
    except Exception as exc:  # e.g. a quantized layer moved to the meta device cannot describe itself
        patchers = list({id(p): p for _, p in swapped.values() if p is not None}.values())
        return [f"its state dict cannot be read ({type(exc).__name__}: {exc})"], patchers
    original, owners = original_state_dict(module, swapped)
    problems: list[str] = []
    blamed: dict[int, Any] = {}

    def blame(key: str, text: str) -> None:
        patcher = owners.get(key)
        if patcher is not None:
            blamed[id(patcher)] = patcher
        if len(problems) < 3:
            problems.append(text)

    for key in original.keys() - current.keys():
        blame(key, f"{key} is missing from the patched state dict")
    for key in current.keys() - original.keys():
        owners.setdefault(key, _owner_by_prefix(key, owners))  # a key only the patched layout has
        blame(key, f"{key} is not in the original model")
    for key in original.keys() & current.keys():
        a, b = original[key], current[key]
        if not same_tensor(a, b):
            what = (
                f"{tuple(b.shape)} {b.dtype} instead of {tuple(a.shape)} {a.dtype}"
                if isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and (a.shape, a.dtype) != (b.shape, b.dtype)
                else "other values than the module reverse restores"
            )
            blame(key, f"{key} holds {what}")
    return problems, [p for p in blamed.values() if p is not None]


def _owner_by_prefix(key: str, owners: dict[str, Any]) -> Any:
    """The patcher owning the longest key that shares ``key``'s module path (a key only the patched
    layout has, e.g. ``qkv_proj.weight`` next to the original's ``q_proj.weight``)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        stem = ".".join(parts[:cut]) + "."
        for other, patcher in owners.items():
            if other.startswith(stem):
                return patcher
    return None
