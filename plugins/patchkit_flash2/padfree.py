"""Per-instance forward wrapper of a base model (``LlamaModel``, ``MistralModel``, ``FalconModel``).

It marks the call as a patched forward (:data:`dispatch.ACTIVE`), refuses ``output_attentions``
and, where exact, runs padding-free: the valid tokens of the 2D padding mask are packed into one
row once at the entry, every layer runs on packed tokens (varlen attention through the
``cu_seq_lens_*`` kwargs the host passes down to attention), and the last hidden state is
re-padded once at the end (zeros on padding positions).

Padding-free is used only when it is exact and the host can carry it: a 2D mask with padding, a
call that starts from an empty KV cache (none passed, or an empty ``DynamicCache``: plain calls
and ``generate``'s prefill; the cache is filled in the padded layout the host would have written),
no ``output_hidden_states``, no caller-supplied ``cu_seq_lens_*``, and a model that forwards
per-call kwargs to its attention, or whose attention reads the boundaries from the per-call context
(Falcon: ``carrier="context"``). Decode steps (a non-empty cache) run padded, varlen attention only.
A hook on any module inside the base model (or a global module hook) would see packed tensors:
such calls run padded, with one :class:`patchkit.PatchkitWarning` per model.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from patchkit import PatchkitWarning, UnsupportedError
from patchkit.paths import CallFacts, PathLog, requested
from patchkit.toolkit import governed, hooked_modules

from . import dispatch
from . import layout as L
from .paths import choose_flash2_path

CACHE_NAMES = ("cache", "past_key_values")


def _bind(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments as one keyword dict (var-keyword flattened)."""
    bound = signature.bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _wants(config: Any, kw: dict[str, Any], name: str) -> bool:
    value = kw.get(name)
    return bool(getattr(config, name, False) if value is None else value)


class PatchedForward:
    """The callable installed as ``base.forward`` (journaled instance attribute).

    A class instance, not a closure, so that ``copy.deepcopy`` of a patched model follows its
    references through the memo: the copy's wrapper calls the copy's original forward. Holds the
    base model, its original bound ``forward``, the flags, and the set of fallback kinds already
    warned about for this model (each :class:`patchkit.PatchkitWarning` is issued once per model
    and kind, not per call or per layer).
    """

    def __init__(
        self,
        base: torch.nn.Module,
        original: Callable[..., Any],
        padding_free: bool,
        pass_kwargs: bool,
        carrier: str = "kwargs",
        off_reason: tuple[str, str] | None = None,
        path: str = "auto",
    ):
        self.base = base
        self.path = path  # the apply option: "auto" (cost model), "packed" or "original"
        self.log = PathLog()  # also the base model's ``_patchkit_paths`` (set by the patcher, journaled)
        self.original = original
        self.padding_free = padding_free
        self.pass_kwargs = pass_kwargs
        self.carrier = carrier
        self.off_reason = off_reason
        self.warned: set[str] = set()
        self.__wrapped__ = original
        self.__signature__ = inspect.signature(original)

    def warn_once(self, kind: str, message: str) -> None:
        """Issue ``message`` as a :class:`PatchkitWarning`, once per ``kind`` for this model."""
        if kind in self.warned:
            return
        self.warned.add(kind)
        warnings.warn(f"patchkit flash2 ({type(self.base).__name__}): {message}", PatchkitWarning, stacklevel=3)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        config = self.base.config
        kw = _bind(self.__signature__, args, kwargs)
        if _wants(config, kw, "output_attentions"):
            raise UnsupportedError(
                "flash2 attention computes no attention weights; output_attentions=True needs the original "
                "attention: patchkit.reverse(model) first"
            )
        mask = kw.get("attention_mask")
        state = dispatch.ActiveForward(
            config=config, mask=mask if mask is not None and mask.dim() == 2 else None, owner=self
        )
        token = dispatch.ACTIVE.set(state)
        anchor = next((kw[n] for n in ("input_ids", "inputs_embeds") if isinstance(kw.get(n), torch.Tensor)), None)
        try:
            # on a busy CPU, packed prefills and padded steps alike run on the free cores only
            with governed(anchor):
                return self._call(config, kw, state)
        finally:
            dispatch.ACTIVE.reset(token)

    def _call(self, config: Any, kw: dict[str, Any], state: dispatch.ActiveForward) -> Any:
        able = self.padding_free and (self.pass_kwargs or self.carrier == "context")
        plan = _padding_free_plan(config, kw) if able or self.off_reason else None
        packable = plan is not None and able and not hooked_modules(self.base)
        if self._route(config, kw, packable, torch.compiler.is_compiling()) == "original":
            state.original = dispatch.original_implementation(self.base)
            return self.original(**kw)
        if plan is not None and not able and self.off_reason is not None:
            self.warn_once(*self.off_reason)
        elif plan is not None:
            hooked = hooked_modules(self.base)
            if not hooked:
                return _packed_call(self.original, kw, state, plan, self.base if self.carrier == "context" else None)
            self.warn_once(
                "hooks",
                f"hooks on {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''} would see packed "
                "(1, tokens, D) tensors: calls with hooks inside the model run padded (varlen attention "
                "only, no padding-free speed-up) until they are removed",
            )
        return self.original(**kw)

    @torch.compiler.disable  # host-side: reads the mask (one sync), keeps counters
    def _route(self, config: Any, kw: dict[str, Any], packable: bool, compiling: bool) -> str:
        """Record and return this call's path: flash2's own (``"packed"``) or the original's."""
        forced = requested(self.path)
        if forced == "packed":
            return self.log.record("packed", "forced")
        if not _original_ok(kw):
            return self.log.record("packed", "flash2 semantics: cu_seq_lens / position_ids without a mask")
        if forced == "original":
            return self.log.record("original", "forced")
        path, why = choose_flash2_path(_facts(config, kw, compiling), packable)
        return self.log.record(path, why)


def _original_ok(kw: dict[str, Any]) -> bool:
    """Whether the original path gives this call flash2's semantics: not with explicit varlen
    boundaries, and not with ``position_ids`` but no mask and no cache (FA2's packed-row rule)."""
    if kw.get("cu_seq_lens_q") is not None or kw.get("cu_seq_lens_k") is not None:
        return False
    mask = kw.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        return False  # flash2 refuses custom 4D masks; keep its error
    has_cache = any(kw.get(name) is not None for name in CACHE_NAMES)
    return not (mask is None and kw.get("position_ids") is not None and not has_cache)


def _facts(config: Any, kw: dict[str, Any], compiling: bool) -> CallFacts:
    """The :class:`patchkit.paths.CallFacts` of one call of a base model."""
    tokens_in = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    batch, length = (tokens_in.shape[0], tokens_in.shape[1]) if isinstance(tokens_in, torch.Tensor) else (1, 1)
    device = tokens_in.device.type if isinstance(tokens_in, torch.Tensor) else "cpu"
    cache = next((kw[name] for name in CACHE_NAMES if kw.get(name) is not None), None)
    cached = cache is not None and int(getattr(cache, "get_seq_length", lambda: 0)()) > 0
    mask = kw.get("attention_mask")
    slots = batch * length
    tokens = slots
    if not cached and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == length:
        tokens = int(mask.sum())
    return CallFacts(
        tokens=tokens, slots=slots, batch=batch, length=length, device=device, cached=cached, compiling=compiling
    )


def make_forward(
    base: torch.nn.Module,
    original: Callable[..., Any],
    padding_free: bool,
    pass_kwargs: bool,
    carrier: str = "kwargs",
    off_reason: tuple[str, str] | None = None,
    path: str = "auto",
) -> Any:
    """The wrapper installed as ``base.forward`` (journaled instance attribute): a :class:`PatchedForward`."""
    return PatchedForward(base, original, padding_free, pass_kwargs, carrier, off_reason, path)


_NO_CACHE = object()  # plan: padding-free without a cache


def _padding_free_plan(config: Any, kw: dict[str, Any]) -> Any:
    """How this call can run padding-free: ``None`` (it cannot: padded path), :data:`_NO_CACHE`, or
    the KV cache to fill (an empty ``DynamicCache``: the caller's, or a new one built as the host
    builds it when ``use_cache`` resolves to True and none was passed)."""
    mask = kw.get("attention_mask")
    if mask is None or mask.dim() != 2 or _wants(config, kw, "output_hidden_states"):
        return None
    if kw.get("cu_seq_lens_q") is not None or kw.get("return_dict") is False:
        return None
    tokens = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    if tokens is None or tokens.shape[1] != mask.shape[1]:
        return None
    passed = [kw[name] for name in CACHE_NAMES if kw.get(name) is not None]
    if passed:
        from transformers.cache_utils import DynamicCache

        # only a prefill into an empty dynamic cache: decode steps and static caches run padded
        if not isinstance(passed[0], DynamicCache) or passed[0].get_seq_length() != 0:
            return None
    if bool(mask.bool().all()):
        return None
    # a sliding window over a mask with holes counts original positions: packing would move tokens
    # into each other's window, so that call takes the padded path (attention warns and falls back)
    window = getattr(config, "sliding_window", None)
    if window is not None and window < mask.shape[1] and L.has_holes(mask):
        return None
    if passed:
        return passed[0]
    use_cache = kw.get("use_cache")
    if getattr(config, "use_cache", False) if use_cache is None else use_cache:
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=config)  # what the host builds for use_cache without a cache
    return _NO_CACHE


def _packed_call(
    original: Callable[..., Any],
    kw: dict[str, Any],
    state: dispatch.ActiveForward,
    cache: Any,
    context_base: torch.nn.Module | None = None,
) -> Any:
    """Run ``original`` on the valid tokens packed in one row; re-pad the last hidden state.

    With a ``cache`` the host gets none (so it writes nothing packed); every attention call writes
    its keys and values, re-padded to ``[B, H, L, D]`` (zeros on padding), through ``cache.update``
    (see :class:`dispatch.Prefill`), and the output carries the cache as the host's would.

    The boundaries (``cu_seq_lens_*``, ``max_length_*``) go to the host as kwargs, or, with a
    ``context_base`` (a host that passes no kwargs to its layers and builds its masks itself:
    ``FalconModel``), into ``state.boundaries``, where its attention reads them; for that call the
    base's ``config`` attribute is a one-call view (:func:`dispatch.call_view`) whose mask function
    is patchkit's, so the host builds no ``[1, 1, tokens, tokens]`` mask for the packed row (ALiBi
    folded in: ``[1, H, tokens, tokens]``). The original config is put back when the call ends.
    """
    mask = kw.pop("attention_mask").bool()
    batch, length = mask.shape
    index = mask.flatten().nonzero().squeeze(1)
    lengths = mask.sum(-1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = int(lengths.max())
    position_ids = kw.get("position_ids")
    if position_ids is None:  # what the host uses from an empty cache: 0..T-1 in every row
        position_ids = torch.arange(length, device=mask.device).unsqueeze(0)
    kw["position_ids"] = position_ids.expand(batch, length).reshape(-1)[index].unsqueeze(0)
    if kw.get("input_ids") is not None:
        kw["input_ids"] = kw["input_ids"].reshape(-1)[index].unsqueeze(0)
    else:
        embeds = kw["inputs_embeds"]
        kw["inputs_embeds"] = embeds.reshape(batch * length, -1).index_select(0, index).unsqueeze(0)
    for name in (*CACHE_NAMES, "cache_position"):
        kw.pop(name, None)
    if cache is not _NO_CACHE:
        state.prefill = dispatch.Prefill(cache=cache, index=index, batch=batch, length=length)
    boundaries = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    kw["use_cache"] = False
    if context_base is None:
        kw.update(boundaries)
        out = original(**kw)
    else:
        state.boundaries = boundaries
        with _call_view(context_base, state):
            out = original(**kw)
    packed = out[0]
    full = packed.new_zeros(batch * length, packed.shape[-1]).index_copy(0, index, packed[0])
    full = full.view(batch, length, -1)
    if isinstance(out, tuple):
        return (full, *out[1:])
    out["last_hidden_state"] = full
    if cache is not _NO_CACHE:
        fields = getattr(out, "__dataclass_fields__", {})
        out[next((name for name in CACHE_NAMES if name in fields), CACHE_NAMES[0])] = cache
    return out


@contextlib.contextmanager
def _call_view(base: torch.nn.Module, state: dispatch.ActiveForward) -> Iterator[None]:
    """``base.config`` is a one-call view (:func:`dispatch.call_view`) while the block runs; then the
    config it copies is put back (also after an exception, and also when a concurrent call of the
    same model swapped in its own view meanwhile: that call only loses the memory saving, never
    exactness, since the host's masks are not read by patched Falcon attention)."""
    current = base.__dict__.get("config")
    if current is None:  # not a plain attribute: the host builds its own mask (slower, still exact)
        yield
        return
    if dispatch.routed(current):  # the config itself goes through "patchkit" (Falcon, transformers >= 5.25)
        yield
        return
    view, origin = dispatch.call_view(current)
    base.__dict__["config"] = view
    state.config = view
    try:
        yield
    finally:
        base.__dict__["config"] = origin
        state.config = origin
