"""The flash2 patcher for Falcon.

Two source layouts, told apart by what ``modeling_falcon`` defines (:func:`dispatching`):

- transformers >= 5.25: ``FalconAttention`` hands q/k/v to ``ALL_ATTENTION_FUNCTIONS`` like Llama.
  Nothing is replaced: each attention module gets its kernel as a journaled instance attribute,
  the config is routed through ``"patchkit"`` (as for Llama), and the ``FalconModel`` forward
  wrapper carries the packed boundaries in the per-call context (``FalconModel`` still passes no
  kwargs to its layers). ALiBi (falcon-rw) is refused there: 5.25 folds the bias into the dense
  4D mask it builds for the attention interface, which the varlen kernels do not read.
- transformers <= 5.24 (checked on 5.17 and 5.24): described below.

Up to 5.24, ``FalconDecoderLayer`` picks its attention class at ``__init__`` and Falcon's attention has no
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
import inspect
import sys
from typing import Any

import torch
from torch import nn

from patchkit import Patcher, UnsupportedError, share_as
from patchkit.paths import LOG_ATTR, check_choice
from patchkit.paths import OPTION as PATH_OPTION
from patchkit.toolkit import require_known

from . import dispatch, padfree
from .common import check_output_attentions, pick_backend, require_base, route_through_patchkit
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
def legacy() -> bool:
    """True for the per-class layout of transformers <= 5.24 (``FALCON_ATTENTION_CLASSES``,
    ``FalconAttention._split_heads``), which the replacement subclass's forward relies on."""
    from transformers.models.falcon import modeling_falcon as mf

    return hasattr(mf, "FALCON_ATTENTION_CLASSES") and hasattr(mf.FalconAttention, "_split_heads")


@functools.cache
def dispatching() -> bool:
    """True when ``FalconAttention`` dispatches through ``ALL_ATTENTION_FUNCTIONS`` (transformers >= 5.25:
    no ``FALCON_ATTENTION_CLASSES``, no ``_split_heads``); False for the per-class layout of <= 5.24."""
    from transformers.models.falcon import modeling_falcon as mf

    if legacy():
        return False
    try:
        source = inspect.getsource(mf.FalconAttention.forward)
    except (OSError, TypeError):
        source = ""
    return "ALL_ATTENTION_FUNCTIONS" in source and "attention_interface(" in source


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
    if dispatching():  # the host passes its dropout (a float there) to the kernel when training
        return {"dropout"} if module.training and float(module.attention_dropout or 0.0) else set()
    needs = {"alibi"} if module.config.alibi else set()
    if module.training and module.config.alibi and module.attention_dropout.p:
        needs.add("dropout")
    return needs


# sha256 of the source of the transformers methods this patcher relies on (:func:`mirrored`), per
# release checked: up to 5.24 those ``_forward`` and the FalconModel wrapper mirror; from 5.25 the
# dispatch layout (the attention's interface call, the decoder layer passing no kwargs, the model's
# mask and cache handling the context carrier stands in for). Checked by patchkit.toolkit.require_known.
KNOWN_SOURCES = {
    "5.17.0": "067c9d0d10ca7c2b9135f29daba144fd06c1fbffde276276d4da1ef93a7776b5",
    "5.24.0": "25f2cd7dd94ce56dc1bbe6e554251e628d75cc87450376a1e09989399b4a8e77",
    "5.25.0": "00f30c4e7e6b71e14c8c1d713959818698ca0820a739230bb98d96fd35f39acd",
}


def mirrored() -> list[Any]:
    """FalconModel/FalconDecoderLayer/FalconAttention methods whose logic this path relies on."""
    from transformers.models.falcon import modeling_falcon as mf

    methods = [mf.FalconModel.forward, mf.FalconDecoderLayer.forward, mf.FalconAttention.forward]
    split = getattr(mf.FalconAttention, "_split_heads", None)  # gone in 5.25 (split inline)
    return methods + ([split] if split is not None and not dispatching() else [])


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _own_forward(module: Any) -> bool:
    """A subclass of ``FalconAttention`` with its own ``forward`` (transformers' own classes excepted)."""
    from transformers.models.falcon import modeling_falcon as mf

    base: Any = classes()[0]
    known = tuple(getattr(mf, "FALCON_ATTENTION_CLASSES", {}).values()) or (base,)
    return (type(module) not in known and type(module).forward is not base.forward) or "forward" in module.__dict__


def check(module: Any, ctx: Any) -> str | None:
    """Refuse (UnsupportedError) a subclass with its own ``forward`` (it would be replaced), an unknown
    transformers source, ALiBi on transformers >= 5.25, or no fitting kernel (e.g. ALiBi on the torch
    kernel)."""
    if not legacy() and not dispatching():  # neither layout: no trust option can make this exact
        raise UnsupportedError(
            f"flash2 does not know the FalconAttention of transformers {_transformers_version()}: it neither "
            "picks a class from FALCON_ATTENTION_CLASSES (<= 5.24) nor dispatches through ALL_ATTENTION_FUNCTIONS "
            "(5.25). Leave Falcon unpatched (strict=False) or install a checked release "
            f"({', '.join(KNOWN_SOURCES)})"
        )
    if _own_forward(module):
        raise UnsupportedError(
            f"{type(module).__name__} has its own forward, which flash2 would replace with FalconAttention's "
            "logic: leave it unpatched (strict=False) or patch a plain FalconAttention"
        )
    require_known("flash2's Falcon attention", mirrored(), KNOWN_SOURCES, ctx)
    require_base(ctx.root, module, (classes()[1],))
    check_output_attentions(module.config)
    if dispatching():
        if module.config.alibi:
            raise UnsupportedError(
                f"ALiBi Falcon (falcon-rw style) is not supported by flash2 on transformers {_transformers_version()}: "
                "this release folds the ALiBi bias into the dense 4D attention mask it hands to the attention "
                "interface, which the varlen kernels do not read. Leave it unpatched (strict=False; "
                "attn_implementation='sdpa' is exact), or use transformers 5.24 (flash2 patches falcon-rw there)"
            )
        if dispatch.STATE_ATTR in module.__dict__:
            raise UnsupportedError("this attention module is already patched by flash2: reverse first")
        pick_backend(module, ctx, _needs(module))
        return None
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


def build(module: Any, ctx: Any) -> nn.Module | None:
    """A parameter-sharing instance of the flash2 subclass of ``type(module)`` (<= 5.24); from 5.25 the
    kernel stored on the module instance (journaled), the module object staying in place."""
    if dispatching():
        backend = pick_backend(module, ctx, _needs(module))
        ctx.note(f"kernel: {backend.name} ({backend.plugin})")
        ctx.set_attr(module, dispatch.STATE_ATTR, dispatch.Flash2State(backend=backend))
        return None
    state = dispatch.Flash2State(
        backend=pick_backend(module, ctx, _needs(module)),
        alibi_slopes=alibi_slopes(module) if module.config.alibi else None,
    )
    ctx.note(f"kernel: {state.backend.name} ({state.backend.plugin})")
    cls: Any = type(module)
    new = share_as(module, flash2_class(cls))
    new.__dict__[dispatch.STATE_ATTR] = state
    return new


def _patched(module: Any) -> bool:
    return isinstance(module, Flash2Mixin) or dispatch.STATE_ATTR in module.__dict__


def _unpatched(base: nn.Module) -> list[str]:
    """Falcon attention modules of ``base`` left unpatched (``skip=`` / ``only=``)."""
    attention = classes()[0]
    return [n for n, m in base.named_modules() if isinstance(m, attention) and not _patched(m)]


def setup(root: nn.Module, ctx: Any) -> None:
    """Wrap each FalconModel holding replaced attention (journaled instance ``forward``); from 5.25 also
    route its config through ``"patchkit"`` (journaled, as for Llama).

    FalconModel passes no per-call kwargs to its layers, so padding-free calls carry the packed
    boundaries in :class:`dispatch.ActiveForward` (``carrier="context"``) and point the host's mask
    builder at ``"patchkit"`` for the packed call (registered here). A base whose Falcon attention is
    not all patched runs padded: an unpatched layer would need the host's mask for the packed row.
    """
    dispatch.register_keys()
    base_class = classes()[1]
    asked = bool(ctx.option("padding_free", True))
    for base in root.modules():
        if isinstance(base, base_class) and any(_patched(m) for m in base.modules()):
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
            if dispatching():
                route_through_patchkit(base, ctx, on, why, carrier="context", off_reason=off)
                continue
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
