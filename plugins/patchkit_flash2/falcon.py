"""The flash2 patcher for Falcon.

``FalconDecoderLayer`` picks its attention class at ``__init__`` and Falcon's attention has no
dispatch point, so each ``FalconAttention`` is replaced by an instance of a subclass of its own
class that shares every parameter (``patchkit.share_as``); the subclass's ``forward`` reuses the
module's own ``_split_heads``, rotary function, cache update and ``dense`` projection, and runs the
varlen kernel. The 2D padding mask comes from the ``FalconModel`` forward wrapper; in padded calls
the host still builds its 4D mask (unused). ALiBi (falcon-rw) needs a kernel with the ``alibi`` feature.

Padding-free (plain calls, ``use_cache`` True or False, and ``generate``'s prefill into an empty
cache): ``FalconModel`` passes no per-call kwargs to its layers, so the wrapper (``carrier="context"``)
puts the packed boundaries in the per-call :class:`dispatch.ActiveForward`, where ``_forward`` reads
them and writes the layer's keys/values to the cache in the host's padded layout; for that call the
base's config is a one-call view whose mask function is patchkit's, so the host builds no
``tokens x tokens`` mask for the packed row. Every Falcon variant qualifies (the decoder layer is
per-token apart from attention; ALiBi positions count valid tokens, as packed positions do); a base
with some Falcon attention left unpatched runs padded, with one warning.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
from torch import nn

from patchkit import Patcher, UnsupportedError, share_as
from patchkit.paths import LOG_ATTR, check_choice
from patchkit.paths import OPTION as PATH_OPTION

from . import dispatch, padfree
from .common import check_output_attentions, pick_backend, require_base
from .paths import describe_rule


@functools.cache
def classes() -> tuple[type, type]:
    """``(FalconAttention, FalconModel)``, imported on first use."""
    from transformers.models.falcon.modeling_falcon import FalconAttention, FalconModel

    return FalconAttention, FalconModel


def match(module: nn.Module, path: str, root: nn.Module) -> bool:
    """Falcon attention modules (any subclass), not already ours."""
    if "transformers" not in sys.modules:
        return False
    return isinstance(module, classes()[0]) and not isinstance(module, Flash2Mixin)


class Flash2Mixin:
    """Marker for Falcon attention replaced by flash2."""


@functools.cache
def flash2_class(original: Any) -> Any:
    """The subclass of ``original`` whose forward runs the varlen kernel (one per original class)."""
    return type(f"Flash2{original.__name__}", (Flash2Mixin, original), {"forward": _forward, "__module__": __name__})


def alibi_slopes(module: Any) -> torch.Tensor:
    """Per-head ALiBi slopes in the kernels' convention, from transformers' own ``build_alibi_tensor``.

    Falcon adds ``slope * key_position`` to ``q.k`` before scaling by ``inv_norm_factor``; softmax is
    invariant to per-query constants, so this equals ``-(slope * inv_norm_factor) * (q_pos - k_pos)``.
    """
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), module.num_heads, torch.float32)
    return alibi.view(module.num_heads, 2)[:, 1] * module.inv_norm_factor


def _forward(
    self: Any,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if output_attentions:
        raise UnsupportedError(
            "flash2 attention computes no attention weights: reverse the patch for output_attentions"
        )
    state = self.__dict__[dispatch.STATE_ATTR]
    active = dispatch.ACTIVE.get()
    if active is None:
        raise UnsupportedError("flash2 Falcon attention must be called through its patched FalconModel")
    if active.original is not None:  # the original path: the class's own forward, with the host's mask
        host: Any = classes()[0]
        return host.forward(
            self,
            hidden_states,
            alibi,
            attention_mask,
            position_ids,
            layer_past,
            use_cache,
            output_attentions,
            position_embeddings,
            **kwargs,
        )
    cache = layer_past
    for name in padfree.CACHE_NAMES:
        cache = kwargs.get(name) if cache is None else cache
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    query, key, value = self._split_heads(self.query_key_value(hidden_states))  # [B, T, heads, D]
    batch, q_len = query.shape[:2]
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # [B, heads, T, D]
    if alibi is None:
        cos, sin = position_embeddings  # type: ignore[misc]
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    mask, layout_kwargs = active.mask, {"position_ids": position_ids} if active.mask is None and cache is None else {}
    if active.boundaries is not None:  # padding-free: one packed row, boundaries from the wrapper
        mask, layout_kwargs = None, active.boundaries
        if active.prefill is not None:  # fill the empty KV cache in the host's padded layout
            active.prefill.write(self, key, value)
    dropout = self.attention_dropout.p if (self.training and alibi is not None) else 0.0  # as the host
    out = dispatch.varlen_attention(
        state,
        self,
        query,
        key,
        value,
        mask,
        scaling=self.inv_norm_factor,
        dropout=dropout,
        causal=self.is_causal,
        sliding_window=None,
        use_alibi=alibi is not None,
        kwargs=layout_kwargs,
    )
    out = self.dense(out.reshape(batch, q_len, self.num_heads * self.head_dim))
    return out, None


def _needs(module: Any) -> set[str]:
    needs = {"alibi"} if module.config.alibi else set()
    if module.training and module.config.alibi and module.attention_dropout.p:
        needs.add("dropout")
    return needs


# sha256 of the source of the transformers methods ``_forward`` and the FalconModel wrapper mirror,
# per release checked. Same scheme as patchkit_sdpa/_fingerprint.py, carried as a copy so that this
# plugin keeps loading (and can be disabled) independently of the sdpa plugin.
KNOWN_SOURCES = {
    "5.17.0": "067c9d0d10ca7c2b9135f29daba144fd06c1fbffde276276d4da1ef93a7776b5",
    "5.24.0": "25f2cd7dd94ce56dc1bbe6e554251e628d75cc87450376a1e09989399b4a8e77",
}


def mirrored() -> list[Any]:
    """FalconModel/FalconDecoderLayer/FalconAttention methods whose logic this path re-derives."""
    from transformers.models.falcon import modeling_falcon as mf

    return [
        mf.FalconModel.forward,
        mf.FalconDecoderLayer.forward,
        mf.FalconAttention.forward,
        mf.FalconAttention._split_heads,
    ]


def _require_known_source(ctx: Any) -> None:
    import hashlib
    import inspect
    import os
    import textwrap

    digest = hashlib.sha256()
    for fn in mirrored():
        digest.update(f"{fn.__qualname__}\n{textwrap.dedent(inspect.getsource(fn))}\n".encode())
    trusted = os.environ.get("PATCHKIT_TRUST_TRANSFORMERS", "") not in ("", "0") or ctx.option("trust_transformers")
    if digest.hexdigest() not in KNOWN_SOURCES.values() and not trusted:
        raise UnsupportedError(
            "flash2's Falcon attention re-derives FalconAttention.forward (and FalconModel / FalconDecoderLayer); "
            "their source in the installed transformers differs from the releases checked "
            f"({', '.join(KNOWN_SOURCES)}). "
            "Leave Falcon unpatched (strict=False), or set PATCHKIT_TRUST_TRANSFORMERS=1 / trust_transformers=True"
        )


def check(module: Any, ctx: Any) -> str | None:
    """Refuse (UnsupportedError) a subclass with its own ``forward`` (it would be replaced), an unknown
    transformers source, or no fitting kernel (e.g. ALiBi on the torch kernel)."""
    from transformers.models.falcon.modeling_falcon import FALCON_ATTENTION_CLASSES

    base: Any = classes()[0]
    own = type(module) not in FALCON_ATTENTION_CLASSES.values() and type(module).forward is not base.forward
    if own or "forward" in module.__dict__:
        raise UnsupportedError(
            f"{type(module).__name__} has its own forward, which flash2 would replace with FalconAttention's "
            "logic: leave it unpatched (strict=False) or patch a plain FalconAttention"
        )
    _require_known_source(ctx)
    require_base(ctx.root, module, (classes()[1],))
    check_output_attentions(module.config)
    try:
        pick_backend(module, ctx, _needs(module))
    except UnsupportedError as exc:
        if module.config.alibi:
            raise UnsupportedError(
                f"{exc}. This Falcon model uses ALiBi (falcon-rw style), which needs a kernel with ALiBi slopes: "
                "backend='flash_attn' (pip install 'patchkit[flash]') or backend='reference'"
            ) from exc
        raise
    return None


def build(module: Any, ctx: Any) -> nn.Module:
    """A parameter-sharing instance of the flash2 subclass of ``type(module)``."""
    state = dispatch.Flash2State(
        backend=pick_backend(module, ctx, _needs(module)),
        alibi_slopes=alibi_slopes(module) if module.config.alibi else None,
    )
    ctx.note(f"kernel: {state.backend.name} ({state.backend.plugin})")
    cls: Any = type(module)
    new = share_as(module, flash2_class(cls))
    new.__dict__[dispatch.STATE_ATTR] = state
    return new


def _unpatched(base: nn.Module) -> list[str]:
    """Falcon attention modules of ``base`` left unpatched (``skip=`` / ``only=``)."""
    attention = classes()[0]
    return [n for n, m in base.named_modules() if isinstance(m, attention) and not isinstance(m, Flash2Mixin)]


def setup(root: nn.Module, ctx: Any) -> None:
    """Wrap each FalconModel holding replaced attention (journaled instance ``forward``).

    FalconModel passes no per-call kwargs to its layers, so padding-free calls carry the packed
    boundaries in :class:`dispatch.ActiveForward` (``carrier="context"``) and point the host's mask
    builder at ``"patchkit"`` for the packed call (registered here). A base whose Falcon attention is
    not all patched runs padded: an unpatched layer would need the host's mask for the packed row.
    """
    dispatch.register_keys()
    base_class = classes()[1]
    asked = bool(ctx.option("padding_free", True))
    for base in root.modules():
        if isinstance(base, base_class) and any(isinstance(m, Flash2Mixin) for m in base.modules()):
            left = _unpatched(base)
            off: tuple[str, str] | None = None
            why = ""
            if asked and left:
                why = f"attention of {', '.join(left[:3])}{' ...' if len(left) > 3 else ''} is not patched"
                off = (
                    "unpatched-attention",
                    f"{why} (skip=/only=): it needs the host's mask, so calls run padded (varlen attention "
                    "only, no padding-free speed-up); patch every layer for padding-free",
                )
            on = asked and not left
            wrapper = padfree.make_forward(
                base,
                base.forward,
                padding_free=on,
                pass_kwargs=False,
                carrier="context",
                off_reason=off,
                path=check_choice(ctx.option("path")),
            )
            ctx.set_attr(base, "forward", wrapper)
            ctx.set_attr(base, LOG_ATTR, wrapper.log)
            ctx.note(f"path per call: {describe_rule()}")
            ctx.note(
                f"{type(base).__name__}: attention replaced by flash2 subclasses, "
                f"padding-free {'on' if on else 'off'}" + (f" ({why})" if why else "")
            )


def patcher() -> Patcher:
    """The registered patcher."""
    return Patcher(
        name="flash2-falcon",
        kind="attention",
        family="flash2",
        match=match,
        check=check,
        build=build,
        setup=setup,
        priority=20,
        description="FlashAttention-2 varlen kernels for Falcon (all fused-qkv layouts, rotary and ALiBi)",
        covers=("FalconAttention", "Falcon"),
        options={
            "trust_transformers": "patch a transformers release whose Falcon source is not recorded",
            "padding_free": "pack valid tokens across the model (default True)",
            **PATH_OPTION,
        },
    )
