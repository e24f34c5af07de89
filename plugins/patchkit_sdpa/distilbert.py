"""DistilBERT's ``Transformer``, padding-free: unpad after the embeddings, packed blocks, re-pad once.

DistilBERT is not BERT-structured (``Transformer`` / ``TransformerBlock`` / ``DistilBertSelfAttention``
/ ``FFN``: the attention's output projection lives in the attention, no dropout after it, the two
LayerNorms live on the block), so it has its own patcher under the same contract as the BERT
encoder (:mod:`patchkit_sdpa.bert`):

- the code is verified, not the name: the ``forward`` (and ``FFN.ff_chunk``) of the transformer,
  block, attention and FFN classes must compile to transformers' DistilBERT code, and the source
  of those methods must match a release recorded in :data:`KNOWN_SOURCES` (else refused, see
  :mod:`patchkit_sdpa._fingerprint`);
- the replacement is ``Sdpa<Transformer>``, a subclass built with :func:`patchkit.share_as`: the
  same blocks, Linear/LayerNorm modules and parameters (nothing copied, training updates the
  user's tensors);
- its forward reads the key padding from the mask transformers built, packs the valid tokens once,
  runs every block on ``[N, dim]`` (through the block's own modules, or in inference the fused
  GEMMs of :mod:`patchkit_sdpa._inference` on the same weights) with per-sequence SDPA, and re-pads
  once: valid tokens equal eager within float rounding, padded positions are zeros;
- anything it cannot reproduce exactly at call time (a mask that is not pure key padding,
  requested attentions / hidden states, unknown kwargs, a hook on any module inside, a global
  module hook) runs the original forward for that call with one ``patchkit.PatchkitWarning``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from patchkit import PatchContext, UnsupportedError, share_as
from patchkit.paths import LOG_ATTR, PathLog, check_choice
from patchkit.toolkit import governed, hooked_modules, require_known

from ._inference import inference_ready, linear
from ._masks import key_padding
from ._packing import KERNELS_ATTR, Packing, kernels_of, make_packing, pack, run_layers, unpack, varlen_sdpa
from ._paths import OPTION_ATTR, choose_encoder_path, decide, describe_encoder_rule, record_original
from ._runtime import hooks_reason, mixed_class, refuse_config_outputs, request_problem, warn_fallback
from ._verify import method_differs
from .bert import _execution_devices, _no_own_tensors

# kwargs the host may pass to the transformer that the packed path may ignore when they are falsy/None.
_IGNORABLE = frozenset({"position_ids", "output_attentions", "output_hidden_states", "return_dict"})


def looks_like_distilbert_transformer(module: nn.Module, path: str = "", root: nn.Module | None = None) -> bool:
    """Cheap structural match: a ``layer`` ModuleList of DistilBERT-shaped blocks (verified in :func:`check`)."""
    layers = getattr(module, "layer", None)
    return isinstance(layers, nn.ModuleList) and len(layers) > 0 and _block_shaped(layers[0])


def _block_shaped(block: Any) -> bool:
    att, ffn = getattr(block, "attention", None), getattr(block, "ffn", None)
    return (
        all(hasattr(att, n) for n in ("q_lin", "k_lin", "v_lin", "out_lin"))
        and all(hasattr(ffn, n) for n in ("lin1", "lin2"))
        and hasattr(block, "sa_layer_norm")
        and hasattr(block, "output_layer_norm")
    )


def _reference() -> dict[str, type]:
    from transformers.models.distilbert import modeling_distilbert as md

    return {
        "encoder": md.Transformer,
        "layer": md.TransformerBlock,
        "attention": md.DistilBertSelfAttention,
        "ffn": md.FFN,
    }


# sha256 of the source of the transformers methods the packed path mirrors (see ``_fingerprint``),
# for every release it was checked on. A release whose source differs is refused until recorded here.
KNOWN_SOURCES = {
    "5.17.0": "dfee84188d23fe73966d4cba8d2de3b93fa6867f2f9ad69e570f9c1e9fbd877e",
    "5.24.0": "3dc1d5d1c9331355443a791b385c4d4d3607e44e7679f217ebc5d60ff0bbd792",
    "5.25.0": "3dc1d5d1c9331355443a791b385c4d4d3607e44e7679f217ebc5d60ff0bbd792",  # same source as 5.24.0
}


def mirrored(ref: dict[str, Any]) -> list[Any]:
    """The transformers methods whose computation the packed transformer re-derives."""
    return [
        ref["encoder"].forward,
        ref["layer"].forward,
        ref["attention"].forward,
        ref["ffn"].forward,
        ref["ffn"].ff_chunk,
    ]


def _block_problems(block: Any, ref: dict[str, type]) -> list[str]:
    parts = {"layer": block, "attention": block.attention, "ffn": block.ffn}
    problems = [
        p for key, mod in parts.items() if (p := method_differs(mod, ref[key], allow_accelerate=_no_own_tensors(mod)))
    ]
    if (p := method_differs(block.ffn, ref["ffn"], "ff_chunk")) is not None:
        problems.append(p)
    if getattr(block.attention, "is_causal", False):
        problems.append("causal self-attention")
    return problems


def check(module: Any, ctx: PatchContext) -> str | None:
    """Leave alone (str) what is not DistilBERT's code; raise UnsupportedError for setups it cannot do exactly."""
    try:
        ref = _reference()
    except ImportError:
        return "transformers' DistilBERT reference classes are not importable"
    if (p := method_differs(module, ref["encoder"], allow_accelerate=True)) is not None:
        return f"not a DistilBERT transformer: {p}"
    require_known("the sdpa DistilBERT path", mirrored(ref), KNOWN_SOURCES, ctx)
    if len(_execution_devices(module)) > 1:
        raise UnsupportedError(
            "accelerate spreads this transformer over several execution devices; the packed path runs it on one: "
            "dispatch it as one block (device_map) or leave it unpatched (strict=False)"
        )
    config = getattr(module.layer[0].attention, "config", None)
    refuse_config_outputs(config)
    for i, block in enumerate(module.layer):
        if not _block_shaped(block):
            return f"block {i} is not DistilBERT-structured"
        if problems := _block_problems(block, ref):
            if any("differs" in p or "overridden" in p for p in problems):
                return f"block {i} is not verifiably DistilBERT: {'; '.join(problems)}"
            raise UnsupportedError(f"block {i}: {'; '.join(problems)}; leave it unpatched (strict=False)")
    if hooked := hooked_modules(module, include_global=False):
        raise UnsupportedError(
            f"{hooks_reason(hooked)}; remove the hooks before patching or leave the model unpatched (strict=False)"
        )
    return None


def _block_packed(block: Any, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """One ``TransformerBlock`` on packed tokens ``[N, dim]``, through the block's own submodules."""
    sa, ffn = block.attention, block.ffn
    q, k, v = sa.q_lin(x), sa.k_lin(x), sa.v_lin(x)
    dropout_p = sa.dropout.p if sa.training else 0.0
    a = varlen_sdpa(
        q, k, v, packing, sa.n_heads, sa.attention_head_size, scale=sa.scaling, causal=False, dropout_p=dropout_p
    )
    h = block.sa_layer_norm(sa.out_lin(a) + x)
    return block.output_layer_norm(ffn.dropout(ffn.lin2(ffn.activation(ffn.lin1(h)))) + h)


def _block_inference(block: Any, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """:func:`_block_packed` for inference: fused GEMM epilogues (residual, GELU/ReLU), dropout is off."""
    sa, ffn = block.attention, block.ffn
    q, k, v = linear(sa.q_lin, x), linear(sa.k_lin, x), linear(sa.v_lin, x)
    a = varlen_sdpa(q, k, v, packing, sa.n_heads, sa.attention_head_size, scale=sa.scaling, causal=False)
    h = block.sa_layer_norm(linear(sa.out_lin, a, residual=x))
    i = linear(ffn.lin1, h, activation=ffn.activation)
    return block.output_layer_norm(linear(ffn.lin2, i, residual=h))


def _inference_ok(block: Any, x: torch.Tensor) -> bool:
    sa, ffn = block.attention, block.ffn
    linears = (sa.q_lin, sa.k_lin, sa.v_lin, sa.out_lin, ffn.lin1, ffn.lin2)
    others = (block, sa, ffn, sa.dropout, ffn.dropout, ffn.activation)
    return inference_ready(linears, others, x)


def encode_packed(transformer: Any, hidden_states: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Run every block of ``transformer`` on the valid tokens of ``hidden_states`` ``[B, T, C]``.

    Returns ``[B, T, C]`` with zeros at padded positions. Gradient checkpointing set on a block
    (``model.gradient_checkpointing_enable()``) is honoured per block while training.
    """
    b, t, _ = hidden_states.shape
    with governed(hidden_states):  # on a busy CPU: only the free cores
        packing = make_packing(keep, b, t, hidden_states.device, kernels_of(transformer))
        x = pack(hidden_states, packing)
        x = run_layers(
            transformer.layer, x, packing, packed=_block_packed, inference=_block_inference, inference_ok=_inference_ok
        )
        return unpack(x, packing)


class PackedDistilBertMixin:
    """Mixed in front of the user's ``Transformer`` class: padding-free forward, original forward as fallback.

    Hooks: the transformer's own hooks see the call as unpatched (padded outputs are zeros). A hook
    on any module inside it (block, attention, FFN, Linear, LayerNorm, ...; forward, pre, with
    kwargs or backward) or a global module hook sends the call through the original forward, with
    one ``patchkit.PatchkitWarning``: the hook then sees exactly the unpatched calls.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> Any:
        why = request_problem(kwargs, _IGNORABLE)
        if why is None and (hooked := hooked_modules(self)):
            why = hooks_reason(hooked)
        keep = None
        if why is None:
            keep, why = key_padding(attention_mask, hidden_states.shape[0], hidden_states.shape[1])
        if why is None:
            b, t = hidden_states.shape[:2]
            compiling = torch.compiler.is_compiling()
            if decide(self, keep, b, t, hidden_states.device, choose_encoder_path, compiling) == "original":
                why = ""  # the cost model's choice: no warning
        else:
            record_original(self, why)
        if why is not None:
            if why:
                warn_fallback(why, type(self).__mro__[2].__name__)
            # the cost model's choice runs on the free cores of a busy CPU, as the packed path does
            with governed(hidden_states if not why else None):
                return super().forward(hidden_states, attention_mask, **kwargs)  # type: ignore[misc]
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=encode_packed(self, hidden_states, keep))


def packed_class(cls: type) -> type:
    """The (cached) subclass ``Sdpa<cls>`` of the user's transformer class with the packed forward."""
    return mixed_class(PackedDistilBertMixin, cls, "Sdpa")


def build(module: nn.Module, ctx: PatchContext) -> nn.Module:
    """A ``Sdpa<Transformer>`` sharing every submodule and parameter of ``module`` (no copies)."""
    ctx.note("padding-free DistilBERT transformer: packed tokens, per-sequence SDPA; padded outputs are zeros")
    replacement: nn.Module = share_as(module, packed_class(type(module)))
    replacement.__dict__[KERNELS_ATTR] = ctx.registry.attention_backends()  # patchkit's own object
    replacement.__dict__[OPTION_ATTR] = check_choice(ctx.option("path"))
    replacement.__dict__[LOG_ATTR] = PathLog()  # which path each call took (tests, bench/regimes.py)
    ctx.note(f"path per call: {describe_encoder_rule()}")
    return replacement
