"""Padding-free encoders whose attention does not go through transformers' interface and whose
position handling lives inside the encoder (``sdpa-split-encoder``): DeBERTa / DeBERTa-v2
(disentangled attention over relative positions), RoFormer (rotary positions computed by the
encoder).

Their score computations (c2p / p2c relative terms, rotary tables) depend only on positions
*within* a sequence, so the replacement (a subclass of the user's encoder class sharing every
module and parameter) runs the encoder's **own** forward on each group of same-length sequences,
cut out of the batch without padding (``[g, n, C]`` with an all-ones mask), and scatters the results
back (zeros at padded positions). Nothing of transformers' code is re-derived; no padded token is
computed. Rows with holes in the mask (relative distances across a hole), a mask that is more than
padding, requested attentions and hooks inside run the original forward (with a warning); without
padding the original forward runs unchanged. Exactness is verified per architecture by
``tools/support_matrix.py``; only the classes in :data:`SPLIT` are taken.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import nn

from patchkit import PatchContext, UnsupportedError, share_as
from patchkit.toolkit import governed, hooked_modules

from ._masks import key_padding
from ._runtime import hooks_reason, mixed_class, request_problem, warn_fallback

# transformers encoder classes (module, class) run per same-length group; verified by the matrix.
SPLIT = {
    ("transformers.models.deberta_v2.modeling_deberta_v2", "DebertaV2Encoder"): "disentangled attention",
    ("transformers.models.deberta.modeling_deberta", "DebertaEncoder"): "disentangled attention",
    ("transformers.models.roformer.modeling_roformer", "RoFormerEncoder"): "rotary positions of the encoder",
}
_IGNORABLE = frozenset({"return_dict", "use_cache", "output_attentions", "output_hidden_states"})


def match(module: nn.Module, path: str = "", root: nn.Module | None = None) -> bool:
    """The encoder classes of :data:`SPLIT` (exactly those classes, not subclasses)."""
    if "transformers" not in sys.modules:
        return False
    cls = type(module)
    return (cls.__module__, cls.__name__) in SPLIT and not getattr(getattr(module, "config", None), "is_decoder", False)


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _signature(cls: Any) -> inspect.Signature:
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    return _SIGNATURES[cls]


def check(module: Any, ctx: PatchContext) -> str | None:
    """Refuse (UnsupportedError) setups the split path cannot run exactly."""
    config = getattr(module, "config", None)
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedError("cross-attention encoders are not supported by the split path")
    if getattr(config, "output_attentions", False):
        raise UnsupportedError("config.output_attentions is set: every call would need the original path")
    params = list(_signature(type(module)).parameters)
    if params[1:3] != ["hidden_states", "attention_mask"]:
        raise UnsupportedError(f"{type(module).__name__}.forward does not take (hidden_states, attention_mask)")
    if hooked := hooked_modules(module, include_global=False):
        raise UnsupportedError(f"{hooks_reason(hooked)}; remove the hooks before patching or leave it unpatched")
    return None


def _unit_mask(mask: torch.Tensor, g: int, n: int) -> torch.Tensor:
    """An all-attend mask of the host's kind for ``g`` sequences of ``n`` tokens."""
    if mask.dim() == 2:
        return mask.new_ones(g, n)
    shape = (g, 1, 1 if mask.shape[2] == 1 else n, n)
    if mask.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=mask.device)
    if mask.is_floating_point():
        return torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.ones(shape, dtype=mask.dtype, device=mask.device)


def _scatter(value: Any, flat: torch.Tensor, batch: int, length: int, into: dict[int, torch.Tensor], key: int) -> None:
    """Write ``value`` ``[g, n, C]`` at flat positions ``flat`` of the ``[B * T, C]`` buffer ``into[key]``."""
    if key not in into:
        into[key] = value.new_zeros(batch * length, value.shape[-1])
    into[key].index_copy_(0, flat, value.reshape(-1, value.shape[-1]))


class SplitEncoderMixin:
    """Mixed in front of the user's encoder class: same-length groups through the original forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        original = type(self).__mro__[2]
        bound = _signature(original).bind(self, *args, **kwargs)
        bound.apply_defaults()
        params = {k: v for k, v in bound.arguments.items() if k != "self"}
        for name, p in _signature(original).parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                params.update(params.pop(name, {}))
        hidden = params.pop("hidden_states")
        mask = params.pop("attention_mask")
        batch, length = hidden.shape[0], hidden.shape[1]
        keep, why = key_padding(mask, batch, length)
        if why is None and (keep is None or bool(keep.all())):
            return super().forward(*args, **kwargs)  # type: ignore[misc]  # nothing padded: the original path
        if why is None:
            rest = {k: v for k, v in params.items() if k not in ("output_hidden_states", "return_dict")}
            why = request_problem(rest, _IGNORABLE)
        if why is None and (hooked := hooked_modules(self)):
            why = hooks_reason(hooked)
        assert why is not None or keep is not None
        if why is None:
            idx = torch.arange(length, device=hidden.device).expand(batch, length)
            first = torch.where(keep, idx, length).amin(dim=1)  # type: ignore[arg-type]
            last = torch.where(keep, idx, -1).amax(dim=1)  # type: ignore[arg-type]
            counts = keep.sum(dim=1)  # type: ignore[union-attr]
            if bool(((last - first + 1 != counts) & (counts > 0)).any()):
                why = "the padding mask has holes (relative positions across a hole)"
        if why is not None:
            warn_fallback(why, original.__name__)
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        lengths, starts = counts.tolist(), first.tolist()
        groups: dict[int, list[int]] = {}
        for row, n in enumerate(lengths):
            if n > 0:
                groups.setdefault(n, []).append(row)
        buffers: dict[int, torch.Tensor] = {}
        template: Any = None
        with governed(hidden):
            for n, rows in groups.items():
                offsets = torch.arange(n, device=hidden.device)
                flat = torch.cat([row * length + starts[row] + offsets for row in rows])
                sub = hidden.reshape(batch * length, -1).index_select(0, flat).view(len(rows), n, -1)
                out = super().forward(sub, _unit_mask(mask, len(rows), n), **params)  # type: ignore[misc]
                template = out
                tensors = _tensors(out)
                for key, value in enumerate(tensors):
                    _scatter(value, flat, batch, length, buffers, key)
        full = [buffers[k].view(batch, length, -1) for k in sorted(buffers)]
        return _rebuild(template, full)


def _tensors(out: Any) -> list[torch.Tensor]:
    """The hidden-state tensors of an encoder output, in a fixed order: last, then each of hidden_states."""
    if isinstance(out, tuple):
        last, rest = out[0], out[1:]
        hidden = rest[0] if rest and isinstance(rest[0], tuple) else None
        if any(x is not None and not isinstance(x, tuple) for x in rest) or len(rest) > 1:
            raise UnsupportedError("the split encoder got outputs other than hidden states")
    else:
        last, hidden = out.last_hidden_state, getattr(out, "hidden_states", None)
        if getattr(out, "attentions", None) is not None:
            raise UnsupportedError("the split encoder got attention weights")
    return [last, *(hidden or ())]


def _rebuild(template: Any, full: list[torch.Tensor]) -> Any:
    last, hidden = full[0], tuple(full[1:])
    if isinstance(template, tuple):
        return (last, hidden) if len(template) > 1 else (last,)
    template.last_hidden_state = last
    if getattr(template, "hidden_states", None) is not None:
        template.hidden_states = hidden
    return template


def split_class(cls: type) -> type:
    """The (cached) subclass ``Split<cls>`` of the user's encoder class."""
    return mixed_class(SplitEncoderMixin, cls, "Split")


def build(module: nn.Module, ctx: PatchContext) -> nn.Module:
    """A ``Split<Encoder>`` sharing every submodule and parameter of ``module``."""
    what = SPLIT[(type(module).__module__, type(module).__name__)]
    ctx.note(f"padding-free {type(module).__name__} ({what}): the original forward per group of same-length sequences")
    replacement: nn.Module = share_as(module, split_class(type(module)))
    return replacement
