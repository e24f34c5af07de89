"""apply / reverse / plan / patched: the engine. Validate everything, then mutate; undo on failure."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import guards
from .atomic import gc_paused, interrupts_held
from .errors import ArgumentError, ConflictError, NotPatchedError, PatchedModelError, UnsupportedError
from .journal import JOURNAL_ATTR, find_journal, find_journals
from .pipeline import PatchReport, Run, check_not_applied
from .planning import Plan, Request, build_plan
from .registry import Registry


def plan(
    model: nn.Module,
    *,
    attention: str | None = None,
    quantize: str | None = None,
    patch: str | Iterable[str] | None = None,
    backend: str = "auto",
    only: Any = None,
    skip: Any = None,
    strict: bool = True,
    registry: Registry | None = None,
    **options: Any,
) -> Plan:
    """What :func:`apply` would do with the same arguments, with every check run and nothing changed.

    Works on models on the ``meta`` device. Raises what ``apply`` would raise.
    """
    request = Request.make(
        attention=attention,
        quantize=quantize,
        patch=patch,
        registry=registry,
        backend=backend,
        strict=strict,
        only=only,
        skip=skip,
        options=options,
    )
    stages = request.stages
    check_not_applied(model, stages)
    return build_plan(model, request, "plan")


def apply(
    model: nn.Module,
    *,
    attention: str | None = None,
    quantize: str | None = None,
    patch: str | Iterable[str] | None = None,
    backend: str = "auto",
    only: Any = None,
    skip: Any = None,
    strict: bool = True,
    registry: Registry | None = None,
    **options: Any,
) -> PatchReport:
    """Patch ``model`` in place and return a report of every swap and every candidate left alone.

    ``attention`` names an attention family (``"flash2"``, ``"sdpa"``, ``"auto"``), ``quantize`` a
    quantizer (``"int8"``, ``"fp4"``, ``"nf4"``), ``patch`` any other families. ``only``/``skip``
    filter by qualified name (exact or prefix at a module boundary, or regex via ``re.compile`` /
    ``"re:..."``). ``strict=False`` leaves unsupported modules alone instead of raising. Extra
    keyword ``options`` reach the patchers. Everything is checked before anything changes; if a
    patcher fails midway, everything done so far is undone and the error re-raised.
    """
    request = Request.make(
        attention=attention,
        quantize=quantize,
        patch=patch,
        registry=registry,
        backend=backend,
        strict=strict,
        only=only,
        skip=skip,
        options=options,
    )
    stages = request.stages
    if not stages:
        raise ValueError("nothing to apply: pass attention=..., quantize=... or patch=...")
    check_not_applied(model, stages)
    with gc_paused():
        ddp = _check_wrappers(model)
        # Validate every stage up front, on the model as it is; nothing has changed if this raises.
        upfront = build_plan(model, request, "check")
        run = Run(model, request, ddp=ddp)
        with run.recording():
            for index in range(len(stages)):
                # Later stages are planned on the tree as the previous stage left it.
                run.run_stage(upfront.stages[0] if index == 0 else run.plan(index))
            report = run.finish()
        run.commit()
    run.warn_unsupported()
    return report


def _check_wrappers(model: nn.Module) -> bool:
    """Refuse FSDP (it flattens and shards parameters: no module swap can be exact through it);
    return whether DDP wraps the model (then replacements must keep the parameters DDP registered)."""
    fsdp_types: tuple[type, ...] = ()
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        fsdp_types = (FullyShardedDataParallel, FSDPModule)
    except ImportError:  # torch built without distributed
        pass
    ddp = False
    for module in model.modules():
        if fsdp_types and isinstance(module, fsdp_types):
            raise UnsupportedError(
                f"{type(module).__name__} at the model's root or inside it shards parameters; patchkit cannot swap "
                "modules through it: patch the model before wrapping it in FSDP"
            )
        ddp = ddp or isinstance(module, DistributedDataParallel)
    return ddp


def reverse(model: nn.Module) -> nn.Module:
    """Undo everything patchkit did to ``model`` and to every module inside it, last change first;
    returns ``model``.

    Works on the patched model itself or on a wrapper holding it (PEFT, TRL, DDP), and on a
    container whose parts were patched separately. Afterwards the model holds the same module,
    parameter and buffer objects, hooks and flags as before apply; a quantizer's weights come back
    bit-identical only with ``keep_original`` (else as its ``restore`` makes them, e.g. dequantized,
    with the error in the report).

    Atomic: every check and every patcher's restore runs first (kept files read, weights
    gathered) and nothing changes if one fails; the changes then run with interrupts held. If
    undoing still fails midway, the model stays patched and guarded for what is left: fix the cause
    and call ``reverse`` again. Raises :class:`NotPatchedError` if there is nothing to undo.
    """
    found = find_journals(model)
    if not found:
        raise NotPatchedError(
            f"{type(model).__name__} is not patched by patchkit (no journal on it or its submodules): "
            "nothing to reverse"
        )
    for _, journal in found:
        journal.check()
    with gc_paused():
        prepared = [(holder, journal, journal.prepare()) for holder, journal in found]
        with interrupts_held():
            for holder, journal, ready in prepared:
                journal.commit(ready)
                holder.__dict__.pop(JOURNAL_ATTR, None)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, **kwargs: Any) -> Iterator[PatchReport]:
    """Apply on entry, undo exactly that apply on exit (also when the block raises).

    Patches applied inside the block stay. If one of them changed the same modules or attributes,
    the exit raises :class:`ConflictError` and undoes nothing (reverse the inner apply first). A
    ``reverse`` inside the block leaves nothing to undo at exit.
    """
    report = apply(model, **kwargs)
    found = find_journal(model) if report.swaps else None
    layer = found[1].layers[-1] if found else None
    try:
        yield report
    finally:
        if found is not None and layer is not None and any(other is layer for other in found[1].layers):
            holder, journal = found
            problem = journal.independent(layer)
            if problem is not None:
                raise ConflictError(
                    f"cannot undo this patched() block's {report.applied}: {problem}. Reverse that apply before "
                    "leaving the block"
                )
            journal.check([layer])
            prepared = journal.prepare([layer])
            with interrupts_held():
                journal.commit(prepared)
            if not journal.layers:
                holder.__dict__.pop(JOURNAL_ATTR, None)


def is_patched(model: nn.Module) -> bool:
    """True when patchkit has changes recorded on ``model`` (or on a module inside it)."""
    found = find_journal(model)
    return found is not None


def applied(model: nn.Module) -> dict[str, str]:
    """Kind -> family of everything currently applied to ``model`` (empty when unpatched)."""
    found = find_journal(model)
    return found[1].applied_kinds() if found else {}


def save_pretrained(model: nn.Module, path: str | os.PathLike[str], *, quantized: bool = False, **kwargs: Any) -> None:
    """Save ``model`` with its host's ``save_pretrained``.

    Unpatched: exactly ``model.save_pretrained(path, **kwargs)``. Patched, ``quantized=False``:
    exactly what ``reverse`` then ``save_pretrained`` would write (tensors and config values as
    before patching), when the patched state dict equals the one reverse would leave, key for key
    and byte for byte (verified, whatever the patchers declare: attention patchers that share the
    user's parameters pass); :class:`PatchedModelError` naming the patcher otherwise, and nothing is
    written. ``quantized=True``: the quantizer's ``save`` writes a checkpoint the host reloads
    quantized (bitsandbytes: ``from_pretrained`` with a ``BitsAndBytesConfig``); the model is not changed.
    """
    if not callable(getattr(type(model), "save_pretrained", None)):
        raise ArgumentError(
            f"patchkit.save_pretrained saves through the model's own save_pretrained (a transformers model); "
            f"{type(model).__name__} has none. For a plain torch model: patchkit.reverse(model), then "
            "torch.save(model.state_dict(), path)"
        )
    guard = model.__dict__.get("save_pretrained")
    root = guard.root if isinstance(guard, guards.SaveGuard) else model
    found = find_journals(root)
    if not found:
        saver: Any = type(model)
        saver.save_pretrained(model, path, **kwargs)
        return
    if not quantized:
        problem = guards.state_problem(model, root)
        if problem is not None:
            raise PatchedModelError(guards.save_refusal(root, "save_pretrained", model, problem))
        guards.save_as_original(model, "save_pretrained", (path,), kwargs, root)
        return
    savers = {p.save for _, j in found for p in j.patchers() if p.kind == "quantize" and p.save}
    if not savers:
        raise UnsupportedError(
            "quantized=True needs a quantizer applied whose patcher can write a checkpoint; none is: "
            f"applied {applied(model)}"
        )
    if len(savers) > 1:
        raise UnsupportedError("several quantizers with different checkpoint writers are applied; save is ambiguous")
    savers.pop()(model, path)
