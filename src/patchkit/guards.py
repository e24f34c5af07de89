"""What stands in for saving, loading and pickling while a model is patched.

Each guard is an instance attribute (journaled in the journal's base, so reverse deletes it and
the class method shows through again), an object rather than a closure (a deep copy of the model
gets guards pointing at the copy):

- ``save_pretrained`` / ``push_to_hub``: writes what ``reverse`` then ``save_pretrained`` would
  write, when the patched state dict is the original's (verified, see :mod:`patchkit.original_view`);
  refuses naming the patcher otherwise.
- ``load_state_dict``: loads into the user's tensors when the patched layout is the original's;
  refuses before a single tensor is loaded otherwise.
- ``__reduce_ex__`` on the root and on every replacement: ``pickle`` / ``torch.save`` of the model
  or of a patched part of it raises :class:`PatchedModelError` instead of pickling a half-patched
  object (or failing on a replacement class that cannot be imported); ``copy.copy`` and
  ``copy.deepcopy`` still work.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

from torch import nn

from .errors import PatchedModelError
from .journal import Journal, applied_label, find_journals
from .original_view import layout_differences

SAVE_METHODS = ("save_pretrained", "push_to_hub")


def applied_words(root: nn.Module) -> str:
    """``attention=sdpa, quantize=int8``: what is applied to ``root``, as reports word it."""
    merged: dict[str, str] = {}
    for _, journal in find_journals(root):
        merged.update(journal.applied_kinds())
    return ", ".join(applied_label(k, v) for k, v in merged.items()) or "patches"


def _patchers(root: nn.Module) -> list[Any]:
    return [p for _, journal in find_journals(root) for p in journal.patchers()]


def state_problem(module: nn.Module, root: nn.Module) -> str | None:
    """Why ``module``'s state dict is not the one reverse would leave (naming the patchers), or ``None``."""
    declared = [p for p in _patchers(root) if p.same_checkpoint is False]
    if declared:
        names = ", ".join(sorted({p.qualname for p in declared}))
        return f"patcher {names} declares that the patched model's checkpoint differs from the original's"
    problems, patchers = layout_differences(module, [j for _, j in find_journals(root)])
    if not problems:
        return None
    names = ", ".join(sorted({p.qualname for p in patchers})) or "unknown"
    return f"patcher {names} changed the state dict ({'; '.join(problems)})"


def save_refusal(root: nn.Module, name: str, module: nn.Module, problem: str) -> str:
    """The message of a refused save: what differs, and the ways out that exist for this model."""
    quantized = any(p.kind == "quantize" and p.save is not None for p in _patchers(root))
    out = (
        f"{type(module).__name__}.{name}() refused: the model is patched by patchkit ({applied_words(root)}) and "
        f"would not save the original checkpoint: {problem}. Call patchkit.reverse(model) first, then {name}() "
        "writes the original model"
    )
    if quantized:
        out += "; or write the quantized checkpoint with patchkit.save_pretrained(model, path, quantized=True)"
    return out


def save_as_original(
    module: nn.Module, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], root: nn.Module
) -> Any:
    """Call the class's ``name`` (save_pretrained / push_to_hub) with every journaled attribute of a
    non-module object (a config field) shown as it was before patching."""
    method = getattr(type(module), name)
    with contextlib.ExitStack() as stack:
        for _, journal in find_journals(root):
            stack.enter_context(journal.attributes_as_before(keep=lambda obj: isinstance(obj, nn.Module)))
        return method(module, *args, **kwargs)


class SaveGuard:
    """The instance attribute standing in for ``save_pretrained`` / ``push_to_hub`` while patched."""

    def __init__(self, name: str, module: nn.Module, root: nn.Module) -> None:
        self.name, self.module, self.root = name, module, root

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        problem = state_problem(self.module, self.root)
        if problem is not None:
            raise PatchedModelError(save_refusal(self.root, self.name, self.module, problem))
        return save_as_original(self.module, self.name, args, kwargs, self.root)


class LoadGuard:
    """The instance attribute standing in for ``load_state_dict`` while patched."""

    def __init__(self, module: nn.Module, root: nn.Module) -> None:
        self.module, self.root = module, root

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        problem = state_problem(self.module, self.root)
        if problem is not None:
            raise PatchedModelError(
                f"{type(self.module).__name__}.load_state_dict() refused before loading anything: the model is patched "
                f"by patchkit ({applied_words(self.root)}) and its tensors are not laid out as the original's: "
                f"{problem}. Call patchkit.reverse(model), load the state dict, then apply again"
            )
        return type(self.module).load_state_dict(self.module, *args, **kwargs)


class PickleGuard:
    """``__reduce_ex__`` of a patched module: reduces as usual, except that the first argument of
    the rebuild is a :class:`_Refusal`.

    ``copy.copy`` / ``copy.deepcopy`` rebuild from that reduction (a deep copy gets a guard of its
    own); ``pickle`` saves the arguments first, meets the refusal and raises
    :class:`PatchedModelError` (before it would try to import a replacement class).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, protocol: int) -> Any:
        reduced = object.__reduce_ex__(self.module, protocol)
        return (_rebuild, (_Refusal(type(self.module).__name__), type(self.module)), *reduced[2:])

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise PatchedModelError(_Refusal(type(self.module).__name__).message)

    def __deepcopy__(self, memo: dict[int, Any]) -> PickleGuard:
        return PickleGuard(copy.deepcopy(self.module, memo))


class _Refusal:
    """The first thing ``pickle`` meets in a patched module's reduction; copies pass it through."""

    def __init__(self, name: str) -> None:
        self.message = (
            f"a patchkit-patched {name} cannot be pickled (torch.save(model), pickle, multiprocessing): it holds "
            "replacement modules and a journal of live originals. Call patchkit.reverse(model) first and save or "
            "send the unpatched model, then apply again on the other side; or save a state_dict / "
            "patchkit.save_pretrained(model, path)"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise PatchedModelError(self.message)

    def __copy__(self) -> _Refusal:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Refusal:
        return self


def _rebuild(refusal: _Refusal, cls: type[nn.Module]) -> nn.Module:
    """An empty instance of ``cls`` for ``copy`` to fill from the module's state."""
    return cls.__new__(cls)


def guard_replacement(replacement: nn.Module) -> None:
    """Refuse pickling of a replacement module (it is dropped on reverse: not journaled)."""
    replacement.__dict__["__reduce_ex__"] = PickleGuard(replacement)


def install(model: nn.Module, journal: Journal, swapped_parents: list[nn.Module]) -> None:
    """Guard saving and pickling on ``model`` and on every module inside it that saves (the inner
    model of a torch.compile / DDP / PEFT wrapper, a base model), and ``load_state_dict`` on the
    model and on every module above a swapped slot; journaled in the journal's base."""
    if not isinstance(model.__dict__.get("__reduce_ex__"), PickleGuard):
        journal.set_attr(model, "__reduce_ex__", PickleGuard(model), base=True)
        for module in model.modules():  # modules() yields each shared module once
            for name in SAVE_METHODS:
                if callable(getattr(type(module), name, None)):
                    journal.set_attr(module, name, SaveGuard(name, module, model), base=True)
    for module in _ancestors(model, {id(m) for m in swapped_parents}):
        if not isinstance(module.__dict__.get("load_state_dict"), LoadGuard):
            journal.set_attr(module, "load_state_dict", LoadGuard(module, model), base=True)


def _ancestors(model: nn.Module, targets: set[int]) -> list[nn.Module]:
    """``model``'s modules that are, or hold below them, a module whose id is in ``targets``."""
    out: list[nn.Module] = []
    memo: dict[int, bool] = {}

    def visit(module: nn.Module) -> bool:
        if id(module) in memo:
            return memo[id(module)]
        memo[id(module)] = False  # cycles: not above anything yet
        found = id(module) in targets
        for child in module._modules.values():
            if child is not None and visit(child):
                found = True
        memo[id(module)] = found
        if found:
            out.append(module)
        return found

    visit(model)
    return out
