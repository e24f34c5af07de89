"""The ``"patchkit_sdpa"`` entry in transformers' attention and mask interfaces, for packed encoders.

A model patched by :mod:`patchkit_sdpa.encoder_generic` has its config's attention field set (per
instance, journaled) to an :class:`EncoderSwitch`: a string equal to ``"patchkit_sdpa"`` that
remembers the implementation the config had before. Every attention module of that model then
calls :func:`attention_forward`, and every mask the model builds goes through :func:`mask_function`:

- inside a packed call of the patched encoder (:data:`ACTIVE` holds its :class:`Active`: the
  config and the packing), the mask function returns ``None`` (the packed row has no padding) and
  the attention function attends within each sequence of the packing (``patchkit.varlen``'s
  grouped SDPA calls, or the registry's varlen kernel), honouring a bidirectional sliding window;
- everywhere else (the original path the patched encoder takes without padding, another model
  sharing the config, a decoder sharing an encoder-decoder's config) both hand the call to the
  previous implementation unchanged: the model computes exactly what it computed before.
"""

from __future__ import annotations

import contextvars
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from patchkit import UnsupportedError
from patchkit.toolkit import grouped_sdpa

from ._packing import Packing, _kernel, _warn_once

KEY = "patchkit_sdpa"


class EncoderSwitch(str):
    """The value put in a patched config's attention field: equal to :data:`KEY`, remembering the
    previous implementation (``previous``). Reverse puts the previous plain string back (journaled)."""

    previous: str

    def __new__(cls, previous: str) -> EncoderSwitch:
        self = super().__new__(cls, KEY)
        self.previous = previous
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> EncoderSwitch:
        return EncoderSwitch(self.previous)

    def __copy__(self) -> EncoderSwitch:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (EncoderSwitch, (self.previous,))


def _constant_for_dynamo() -> None:
    import torch.utils._pytree as pytree

    register = getattr(pytree, "register_constant", None)
    if register is not None and not pytree.is_constant_class(EncoderSwitch):
        register(EncoderSwitch)


_constant_for_dynamo()


@dataclass
class Active:
    """One packed call of a patched encoder: the config its attention modules read, the packing,
    and per-forward caches (band masks of the sliding window, per sequence length)."""

    config: Any
    packing: Packing
    tokens: int
    bands: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


ACTIVE: contextvars.ContextVar[Active | None] = contextvars.ContextVar("patchkit_sdpa_encoder", default=None)


def config_field(config: Any) -> str:
    """The attribute holding the attention implementation (the plain field in 5.x)."""
    return (
        "_attn_implementation_internal" if "_attn_implementation_internal" in vars(config) else "_attn_implementation"
    )


def previous_implementation(config: Any) -> str:
    """The implementation ``config`` had before it was switched (``"eager"`` when unknown)."""
    value = getattr(config, "_attn_implementation", None)
    if isinstance(value, EncoderSwitch):
        return value.previous
    return str(value) if value else "eager"


def switch_config(config: Any, ctx: Any) -> str:
    """Point ``config`` at :data:`KEY` (journaled through ``ctx.set_attr``); returns the previous
    implementation. A config already switched (two patched stacks sharing it) is left as it is."""
    value = getattr(config, "_attn_implementation", None)
    if isinstance(value, EncoderSwitch):
        return value.previous
    previous = str(value) if value else "eager"
    ctx.set_attr(config, config_field(config), EncoderSwitch(previous))
    return previous


def register_keys() -> None:
    """Add :data:`KEY` to both interfaces once; never replaces an entry that is not ours."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for interface, fn in ((ALL_ATTENTION_FUNCTIONS, attention_forward), (ALL_MASK_ATTENTION_FUNCTIONS, mask_function)):
        existing = interface._global_mapping.get(KEY)
        if existing is fn:
            continue
        if existing is not None:
            raise UnsupportedError(
                f"transformers' {type(interface).__name__} already has a {KEY!r} entry that patchkit did not add; "
                "remove it before applying attention='sdpa' to this encoder"
            )
        type(interface).register(KEY, fn)


def mask_function(*args: Any, **kwargs: Any) -> Any:
    """Mask-interface entry: ``None`` inside a packed call of this config, the previous
    implementation's mask everywhere else."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = kwargs.get("config")
    active = ACTIVE.get()
    if active is not None and config is not None and active.config is config:
        return None
    fn: Any = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(previous_implementation(config))
    return None if fn is None else fn(*args, **kwargs)


def _eager_for(module: Any) -> Any:
    owner = sys.modules.get(type(module).__module__)
    fn = getattr(owner, "eager_attention_forward", None)
    if fn is None:
        from transformers.models.bert.modeling_bert import eager_attention_forward as fn
    return fn


def _previous(module: Any, *args: Any, **kwargs: Any) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = getattr(module, "config", None)
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(previous_implementation(config), _eager_for(module))
    return fn(module, *args, **kwargs)


def _band(active: Active, n: int, half: int, device: torch.device) -> torch.Tensor:
    key = (n, half)
    mask = active.bands.get(key)
    if mask is None:
        i = torch.arange(n, device=device)
        mask = (i[:, None] - i[None, :]).abs() <= half
        active.bands[key] = mask
    return mask


def packed_attention(
    active: Active,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None,
    dropout: float,
    half_window: int | None,
) -> torch.Tensor:
    """Bidirectional attention of packed ``[N, H, D]`` q against ``[N, Hkv, D]`` k/v within each
    sequence of ``active.packing``; ``half_window``: keys at most that far from the query (on the
    packed row, which equals the original positions when no sequence has holes). Returns ``[N, H, D]``."""
    packing = active.packing
    heads, dim = q.shape[1], q.shape[2]
    if half_window is not None and packing.max_len > half_window + 1:
        out = q.new_zeros(q.shape[0], heads, dim)
        for start, end in packing.bounds:
            n = end - start
            qs, ks, vs = (z[start:end].transpose(0, 1).unsqueeze(0) for z in (q, k, v))
            mask = _band(active, n, half_window, q.device) if n > half_window + 1 else None
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=ks.shape[1] != heads
            )
            out[start:end].copy_(o[0].transpose(0, 1))
        return out
    backend = _kernel(packing.kernels, q, False, dropout)
    if backend is not None:
        cu = packing.cu_seqlens
        try:
            kv_heads = k.shape[1]
            kk, vv = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v)) if kv_heads != heads else (k, v)
            result: torch.Tensor = backend.varlen(
                q.contiguous(),
                kk.contiguous(),
                vv.contiguous(),
                cu_seqlens_q=cu,
                cu_seqlens_k=cu,
                max_seqlen_q=packing.max_len,
                max_seqlen_k=packing.max_len,
                scale=scale if scale is not None else dim**-0.5,
                causal=False,
                dropout=dropout,
            )
            return result
        except (RuntimeError, TypeError, ValueError) as exc:
            _warn_once(backend, exc)
    return grouped_sdpa(q, k, v, packing.groups(False), scale=scale, dropout=dropout)


def attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Attention-interface entry: packed per-sequence attention inside a packed call of the module's
    config, the previous implementation otherwise. q/k/v arrive ``[1, H, N, D]``; returns ``[1, N, H, D]``."""
    active = ACTIVE.get()
    causal = kwargs.get("is_causal")
    if (
        active is None
        or getattr(module, "config", None) is not active.config
        or query.shape[0] != 1
        or query.shape[2] != active.tokens
        or bool(getattr(module, "is_causal", False) if causal is None else causal)
    ):
        return _previous(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("output_attentions"):
        raise UnsupportedError("the packed encoder computes no attention weights: reverse the patch for them")
    window = kwargs.get("sliding_window")
    half = None if not window else int(window) - 1  # transformers passes (half window + 1), as for FA2
    q, k, v = (z[0].transpose(0, 1) for z in (query, key, value))  # [N, H, D] views, no copies
    out = packed_attention(active, q, k, v, scale=scaling, dropout=dropout, half_window=half)
    return out.unsqueeze(0), None
