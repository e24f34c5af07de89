"""``patchkit.from_pretrained``: build a model without weights, plan the patch, stream the checkpoint in.

Order of work (every refusal that needs no tensor data happens before a tensor byte is read):

1. Check the checkpoint (index, shards, headers, byte ranges, dtypes) and the device.
2. Build the model on the ``meta`` device from its config, the way transformers does (same default
   dtype, same untied start), tie the weights the checkpoint omits, switch to eval mode.
3. Plan every requested stage (``patchkit.plan`` semantics: plan-time refusals raise here) and
   check every checkpoint tensor against the model's (name, shape, dtype).
4. Build the stages that come before the quantizer (attention patchers share parameters, so they
   are built on the meta model); plan the quantize stage on the result.
5. Materialise what the checkpoint does not hold (non-persistent buffers such as rotary
   ``inv_freq`` or ``position_ids``, and missing tensors) and initialise it with the model's own
   ``initialize_weights``, as transformers does.
6. Stream the tensors file by file. A module planned for the quantize stage is checked and built
   as soon as its last tensor arrives, and its commit steps (freeing the full-precision weight)
   run at once: at most one full-precision layer is alive besides the quantized ones.
7. Run the stages' ``setup``, then the stages after the quantizer, on the loaded model.

The model is new: if anything fails, it is discarded and the error raised (nothing else changed).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .atomic import gc_paused, run_all
from .checkpoint import Checkpoint, Entry, ShardReader, Shared, TensorSource, open_checkpoint
from .errors import UnsupportedError
from .pipeline import PatchkitWarning, PatchReport, Run, check_not_applied
from .planning import Request, Stage, build_plan, check_requirements
from .registry import Registry

CHECKPOINT_OPTION = "checkpoint"  # keep_original="checkpoint": fingerprint the tensors the quantizer takes


@dataclass
class LoadInfo:
    """What the load found besides the tensors it loaded (also on the report as notes)."""

    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint lacks: initialised
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for


def from_pretrained(
    model_class: Any,
    path: str | os.PathLike[str],
    *,
    quantize: str | None = None,
    attention: str | None = None,
    patch: str | Iterable[str] | None = None,
    dtype: Any = None,
    device_map: Any = None,
    device: Any = None,
    config: Any = None,
    attn_implementation: str | None = None,
    backend: str = "auto",
    only: Any = None,
    skip: Any = None,
    strict: bool = True,
    registry: Registry | None = None,
    progress: bool | None = None,
    return_report: bool = False,
    **options: Any,
) -> Any:
    """Load a transformers model from a local safetensors checkpoint, patched while it loads.

    ``model_class``: a transformers ``PreTrainedModel`` class (``AutoModel*`` classes are resolved
    from the config). ``path``: a local folder with ``config.json`` and ``model.safetensors`` or
    ``model.safetensors.index.json`` plus its shards. ``dtype`` (default ``"auto"``, as transformers
    5), ``device_map`` / ``device`` (one device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``{"": dev}``),
    ``config`` and ``attn_implementation`` mean what they mean to transformers' ``from_pretrained``.
    ``quantize`` / ``attention`` / ``patch`` / ``backend`` / ``only`` / ``skip`` / ``strict`` and
    ``**options`` mean what they mean to :func:`patchkit.apply`; ``keep_original="checkpoint"``
    (quantizers that support it) reverses by reading the original weights back from these files.

    Guarantees: the model equals ``transformers.from_pretrained`` followed by ``patchkit.apply``
    with the same arguments (same modules, tensors, outputs, report, save guard; ``reverse`` works
    the same); a quantized layer's full-precision weight is freed as soon as it is quantized, on the
    target device, so peak memory stays near the quantized size plus one layer. Refusals a plan
    can make, and every checkpoint problem (missing file or shard, truncated file, a tensor of the
    wrong shape or dtype), raise :class:`UnsupportedError` before a tensor byte is read. Returns the
    model, or ``(model, report)`` with ``return_report=True`` (``report`` is ``None`` when nothing
    was requested). Progress is shown on a terminal (``progress=True/False`` forces it).
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
    target = _target_device(device_map, device)
    checkpoint = open_checkpoint(path)
    model, dtype_plan = _build_meta(model_class, path, checkpoint, config, dtype, attn_implementation)
    with gc_paused():
        report = _load(model, checkpoint, target, dtype_plan, request, progress)
    return (model, report) if return_report else model


def _target_device(device_map: Any, device: Any) -> torch.device:
    if device_map is not None and device is not None:
        raise UnsupportedError("pass device_map= or device=, not both")
    chosen = device if device is not None else device_map
    if isinstance(chosen, dict):
        places = set(chosen.values())
        if len(places) != 1 or "disk" in places:
            raise UnsupportedError(
                f"device_map={chosen!r} spreads the model over several devices (or disk); patchkit.from_pretrained "
                "loads onto one device: pass device_map='cuda' (or 'cpu'), or use transformers' loader and "
                "patchkit.apply for offloaded models"
            )
        chosen = places.pop()
    if chosen is None:
        return torch.device("cpu")
    if chosen == "auto":
        raise UnsupportedError(
            "device_map='auto' may offload to several devices; patchkit.from_pretrained loads onto one device: "
            "pass device_map='cuda' or 'cpu'"
        )
    try:
        target = torch.device(chosen) if not isinstance(chosen, int) else torch.device("cuda", chosen)
    except (RuntimeError, TypeError) as exc:
        raise UnsupportedError(f"device {chosen!r} is not a torch device ({exc})") from exc
    if target.type == "meta":
        raise UnsupportedError("device 'meta' loads nothing: use patchkit.plan on a meta model instead")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError(f"device {chosen!r}: CUDA is not available in this process")
    return target


def _build_meta(
    model_class: Any,
    path: str | os.PathLike[str],
    checkpoint: Checkpoint,
    config: Any,
    dtype: Any,
    attn_implementation: str | None,
) -> tuple[nn.Module, dict[str, torch.dtype]]:
    """The model built on the meta device as transformers' ``from_pretrained`` builds it."""
    try:
        from transformers import AutoConfig, PretrainedConfig
        from transformers.modeling_utils import _get_dtype
        from transformers.utils.generic import ContextManagers
    except ImportError as exc:  # pragma: no cover - transformers is the host library here
        raise UnsupportedError(f"patchkit.from_pretrained needs transformers ({exc})") from exc
    name = os.fspath(path)
    if config is None or not isinstance(config, PretrainedConfig):
        config_path = config if config is not None else (name if os.path.isdir(name) else checkpoint.folder)
        if not os.path.isfile(os.path.join(os.fspath(config_path), "config.json")):
            raise UnsupportedError(f"no config.json in {config_path}: pass config=... or save the config there")
        config_class = getattr(model_class, "config_class", None) or AutoConfig
        config = config_class.from_pretrained(config_path, local_files_only=True)
    else:
        config = copy.deepcopy(config)
    if hasattr(model_class, "_model_mapping"):  # an AutoModel* class: pick the concrete one from the config
        model_class = model_class._model_mapping[type(config)]
    if not (isinstance(model_class, type) and hasattr(model_class, "get_init_context")):
        raise UnsupportedError(f"{model_class!r} is not a transformers PreTrainedModel class")
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    metadata = None if checkpoint.index is None else checkpoint.index.get("metadata")
    config, dtype = _get_dtype("auto" if dtype is None else dtype, checkpoint.files, config, metadata, None, True, None)
    config.name_or_path = name
    config = copy.deepcopy(config)
    contexts = model_class.get_init_context(dtype, False, False, None)
    with ContextManagers(contexts):
        model = model_class(config)
        with contextlib.suppress(ImportError):
            from transformers.monkey_patching import patch_output_recorders

            patch_output_recorders(model)
    model.eval()  # transformers' state after loading; patchers plan against it (inference-only ones too)
    return model, dict(model._get_dtype_plan(dtype))


def _rename(key: str, expected: dict[str, Any], prefix: str) -> str | None:
    if key in expected:
        return key
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in expected:
        return key[len(prefix) + 1 :]
    return None


def _slots(modules: Iterable[nn.Module]) -> dict[int, list[tuple[dict[str, Any], str]]]:
    """id(tensor) -> every (``_parameters`` / ``_buffers`` dict, name) that holds it."""
    out: dict[int, list[tuple[dict[str, Any], str]]] = {}
    seen: set[tuple[int, str]] = set()
    for module in modules:
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and (id(store), name) not in seen:
                    seen.add((id(store), name))
                    out.setdefault(id(tensor), []).append((store, name))
    return out


def _put(old: torch.Tensor, value: torch.Tensor, slots: list[tuple[dict[str, Any], str]]) -> torch.Tensor:
    """Replace the meta tensor ``old`` by ``value`` in every slot holding it (ties stay tied)."""
    if isinstance(old, nn.Parameter):
        new: torch.Tensor = type(old)(value, requires_grad=old.requires_grad and value.is_floating_point())
    else:
        new = value
    for attr, attr_value in vars(old).items():  # e.g. transformers' _is_hf_initialized
        with contextlib.suppress(AttributeError, TypeError):
            setattr(new, attr, attr_value)
    for store, name in slots:
        if store.get(name) is old:
            store[name] = new
    return new


def _all_modules(model: nn.Module, stages_built: list[Stage]) -> Iterator[nn.Module]:
    """The model's modules plus the originals the earlier stages swapped out (they come back on reverse)."""
    yield from model.modules()
    for stage in stages_built:
        for planned in stage.patches:
            yield from planned.node.module.modules()


def _load(
    model: nn.Module,
    checkpoint: Checkpoint,
    target: torch.device,
    dtype_plan: dict[str, torch.dtype],
    request: Request,
    progress: bool | None,
) -> PatchReport | None:
    # -- the model's tensors against the checkpoint's (names, shapes, dtypes): nothing read yet ----------
    expected = model.state_dict(keep_vars=True)
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    wanted: dict[str, Entry] = {}  # model key -> checkpoint entry
    info = LoadInfo()
    for key, found in checkpoint.entries.items():
        name = _rename(key, expected, prefix)
        if name is None:
            info.unexpected.append(key)
        elif name not in wanted:
            wanted[name] = found
    missing = {k for k in expected if k not in wanted}
    tie: Any = getattr(model, "tie_weights", None)
    if callable(tie) and getattr(model, "all_tied_weights_keys", None) is not None:
        tie(missing_keys=set(missing), recompute_mapping=False)  # the meta parameters: ties survive loading
        expected = model.state_dict(keep_vars=True)
    dtype_for = _dtype_rule(dtype_plan)
    by_tensor: dict[int, tuple[torch.Tensor, Entry, torch.dtype]] = {}
    for name, tensor in expected.items():
        entry = wanted.get(name)
        if entry is None or id(tensor) in by_tensor:
            continue
        if tuple(tensor.shape) != entry.shape:
            raise UnsupportedError(
                f"{entry.file}: tensor {entry.key!r} has shape {list(entry.shape)}, the model's {name} expects "
                f"{list(tensor.shape)} (wrong checkpoint for this config?)"
            )
        want = dtype_for(name, tensor.dtype)
        if entry.torch_dtype != want and not (entry.torch_dtype.is_floating_point and want.is_floating_point):
            raise UnsupportedError(
                f"{entry.file}: tensor {entry.key!r} is {entry.torch_dtype}, the model's {name} is {want}; only "
                "floating-point tensors are cast on load"
            )
        by_tensor[id(tensor)] = (tensor, entry, want)
    loaded_ids = set(by_tensor)
    info.missing = sorted(k for k, t in expected.items() if id(t) not in loaded_ids)
    if info.unexpected:
        warnings.warn(
            f"{len(info.unexpected)} checkpoint tensor(s) have no place in {type(model).__name__} and are ignored: "
            f"{info.unexpected[:5]}{' ...' if len(info.unexpected) > 5 else ''}",
            PatchkitWarning,
            stacklevel=3,
        )

    # -- plan every stage on the meta model: plan-time refusals raise here ------------------------------
    stages = request.stages
    pre = [i for i, s in enumerate(stages) if s[0] == "attention"]
    quant = [i for i, s in enumerate(stages) if s[0] == "quantize"]
    post = [i for i, s in enumerate(stages) if s[0] == "other"]
    run: Run | None = None
    built: list[Stage] = []
    deferred: Stage | None = None
    if stages:
        check_not_applied(model, stages)
        upfront = build_plan(model, request, "check")
        run = Run(model, request)
        run.open_layer()  # the model is new: a failure discards it, nothing to roll back
        for index in pre:  # attention patchers share parameters: built on the meta model
            stage = upfront.stages[0] if index == 0 else run.plan(index)
            run.run_stage(stage)
            built.append(stage)
        if quant:
            deferred = upfront.stages[quant[0]] if not pre else run.plan(quant[0])

    # -- what the checkpoint does not hold: created on the target device, initialised like transformers --
    slots = _slots(_all_modules(model, built + ([deferred] if deferred else [])))
    fresh: list[torch.Tensor] = []
    for tensor, _, _ in by_tensor.values():
        tensor._is_hf_initialized = True  # type: ignore[attr-defined]  # transformers' init skips loaded ones
    for module in list(_all_modules(model, built + ([deferred] if deferred else []))):
        for store in (module._parameters, module._buffers):
            for tensor in list(store.values()):
                if tensor is not None and tensor.device.type == "meta" and id(tensor) not in loaded_ids:
                    value = torch.empty(tensor.shape, dtype=tensor.dtype, device=target)
                    new = _put(tensor, value, slots.get(id(tensor), []))
                    fresh.append(new)
                    loaded_ids.add(id(tensor))
    initialize: Any = getattr(model, "initialize_weights", None)
    if fresh and callable(initialize):
        initialize()
    if info.missing and run is not None:
        run.notes.append(
            f"initialised (not in the checkpoint): {', '.join(info.missing[:10])}"
            + (" ..." if len(info.missing) > 10 else "")
        )
    if info.missing:
        warnings.warn(
            f"{len(info.missing)} tensor(s) of {type(model).__name__} are not in the checkpoint and were initialised "
            f"by the model's initialize_weights: {info.missing[:5]}{' ...' if len(info.missing) > 5 else ''}",
            PatchkitWarning,
            stacklevel=3,
        )

    # -- stream: each quantize-stage module is built once its last tensor arrived -----------------------
    pending: dict[int, int] = {}
    owners: dict[int, list[int]] = {}  # id(meta tensor) -> deferred patch indices
    fingerprint = request.keep_original == CHECKPOINT_OPTION
    sources: dict[int, tuple[torch.Tensor, TensorSource]] = {}
    if deferred is not None:
        for i, planned in enumerate(deferred.patches):
            waiting = {
                id(t)
                for t in (*planned.node.module.parameters(), *planned.node.module.buffers())
                if t.device.type == "meta"
            }
            pending[i] = len(waiting)
            for ident in waiting:
                owners.setdefault(ident, []).append(i)
    # A tensor only quantize-stage modules hold is read as a view of the file mapping (no copy): the
    # quantizer reads it and its commit frees it. Once every module holding it was built, what the
    # model still holds of it is copied out and its pages are dropped.
    shared_of: dict[int, list[_SharedTensor]] = {}  # deferred patch index -> its tensors still mapped
    trimmer = _Trimmer()

    def ready(i: int) -> None:
        assert deferred is not None and run is not None
        # Checked again now that its tensors arrived, built, and committed at once (the model is new:
        # nothing to roll back to, the full-precision copy is freed here).
        steps: list[Callable[[], None]] = []
        run.build_patch(deferred, deferred.patches[i], recheck=True, sources=sources, commits=steps)
        run_all(steps)
        for shared in shared_of.pop(i, ()):
            shared.waiting -= 1
            if shared.waiting == 0:
                shared.finish()
        trimmer.maybe_trim()

    first_streamed = len(run.swaps) if run is not None else 0
    for i, count in pending.items():
        if count == 0:
            ready(i)
    total = sum(entry.nbytes for _, entry, _ in by_tensor.values())
    with _progress(total, progress) as bar:
        by_key: dict[str, list[int]] = {}
        for ident, (_, entry, _) in by_tensor.items():
            by_key.setdefault(entry.key, []).append(ident)
        for file, entries in checkpoint.by_file():
            todo = [by_tensor[i] for e in entries for i in by_key.get(e.key, ())]
            if not todo:
                continue
            reader = ShardReader(file, checkpoint.sizes[file])
            try:
                for tensor, entry, want in todo:
                    quantized = id(tensor) in owners
                    value, digest, handle = reader.read(
                        entry, want, target, fingerprint=fingerprint and quantized, share=quantized
                    )
                    new = _put(tensor, value, slots.get(id(tensor), []))
                    del value
                    if quantized:
                        sources[id(new)] = (new, checkpoint.source(entry, digest))
                    if handle is not None:
                        shared = _SharedTensor(new, reader, handle, len(owners[id(tensor)]))
                        for i in owners[id(tensor)]:
                            shared_of.setdefault(i, []).append(shared)
                        del shared
                    del new
                    for i in owners.get(id(tensor), ()):
                        pending[i] -= 1
                        if pending[i] == 0:
                            ready(i)
                    bar(entry.nbytes)
            finally:
                reader.close()
            del reader
            trimmer.maybe_trim()
    sources.clear()
    unbuilt = [deferred.patches[i].paths[0] for i, n in pending.items() if n > 0] if deferred else []
    if unbuilt:  # cannot happen unless a tensor was skipped: refuse rather than leave a half-patched model
        raise UnsupportedError(f"these modules never received all their tensors: {unbuilt[:5]}")

    # -- setups, then the stages after the quantizer on the loaded model --------------------------------
    report: PatchReport | None = None
    if run is not None:
        if deferred is not None:
            # Built in the order the tensors arrived; reported in plan order, as apply reports them.
            rank = {tuple(p.paths): i for i, p in enumerate(deferred.patches)}
            streamed = sorted(run.swaps[first_streamed:], key=lambda swap: rank.get(tuple(swap.paths), -1))
            run.swaps[first_streamed:] = streamed
            run.finish_stage(deferred)
        for index in post:
            run.run_stage(run.plan(index))
        for stage in built:  # built on meta: their device requirements are checked on the loaded tensors
            for planned in stage.patches:
                check_requirements(planned.patcher_obj, planned.node.module)
        report = run.finish()
        run.commit()
    _finish(model, checkpoint)
    if run is not None:
        run.warn_unsupported()
    return report


def _dtype_rule(dtype_plan: dict[str, torch.dtype]) -> Callable[[str, torch.dtype], torch.dtype]:
    """transformers' rule: a ``_keep_in_fp32_modules`` match gets its dtype, anything else keeps the model's."""
    if not dtype_plan:
        return lambda name, dtype: dtype
    from transformers.core_model_loading import build_glob_alternation

    alternation, by_group, _ = build_glob_alternation(list(dtype_plan.keys()))

    def rule(name: str, dtype: torch.dtype) -> torch.dtype:
        found = alternation.search(name)
        return dtype_plan[by_group[found.lastgroup]] if found is not None and found.lastgroup else dtype

    return rule


class _SharedTensor:
    """A loaded tensor whose data is a view of a file mapping, until the modules holding it are built."""

    __slots__ = ("tensor", "reader", "handle", "waiting")

    def __init__(self, tensor: torch.Tensor, reader: ShardReader, handle: Shared, waiting: int) -> None:
        self.tensor: torch.Tensor | None = tensor
        self.reader = reader
        self.handle = handle
        self.waiting = waiting  # deferred modules holding it that are not built yet

    def finish(self) -> None:
        """Copy out what the model still holds of the view (a skipped layer, a shared bias); drop the pages."""
        tensor, self.tensor = self.tensor, None
        assert tensor is not None
        if tensor.untyped_storage().data_ptr() == self.handle.address:
            tensor.data = tensor.data.clone()
        del tensor
        self.reader.done(self.handle)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return trim


_TRIM_STEP = 32 * 1024 * 1024  # bytes of resident-set growth that trigger a malloc_trim
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_bytes() -> int:
    """This process's resident set now (Linux ``/proc/self/statm``), 0 where unknown."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


class _Trimmer:
    """Give freed heap pages (the quantizer's layer-sized temporaries) back to the OS (glibc: ``malloc_trim``).

    Without it glibc keeps them: freed layer-sized blocks are split by the quantizer's smaller,
    long-lived allocations and the next layer's temporaries no longer fit in them, so the heap grows
    by about a layer's worth per layer (measured on the OPT-350m-shape bench, int8: 1823 MiB peak RSS
    without trimming, 897 MiB trimming after every layer, 896 MiB with this policy). A trim costs
    milliseconds and makes the next allocations fault their pages in again, so it runs only once the
    resident set grew by ``_TRIM_STEP`` since the last one. Changes no allocator setting; a no-op
    where glibc's ``malloc_trim`` is missing.
    """

    def __init__(self) -> None:
        self.trim = _malloc_trim()
        self.floor = _resident_bytes() if self.trim is not None else 0

    def maybe_trim(self) -> None:
        """Trim if the resident set grew by ``_TRIM_STEP`` since the last trim (always, if it cannot be read)."""
        if self.trim is None:
            return
        resident = _resident_bytes()
        if not resident or resident - self.floor > _TRIM_STEP:
            self.trim(0)
            self.floor = _resident_bytes()


def _finish(model: nn.Module, checkpoint: Checkpoint) -> None:
    """What transformers does after loading: eval mode, the generation config saved next to the weights."""
    model.eval()
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        name = os.path.join(checkpoint.folder, "generation_config.json")
        if os.path.isfile(name):
            from transformers import GenerationConfig

            generation: Any = GenerationConfig.from_pretrained(checkpoint.folder, local_files_only=True)
            model.generation_config = generation


@contextlib.contextmanager
def _progress(total: int, show: bool | None) -> Iterator[Callable[[int], None]]:
    """A byte counter: a tqdm bar on a terminal (after a second), silent otherwise."""
    if show is None:
        show = sys.stderr.isatty()
    bar: Any = None
    if show:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="patchkit: loading", delay=1.0, leave=False)
        except ImportError:
            bar = None
    try:
        yield (bar.update if bar is not None else (lambda n: None))
    finally:
        if bar is not None:
            bar.close()
