"""The one additive ``"patchkit"`` entry in transformers' attention and mask interfaces.

Models whose config says ``_attn_implementation == "patchkit"`` call :func:`attention_forward`
for every attention module. It runs the varlen kernel stored on *that module instance* by the
patcher, and otherwise hands the call to the implementation the config had before patching, so
an unpatched module (another model sharing the config, a layer left alone) behaves as before.

Masks: inside a patched model's forward (marked by :data:`ACTIVE`, set by the per-instance forward
wrapper) the mask function returns the 2D padding mask (or None), like transformers' FA2 masks;
everywhere else it returns what the previous implementation's mask function returns.

The config switch is a :class:`ConfigSwitch` held in the config's own attention field (no module
global); the previous implementation is read off it. Semantics follow transformers' FA2 path
(position ids: see :func:`layout.packed_starts`) except where that path differs from eager on
valid tokens: a sliding window over a mask with holes runs padded (:func:`_padded_window`).
"""

from __future__ import annotations

import contextvars
import copy
import math
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from patchkit import UnsupportedError
from patchkit.toolkit import AttentionBackend, PaddedBuffers

from . import layout as L

KEY = "patchkit"
STATE_ATTR = "_patchkit_flash2"


@dataclass
class Flash2State:
    """What a patched attention module carries (journaled instance attribute)."""

    backend: AttentionBackend
    alibi_slopes: torch.Tensor | None = None  # Falcon-RW, already multiplied by the softmax scale


@dataclass
class ActiveForward:
    """One forward call of a patched base model: its config, 2D mask, and the layouts computed so far."""

    config: Any
    mask: torch.Tensor | None = None
    layouts: dict[Any, tuple[Any, L.Layout | None]] = field(default_factory=dict)
    owner: Any = None  # the model's padfree.PatchedForward (warn_once)
    prefill: Prefill | None = None  # a padding-free call filling an empty KV cache
    # a padding-free call of a host that passes no per-call kwargs to its layers (Falcon): the
    # ``cu_seq_lens_*`` / ``max_length_*`` kwargs its attention would have been given
    boundaries: dict[str, Any] | None = None
    # the call takes the original path (:mod:`patchkit_flash2.paths`): the attention implementation
    # to run for every module and mask (Falcon: any true value; its attention calls its own class)
    original: str | None = None


@dataclass
class Prefill:
    """A padding-free call that fills an empty KV cache the host does not see.

    Each attention call of the packed forward writes its ``[1, H, tokens, D]`` keys and values (after
    RoPE, exactly what the host would pass to ``cache.update``) re-padded to the ``[batch, H, length,
    D]`` layout of the unpatched call (zeros on padding) through the cache's own ``update``, so the
    cache holds what the unpatched model writes on every valid position (left or right padding).
    """

    cache: Any
    index: torch.Tensor  # flat indices (into batch * length) of the packed tokens
    batch: int
    length: int
    buffers: PaddedBuffers = field(init=False)

    def __post_init__(self) -> None:
        from transformers.cache_utils import DynamicLayer  # concatenates: its update copies

        self.buffers = PaddedBuffers(self.index, self.batch, self.length, copying=DynamicLayer)

    def write(self, module: Any, key: torch.Tensor, value: torch.Tensor) -> None:
        """``cache.update`` with this layer's keys and values in the padded layout.

        Each is a ``[batch, length, H, D]`` buffer, zeros on padding, with the tokens copied in,
        handed over as its ``[batch, H, length, D]`` view: the memory layout of the host's own keys
        (the projection viewed and transposed), so later ``torch.cat`` steps behave as unpatched.
        The buffers are zeroed once per forward where the cache copies them
        (:class:`patchkit.padded.PaddedBuffers`).
        """
        k, v = (self.buffers.padded(slot, x[0].transpose(0, 1)) for slot, x in enumerate((key, value)))
        self.cache.update(k.transpose(1, 2), v.transpose(1, 2), module.layer_idx)
        self.buffers.updated(self.cache, module.layer_idx)


def warn_once(kind: str, message: str) -> None:
    """A :class:`patchkit.PatchkitWarning` once per patched model and ``kind`` (per call when no
    patched forward is active)."""
    active = ACTIVE.get()
    if active is not None and active.owner is not None:
        active.owner.warn_once(kind, message)
    else:
        import warnings

        from patchkit import PatchkitWarning

        warnings.warn(f"patchkit flash2: {message}", PatchkitWarning, stacklevel=3)


ACTIVE: contextvars.ContextVar[ActiveForward | None] = contextvars.ContextVar("patchkit_flash2_active", default=None)


class ConfigSwitch(str):
    """The value flash2 puts in a config's attention-implementation field: equal to ``"patchkit"``
    (so transformers dispatches on it like any string), and remembering what the field held before,
    which field it was, and the patched base models that hold the switch.

    Keeping the state *in* the field it changes means: no module global (nothing keyed by
    ``id(config)``), nothing serialized (``PreTrainedConfig.to_dict`` drops
    ``_attn_implementation_internal``), and ``copy.deepcopy`` carries it with the config. Holders are
    weak references (a config must not keep models alive or drag them into its copies);
    ``__deepcopy__`` maps them through the memo, so a deep copy of a patched model holds a switch
    whose only holder is the copied base model.
    """

    previous: str
    field: str
    holders: list[weakref.ref[Any]]
    origin: Any  # set on the switch of a one-call view (:func:`call_view`): the config it copies

    def __new__(cls, previous: str, field: str) -> ConfigSwitch:
        self = super().__new__(cls, KEY)
        self.previous = previous
        self.field = field
        self.holders = []
        self.origin = None
        return self

    def live_holders(self, config: Any) -> list[Any]:
        """The holders still alive and still using ``config`` (a holder is removed when it is reversed)."""
        alive = [ref() for ref in self.holders]
        return [base for base in alive if base is not None and getattr(base, "config", None) is config]

    def __deepcopy__(self, memo: dict[int, Any]) -> ConfigSwitch:
        new = ConfigSwitch(self.previous, self.field)
        memo[id(self)] = new
        for ref in self.holders:
            base = ref()
            copied = memo.get(id(base)) if base is not None else None
            if copied is not None:
                new.holders.append(weakref.ref(copied))
        return new

    def __copy__(self) -> ConfigSwitch:
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # pickling keeps the switch, not the (weak) holders
        return (ConfigSwitch, (self.previous, self.field))


def _constant_for_dynamo(cls: type) -> None:
    """Let torch.compile treat ``cls`` instances read off a config as constants (guarded by equality).

    Compiled transformers code looks ``config._attn_implementation`` up in the interfaces' dicts.
    Dynamo in torch 2.11 wraps a ``str`` subclass as an opaque object that it cannot compare with a
    dict key (``AsPythonConstantNotImplementedError: UserDefinedObjectVariable(ConfigSwitch) is not
    a constant``; torch 2.13 handles ``str`` subclasses itself). An instance of a pytree constant
    class is a constant to Dynamo: the value itself, under an ``EQUALS_MATCH`` guard, so a reverse
    (the field back to a plain ``str``) recompiles. Not moving the state out of the field instead:
    ``to_dict`` serializes every ``__dict__`` entry but transformers' own few, and Dynamo (with
    transformers 5.24) wraps the config's whole ``__dict__`` and refuses a non-plain-``str`` key
    there. Registering only makes a switch a leafless pytree node (nothing flattens one). A torch
    without ``register_constant``: no-op.
    """
    import torch.utils._pytree as pytree

    register = getattr(pytree, "register_constant", None)
    if register is not None and not pytree.is_constant_class(cls):
        register(cls)


_constant_for_dynamo(ConfigSwitch)


def _switch(config: Any) -> ConfigSwitch | None:
    value = getattr(config, "_attn_implementation", None)
    return value if isinstance(value, ConfigSwitch) else None


def acquire_config(config: Any, holder: Any) -> str:
    """Point ``config`` at ``"patchkit"`` for one more patched base model ``holder``; returns the
    previous implementation.

    Models sharing one config object can be patched and reversed in any order: the config goes back
    to its previous implementation when the last live holder releases it.
    """
    switch = _switch(config)
    if switch is None:
        previous = str(config._attn_implementation)
        # the plain field when this transformers has one (5.x), else the property
        name = (
            "_attn_implementation_internal"
            if "_attn_implementation_internal" in vars(config)
            else "_attn_implementation"
        )
        switch = ConfigSwitch(previous, name)
        setattr(config, name, switch)
    switch.holders = [ref for ref in switch.holders if ref() is not None]
    switch.holders.append(weakref.ref(holder))
    return switch.previous


def release_config(config: Any, holder: Any) -> None:
    """Undo one :func:`acquire_config` (journaled as a reverse step, ``functools.partial`` with the
    config and the base model: both follow a deep copy of the model)."""
    switch = _switch(config)
    if switch is None:  # the field was changed by hand since: leave it
        return
    switch.holders = [ref for ref in switch.holders if ref() is not None and ref() is not holder]
    if not switch.live_holders(config):
        setattr(config, switch.field, switch.previous)


def routed(config: Any) -> bool:
    """True when ``config`` itself is routed through ``"patchkit"`` (:func:`acquire_config`), not a
    one-call view (:func:`call_view`)."""
    switch = _switch(config)
    return switch is not None and switch.origin is None


def previous_implementation(config: Any) -> str:
    """The implementation ``config`` had before patchkit set it to ``"patchkit"`` (default ``"eager"``)."""
    switch = _switch(config)
    return switch.previous if switch is not None else "eager"


def original_implementation(base: Any) -> str:
    """The implementation the original path of ``base`` runs: what its config had before patching,
    with ``"eager"`` upgraded to ``"sdpa"`` where the model supports it (the fast exact path
    transformers itself would pick; equal to eager within float rounding)."""
    previous = previous_implementation(base.config)
    if previous == "eager" and getattr(base, "_supports_sdpa", False):
        return "sdpa"
    return previous


def call_view(config: Any) -> tuple[Any, Any]:
    """``(view, origin)``: a shallow copy of ``origin`` (``config``, or the config a view was made
    of) whose attention field says ``"patchkit"``, for one padding-free call of a host that builds
    its masks from ``self.config`` but is not routed through ``"patchkit"`` (Falcon).

    Inside that call :func:`mask_function` then returns the 2D mask (None for the packed row)
    instead of the ``[1, 1, tokens, tokens]`` mask the host would build for one packed row. Nothing
    is changed on ``origin``; the view is used for that call only and dropped after it.
    """
    switch = _switch(config)
    origin = switch.origin if switch is not None and switch.origin is not None else config
    view = copy.copy(origin)
    name = (
        "_attn_implementation_internal" if "_attn_implementation_internal" in vars(origin) else "_attn_implementation"
    )
    origin_switch = _switch(origin)
    previous = origin_switch.previous if origin_switch is not None else str(origin._attn_implementation)
    new = ConfigSwitch(previous, name)
    new.origin = origin
    setattr(view, name, new)
    return view, origin


# -- registration -------------------------------------------------------------------------------
def register_keys() -> None:
    """Add ``"patchkit"`` to both interfaces once; never replaces an entry that is not ours."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for interface, fn in ((ALL_ATTENTION_FUNCTIONS, attention_forward), (ALL_MASK_ATTENTION_FUNCTIONS, mask_function)):
        existing = interface._global_mapping.get(KEY)
        if existing is fn:
            continue
        if existing is not None:
            raise UnsupportedError(
                f"transformers' {type(interface).__name__} already has a {KEY!r} entry that patchkit did not add; "
                "remove it (or rename it) before applying flash2"
            )
        type(interface).register(KEY, fn)


# -- masks --------------------------------------------------------------------------------------
def mask_function(*args: Any, **kwargs: Any) -> Any:
    """Mask-interface entry: 2D mask inside a patched forward, the previous implementation's mask elsewhere."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = kwargs.get("config")
    active = ACTIVE.get()
    if active is not None and active.original is not None and config is not None and active.config is config:
        original: Any = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(active.original)
        return None if original is None else original(*args, **kwargs)
    if active is not None and config is not None and active.config is config:
        mask = kwargs.get("attention_mask")
        if mask is None:
            return None
        mask = mask[:, -kwargs["kv_length"] :]
        return None if bool(mask.all()) else mask
    previous = previous_implementation(config)
    fn: Any = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(previous)
    return None if fn is None else fn(*args, **kwargs)


# -- attention ----------------------------------------------------------------------------------
def _eager_for(module: Any) -> Any:
    fn: Any
    owner = sys.modules.get(type(module).__module__)
    fn = getattr(owner, "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


# Not traced: the layout is host-side bookkeeping (a sync to read lengths, a cache keyed by tensor
# identity); traced, dynamo guarded on those ids and recompiled on every call.
@torch.compiler.disable
def _layout(
    active: ActiveForward | None, mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, kwargs: dict[str, Any]
) -> L.Layout | None:
    """The packed layout of this call, cached per forward (one host sync per forward, not per layer)."""
    batch, q_len, k_len = q.shape[0], q.shape[2], k.shape[2]
    if kwargs.get("cu_seq_lens_q") is not None:
        cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"])
        source: Any = cu_q
        key: Any = ("cu", id(cu_q), id(cu_k))
    elif mask is not None:
        if mask.dim() != 2:
            raise UnsupportedError(
                f"flash2 got a {mask.dim()}D attention mask; it needs the 2D padding mask "
                "(custom 4D masks are not supported: reverse the patch to use them)"
            )
        source, key = mask, ("mask", id(mask), q_len, k_len)
    elif kwargs.get("position_ids") is not None and q_len == k_len:
        source = kwargs["position_ids"]
        key = ("pos", id(source), batch)
    else:
        return None
    if active is not None and key in active.layouts and active.layouts[key][0] is source:
        return active.layouts[key][1]
    if key[0] == "cu":
        layout: L.Layout | None = L.explicit(
            cu_q,
            cu_k,
            kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max()),
            kwargs.get("max_length_k") or int((cu_k[1:] - cu_k[:-1]).max()),
        )
    elif key[0] == "mask":
        if mask is not None and mask.shape[-1] != k_len:
            raise UnsupportedError(
                f"flash2: padding mask covers {mask.shape[-1]} keys but the cache holds {k_len} "
                "(static or offloaded caches are not supported: use the default DynamicCache)"
            )
        layout = L.from_mask(source, q_len)
    else:
        layout = L.from_position_ids(source, batch)
    if active is not None:
        active.layouts[key] = (source, layout)
    return layout


@torch.compiler.disable  # host-side cache lookups, like _layout
def _layout_or_dense(
    active: ActiveForward | None, mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, kwargs: dict[str, Any]
) -> L.Layout:
    """:func:`_layout`, or for full rows one dense layout cached per forward."""
    layout = _layout(active, mask, q, k, kwargs)
    if layout is not None:
        return layout
    dense_key = ("dense", q.shape[0], q.shape[2], k.shape[2])
    cached = active.layouts.get(dense_key) if active is not None else None
    if cached is not None and cached[1] is not None:
        return cached[1]
    layout = L.dense(q.shape[0], q.shape[2], k.shape[2], q.device)
    if active is not None:
        active.layouts[dense_key] = (None, layout)
    return layout


# Backends whose kernel torch's own SDPA matches on full rows (FlashAttention-2 in both).
DENSE_EQUIVALENT = frozenset({"torch", "flash_attn"})


def varlen_attention(
    state: Flash2State,
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scaling: float | None,
    dropout: float,
    causal: bool,
    sliding_window: int | None,
    use_alibi: bool,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Run ``state.backend`` on ``[B, H, T, D]`` tensors; returns ``[B, T, H, D]`` (zeros on padding)."""
    batch, heads, q_len, dim = query.shape
    layout = _layout_or_dense(ACTIVE.get(), mask, query, key, kwargs)
    window = (sliding_window - 1 if sliding_window else -1, 0 if causal else -1)
    k_len = key.shape[2]
    if (
        layout.full
        and state.backend.name in DENSE_EQUIVALENT
        and (q_len == k_len or q_len == 1)  # is_causal aligns top-left: equal to bottom-right only here
        and (window[0] < 0 or window[0] >= k_len - 1)
        and not use_alibi
        and not kwargs.get("softcap")
    ):
        # Nothing to unpad: torch's dense SDPA flash kernel is the same algorithm without the varlen
        # bookkeeping (H100, 1 x 4096 bf16: the varlen call was 0.83-0.87x of it).
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=dropout,
            is_causal=causal and q_len > 1,
            scale=scaling,
            enable_gqa=key.shape[1] != heads,
        )
        return out.transpose(1, 2).contiguous()
    out = state.backend.varlen(
        L.unpad(query, layout.q_index),
        L.unpad(key, layout.k_index),
        L.unpad(value, layout.k_index),
        cu_seqlens_q=layout.cu_q,
        cu_seqlens_k=layout.cu_k,
        max_seqlen_q=layout.max_q,
        max_seqlen_k=layout.max_k,
        scale=scaling if scaling is not None else 1.0 / math.sqrt(dim),
        causal=causal,
        window=window,
        alibi_slopes=state.alibi_slopes if use_alibi else None,
        dropout=dropout,
        # only when set: a kernel without the "softcap" feature is never chosen for such a module
        **({"softcap": float(kwargs["softcap"])} if kwargs.get("softcap") else {}),
    )
    return L.repad(out, layout.q_index, batch, q_len)


def attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention-interface entry: the module's own varlen kernel if patched, else its previous implementation.

    Inside a padding-free call that fills a KV cache (:class:`Prefill`), first writes this layer's
    keys and values to the cache, in the padded layout the host would have written.
    """
    active = ACTIVE.get()
    if active is not None and active.original is not None:  # the original path: transformers' own function
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS.get_interface(active.original, _eager_for(module))
        return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if active is not None and active.prefill is not None and getattr(module, "config", None) is active.config:
        active.prefill.write(module, key, value)
    if active is not None and active.boundaries is not None and kwargs.get("cu_seq_lens_q") is None:
        # a packed call of a host passing no per-call kwargs to its layers (Falcon >= 5.25)
        kwargs = {**kwargs, **active.boundaries}
    state = module.__dict__.get(STATE_ATTR)
    if state is None:
        return _fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("output_attentions"):
        raise UnsupportedError(
            "flash2 attention computes no attention weights: reverse the patch for output_attentions"
        )
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", True) if causal is None else causal
    window = kwargs.get("sliding_window")
    if window is not None and attention_mask is not None and attention_mask.dim() == 2 and key.shape[2] > window:
        layout = _layout(ACTIVE.get(), attention_mask, query, key, kwargs)
        if layout is not None and layout.holes:
            return _padded_window(module, query, key, value, attention_mask, dropout, scaling, bool(causal), kwargs)
    out = varlen_attention(
        state,
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=scaling,
        dropout=dropout,
        causal=bool(causal),
        sliding_window=kwargs.get("sliding_window"),
        use_alibi=False,
        kwargs=kwargs,
    )
    return out, None


def _padded_window(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    dropout: float,
    scaling: float | None,
    causal: bool,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, Any]:
    """A sliding window over a padding mask with holes (not pure left/right padding).

    Varlen kernels count the window on packed tokens, which would pull tokens across a hole into
    each other's window. This call runs padded instead, through the implementation the config had
    before (eager or sdpa; sdpa for anything else), with the host's own mask semantics: key ``j`` is
    visible to query ``i`` (at key position ``i + k_len - q_len``) when it is a token, causal, and
    within ``sliding_window`` original positions. Warns once per model.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    warn_once(
        "window-holes",
        "the padding mask has holes (not pure left/right padding) and a sliding window applies: "
        "those calls run padded (dense masks, no varlen kernel) to keep the window on original positions",
    )
    previous = previous_implementation(module.config)
    fn = ALL_ATTENTION_FUNCTIONS.get_interface("eager" if previous == "eager" else "sdpa", _eager_for(module))
    q_len, k_len = query.shape[2], key.shape[2]
    ok = L.padded_window_mask(mask[:, -k_len:], q_len, window_left=kwargs["sliding_window"] - 1, causal=causal)
    dense = torch.zeros(ok.shape, dtype=query.dtype, device=query.device).masked_fill(~ok, torch.finfo(query.dtype).min)
    rest = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    rest["is_causal"] = False
    out, _ = fn(module, query, key, value, dense, dropout=dropout, scaling=scaling, **rest)
    return out, None


def _fallback(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any
) -> Any:
    """An unpatched module: run the implementation its config had before patching.

    Inside a patched forward the host built a 2D / packed mask for the patched layers; rebuild the
    equivalent dense boolean mask so the previous implementation sees what it expects.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = previous_implementation(module.config)
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(previous, _eager_for(module))
    active = ACTIVE.get()
    if active is not None and (mask is None or mask.dim() == 2):
        batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        layout = _layout(active, mask, query, key, kwargs) or L.dense(batch, q_len, k_len, query.device)
        sliding = kwargs.get("sliding_window")
        ok = L.dense_mask(layout, batch, q_len, k_len, window_left=sliding - 1 if sliding else -1)
        min_value = torch.finfo(query.dtype).min
        mask = torch.zeros(ok.shape, dtype=query.dtype, device=query.device).masked_fill(~ok, min_value)
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
        kwargs["is_causal"] = False
    return fn(module, query, key, value, mask, **kwargs)
