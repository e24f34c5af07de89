"""MPNet encoders, padding-free (``sdpa-mpnet-encoder``): relative position bias added per sequence.

MPNet's self-attention computes its scores itself (not through transformers' attention interface)
and adds a relative position bias ``[H, T, T]`` that ``MPNetEncoder.compute_position_bias``
builds from bucketed position differences. The patched encoder (a subclass of the user's
``MPNetEncoder`` sharing every module and parameter) packs the valid tokens once, runs every layer
on ``[N, C]`` through the layer's own Linear/LayerNorm/dropout modules, attends within each
sequence with ``scaled_dot_product_attention`` whose additive mask is the encoder's own bias at the
tokens' *original* positions (computed by the encoder's own ``compute_position_bias``; a row with
holes takes the bias rows/columns of its valid positions), and re-pads once. Verified by code
(the compiled forwards equal transformers' MPNet classes) and pinned by a source fingerprint
per release, like the BERT path. Without padding, or for anything it cannot reproduce
exactly (attentions/hidden states requested, hooks inside, a mask that is more than padding), the
original forward runs (a warning for the latter).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from patchkit import PatchContext, UnsupportedError, share_as
from patchkit.toolkit import governed, hooked_modules, require_known

from ._inference import inference_ready, linear
from ._masks import key_padding
from ._packing import Packing, make_packing, pack, unpack
from ._runtime import hooks_reason, mixed_class, refuse_config_outputs, request_problem, warn_fallback
from ._verify import method_differs

_IGNORABLE = frozenset({"output_attentions", "output_hidden_states", "return_dict", "use_cache"})

# 5.17's source text differs from 5.24's; the packed path was checked exact there too (tests on 5.17).
KNOWN_SOURCES = {
    "5.17.0": "47da116c1c47f68a3a36b0f7f8268f7d8107fc5282e657876f22357f36e9d77f",
    "5.24.0": "0d154b17fdce7890a17f6b4c037d101984cbc9c3e26b561ed8e11d9a3cdee2a2",
    "5.25.0": "0d154b17fdce7890a17f6b4c037d101984cbc9c3e26b561ed8e11d9a3cdee2a2",
}


def _reference() -> dict[str, type]:
    mod = importlib.import_module("transformers.models.mpnet.modeling_mpnet")
    return {
        "encoder": mod.MPNetEncoder,
        "layer": mod.MPNetLayer,
        "attention": mod.MPNetAttention,
        "self": mod.MPNetSelfAttention,
        "intermediate": mod.MPNetIntermediate,
        "output": mod.MPNetOutput,
    }


def mirrored(ref: dict[str, Any]) -> list[Any]:
    """The transformers methods whose computation the packed MPNet path re-derives."""
    return [
        ref["encoder"].forward,
        ref["encoder"].compute_position_bias,
        ref["layer"].forward,
        ref["attention"].forward,
        ref["self"].forward,
        ref["intermediate"].forward,
        ref["output"].forward,
    ]


def looks_like_mpnet_encoder(module: nn.Module, path: str = "", root: nn.Module | None = None) -> bool:
    """Cheap structural match: a ``layer`` list of MPNet-shaped layers and a relative attention bias."""
    layers = getattr(module, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not hasattr(module, "relative_attention_bias"):
        return False
    att = getattr(layers[0], "attention", None)
    return att is not None and all(hasattr(getattr(att, "attn", None), n) for n in ("q", "k", "v", "o"))


def check(module: Any, ctx: PatchContext) -> str | None:
    """Leave alone what is not MPNet's code; refuse setups it cannot run exactly."""
    try:
        ref = _reference()
    except (ImportError, AttributeError):
        return "transformers' MPNet classes are not importable"
    if (p := method_differs(module, ref["encoder"], allow_accelerate=True)) is not None:
        return f"not an MPNet encoder: {p}"
    if (p := method_differs(module, ref["encoder"], "compute_position_bias")) is not None:
        return f"not an MPNet encoder: {p}"
    require_known("the sdpa MPNet encoder path", mirrored(ref), KNOWN_SOURCES, ctx)
    for i, layer in enumerate(module.layer):
        parts = {
            "layer": layer,
            "attention": layer.attention,
            "self": layer.attention.attn,
            "intermediate": layer.intermediate,
            "output": layer.output,
        }
        for key, mod in parts.items():
            if (p := method_differs(mod, ref[key])) is not None:
                return f"layer {i} is not verifiably MPNet: {p}"
    config = getattr(module, "config", None)
    refuse_config_outputs(config)
    if hooked := hooked_modules(module, include_global=False):
        raise UnsupportedError(
            f"{hooks_reason(hooked)}; remove the hooks before patching or leave the encoder unpatched (strict=False)"
        )
    return None


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packing: Packing,
    bias: torch.Tensor,
    positions: list[torch.Tensor | None],
    heads: int,
    dim: int,
    dropout_p: float,
) -> torch.Tensor:
    """Per-sequence attention of packed ``[N, H*D]`` q/k/v with the relative bias ``[H, T, T]`` at each
    sequence's original positions (``positions[i]``: ``None`` for a contiguous sequence)."""
    n_all = q.shape[0]
    qv, kv, vv = (z.view(n_all, heads, dim) for z in (q, k, v))
    out = q.new_empty(n_all, heads, dim)
    scale = dim**-0.5
    for (start, end), pos in zip(packing.bounds, positions, strict=True):
        n = end - start
        mask = bias[:, :n, :n] if pos is None else bias[:, pos][:, :, pos]
        qs, ks, vs = (z[start:end].transpose(0, 1).unsqueeze(0) for z in (qv, kv, vv))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask.unsqueeze(0), dropout_p=dropout_p, scale=scale)
        out[start:end].copy_(o[0].transpose(0, 1))
    return out.view(n_all, heads * dim)


def _layer(layer: Any, x: torch.Tensor, packing: Packing, bias: torch.Tensor, positions: list[Any]) -> torch.Tensor:
    """One MPNet layer on packed tokens through its own modules (training, autograd, hooks-free)."""
    att = layer.attention
    sa = att.attn
    heads, dim = sa.num_attention_heads, sa.attention_head_size
    p = sa.dropout.p if sa.training else 0.0
    c = _attend(sa.q(x), sa.k(x), sa.v(x), packing, bias, positions, heads, dim, p)
    h = att.LayerNorm(att.dropout(sa.o(c)) + x)
    return layer.output(layer.intermediate(h), h)


def _layer_inference(
    layer: Any, x: torch.Tensor, packing: Packing, bias: torch.Tensor, positions: list[Any]
) -> torch.Tensor:
    """:func:`_layer` in inference: fused GEMM epilogues (residual, activation), dropout off."""
    att = layer.attention
    sa = att.attn
    inter, out = layer.intermediate, layer.output
    heads, dim = sa.num_attention_heads, sa.attention_head_size
    c = _attend(linear(sa.q, x), linear(sa.k, x), linear(sa.v, x), packing, bias, positions, heads, dim, 0.0)
    h = att.LayerNorm(linear(sa.o, c, residual=x))
    i = linear(inter.dense, h, activation=inter.intermediate_act_fn)
    return out.LayerNorm(linear(out.dense, i, residual=h))


def _inference_ok(layer: Any, x: torch.Tensor) -> bool:
    att = layer.attention
    sa = att.attn
    linears = (sa.q, sa.k, sa.v, sa.o, layer.intermediate.dense, layer.output.dense)
    others = (layer, att, sa, sa.dropout, att.dropout, layer.output.dropout, layer.intermediate)
    return inference_ready(linears, (*others, layer.intermediate.intermediate_act_fn), x)


def _positions(keep: torch.Tensor) -> list[torch.Tensor | None]:
    """Per non-empty row: ``None`` when its valid tokens are contiguous, else their original positions."""
    out: list[torch.Tensor | None] = []
    counts = keep.sum(dim=1).tolist()
    idx = torch.arange(keep.shape[1], device=keep.device)
    first = torch.where(keep, idx, keep.shape[1]).amin(dim=1).tolist()
    last = torch.where(keep, idx, -1).amax(dim=1).tolist()
    for row, n in enumerate(counts):
        if n == 0:
            continue
        out.append(None if last[row] - first[row] + 1 == n else keep[row].nonzero().squeeze(1))
    return out


class PackedMPNetMixin:
    """Mixed in front of the user's ``MPNetEncoder``: padding-free forward, original as fallback."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Any = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> Any:
        def original() -> Any:
            return super(PackedMPNetMixin, self).forward(  # type: ignore[misc]
                hidden_states,
                attention_mask=attention_mask,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                **kwargs,
            )

        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        keep, why = key_padding(attention_mask, batch, length)
        if why is None and (keep is None or bool(keep.all())):
            return original()  # nothing padded: the original path (never slower)
        if why is None:
            extra = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states, **kwargs}
            why = request_problem(extra, _IGNORABLE)
        if why is None and (hooked := hooked_modules(self)):
            why = hooks_reason(hooked)
        if why is not None:
            warn_fallback(why, "MPNetEncoder")
            return original()
        assert keep is not None
        with governed(hidden_states):
            packing = make_packing(keep, batch, length, hidden_states.device)
            bias = self.compute_position_bias(hidden_states[:1])[0]  # type: ignore[attr-defined]
            positions = _positions(keep)
            x = pack(hidden_states, packing)
            for layer in self.layer:  # type: ignore[attr-defined]
                if _inference_ok(layer, x):
                    x = _layer_inference(layer, x, packing, bias, positions)
                else:
                    x = _layer(layer, x, packing, bias, positions)
            out = unpack(x, packing)
        if not return_dict:
            return (out,)
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=out)


def packed_class(cls: type) -> type:
    """The (cached) subclass ``Sdpa<cls>`` of the user's MPNet encoder class."""
    return mixed_class(PackedMPNetMixin, cls, "Sdpa")


def build(module: nn.Module, ctx: PatchContext) -> nn.Module:
    """A ``Sdpa<MPNetEncoder>`` sharing every submodule and parameter of ``module``."""
    ctx.note("padding-free MPNet encoder: packed tokens, per-sequence SDPA with the relative position bias")
    replacement: nn.Module = share_as(module, packed_class(type(module)))
    return replacement
