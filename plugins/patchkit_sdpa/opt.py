"""OPT decoders: padding-free forward without a cache; SDPA (with the KV cache) otherwise.

The decoder's class is left alone (transformers keys its output-capture registry on the class),
so the patch is two journaled instance attributes: ``decoder.forward`` (the packed path, which
defers to the class's forward whenever a cache, output capture, explicit ``position_ids``,
LayerDrop in training or an unknown argument is involved) and, if the model ran eager attention,
``config._attn_implementation = "sdpa"`` so the cached path (generation) uses SDPA with
transformers' own masks: left and right padding, greedy tokens identical to eager. A plain
Linear output head also gets an instance ``forward`` that skips the all-zero rows the packed path
leaves at padding (``Linear(0) == bias`` exactly; inference only).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from patchkit import PatchContext, UnsupportedError

from ._head import plain_linear_head, skip_zero_rows_forward
from ._inference import inference_ready, linear
from ._packing import Packing, make_packing, pack, run_layers, unpack, varlen_sdpa
from ._runtime import capture_requested, hooks_reason, unexpected_kwargs, warn_fallback
from ._verify import hooked_modules, method_differs

_IGNORABLE = frozenset({"output_attentions", "output_hidden_states", "return_dict", "use_cache"})


def looks_like_opt_decoder(module: nn.Module, path: str = "", root: nn.Module | None = None) -> bool:
    """Cheap structural match: embeddings plus a ``layers`` list of OPT-shaped layers (verified in check)."""
    layers = getattr(module, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    first = layers[0]
    attn = getattr(first, "self_attn", None)
    return (
        hasattr(module, "embed_tokens")
        and hasattr(module, "embed_positions")
        and attn is not None
        and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
        and all(hasattr(first, n) for n in ("fc1", "fc2", "self_attn_layer_norm", "final_layer_norm"))
    )


def _reference() -> dict[str, type]:
    from transformers.models.opt import modeling_opt as mo

    return {
        "decoder": mo.OPTDecoder,
        "layer": mo.OPTDecoderLayer,
        "attention": mo.OPTAttention,
        "positions": mo.OPTLearnedPositionalEmbedding,
    }


def _exempt(decoder: Any) -> tuple[Any, ...]:
    """Modules the packed path calls exactly as the original forward does: their hooks see the same call
    (``embed_tokens(input_ids)``; ``model.enable_input_require_grads()`` hooks it for PEFT training)."""
    return (decoder.embed_tokens,)


def check(module: Any, ctx: PatchContext) -> str | None:
    """Leave alone (str) what is not OPT-structured; raise UnsupportedError for OPT setups it cannot do exactly."""
    try:
        ref = _reference()
    except ImportError:
        return "transformers' OPT reference classes are not importable"
    if (p := method_differs(module, ref["decoder"])) is not None:
        return f"not an OPT-structured decoder: {p}"
    if (p := method_differs(module.embed_positions, ref["positions"])) is not None:
        return f"not OPT positions: {p}"
    for i, layer in enumerate(module.layers):
        for mod, key in ((layer, "layer"), (getattr(layer, "self_attn", None), "attention")):
            if mod is None or (p := method_differs(mod, ref[key])) is not None:
                return f"layer {i} is not verifiably OPT: {p or 'no self_attn'}"
    if hooked := hooked_modules(module, _exempt(module), include_global=False):
        raise UnsupportedError(
            f"{hooks_reason(hooked)}; remove the hooks before patching or leave the decoder unpatched (strict=False)"
        )
    config = module.config
    if getattr(config, "output_attentions", False) or getattr(config, "output_hidden_states", False):
        raise UnsupportedError(
            "config.output_attentions / output_hidden_states is set: SDPA cannot return attention weights; "
            "unset it or leave the model unpatched"
        )
    return None


def _layer_packed(layer: Any, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """One OPT decoder layer on packed tokens ``[N, hidden]``, through the layer's own submodules."""
    attn = layer.self_attn
    pre = layer.do_layer_norm_before
    h = layer.self_attn_layer_norm(x) if pre else x
    q = attn.q_proj(h) * attn.scaling  # OPT scales q before the product, as its own forward does
    k, v = attn.k_proj(h), attn.v_proj(h)
    dropout_p = attn.dropout if attn.training else 0.0
    a = varlen_sdpa(q, k, v, packing, attn.num_heads, attn.head_dim, scale=1.0, causal=True, dropout_p=dropout_p)
    h = x + F.dropout(attn.out_proj(a), p=layer.dropout, training=layer.training)
    if not pre:
        h = layer.self_attn_layer_norm(h)
    f = layer.final_layer_norm(h) if pre else h
    f = layer.fc2(layer.activation_fn(layer.fc1(f)))
    h = h + F.dropout(f, p=layer.dropout, training=layer.training)
    return h if pre else layer.final_layer_norm(h)


def _layer_inference(layer: Any, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """:func:`_layer_packed` for inference: fused GEMM epilogues (residual, activation), dropout is off."""
    attn = layer.self_attn
    pre = layer.do_layer_norm_before
    h = layer.self_attn_layer_norm(x) if pre else x
    q = linear(attn.q_proj, h).mul_(attn.scaling)
    k, v = linear(attn.k_proj, h), linear(attn.v_proj, h)
    a = varlen_sdpa(q, k, v, packing, attn.num_heads, attn.head_dim, scale=1.0, causal=True)
    h = linear(attn.out_proj, a, residual=x)
    if not pre:
        h = layer.self_attn_layer_norm(h)
    f = layer.final_layer_norm(h) if pre else h
    h = linear(layer.fc2, linear(layer.fc1, f, activation=layer.activation_fn), residual=h)
    return h if pre else layer.final_layer_norm(h)


def _inference_ok(layer: Any, x: torch.Tensor) -> bool:
    attn = layer.self_attn
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, layer.fc1, layer.fc2)
    return inference_ready(linears, (layer, attn, layer.activation_fn), x)


def _why_not_packed(
    decoder: Any,
    input_ids: Any,
    attention_mask: Any,
    cache: Any,
    inputs_embeds: Any,
    use_cache: Any,
    position_ids: Any,
    kwargs: dict[str, Any],
) -> str | None:
    if use_cache is None:
        use_cache = decoder.config.use_cache
    if cache is not None or use_cache:
        return ""  # the cached path is the SDPA path itself: no warning
    if position_ids is not None:
        return "explicit position_ids"
    if decoder.training and decoder.layerdrop > 0.0:
        return "LayerDrop while training"
    if capture_requested() or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        return "attentions / hidden states were requested"
    if extra := unexpected_kwargs(kwargs, _IGNORABLE):
        return f"unsupported arguments {extra}"
    if (input_ids is None) == (inputs_embeds is None):
        return ""  # let the original raise its own error
    if hooked := hooked_modules(decoder, _exempt(decoder)):
        return hooks_reason(hooked)
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        return "a non-2D attention mask"
    return None


def packed_forward(
    self: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """The decoder's forward while patched: padding-free when no cache is involved, the original otherwise.

    Outputs at padded positions are zeros (so logits there are the LM head applied to zeros);
    give padded labels ``-100`` as usual.
    """
    why = _why_not_packed(self, input_ids, attention_mask, cache, inputs_embeds, use_cache, position_ids, kwargs)
    if why is not None:
        if why:
            warn_fallback(why, "OPT decoder")
        original = type(self).forward.__get__(self)
        return original(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **({"cache": cache} if cache is not None else {}),  # older releases call it past_key_values
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            position_ids=position_ids,
            **kwargs,
        )
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if inputs_embeds is None:
        input_ids = input_ids.view(-1, input_ids.shape[-1])  # type: ignore[union-attr]
        inputs_embeds = self.embed_tokens(input_ids)
    b, t = inputs_embeds.shape[:2]
    mask = attention_mask if attention_mask is not None else torch.ones(b, t, device=inputs_embeds.device)
    mask = mask.to(inputs_embeds.device)
    if self.project_in is not None:
        inputs_embeds = self.project_in(inputs_embeds)
    hidden = inputs_embeds + self.embed_positions(mask.long(), 0).to(inputs_embeds.device)  # the user's module
    packing = make_packing(mask.bool() if attention_mask is not None else None, b, t, hidden.device)
    x = pack(hidden, packing)
    x = run_layers(
        self.layers, x, packing, packed=_layer_packed, inference=_layer_inference, inference_ok=_inference_ok
    )
    if self.final_layer_norm is not None:
        x = self.final_layer_norm(x)
    if self.project_out is not None:
        x = self.project_out(x)
    # Only last_hidden_state: the cache field was renamed (past_key_values -> cache) in 5.x.
    return BaseModelOutputWithPast(last_hidden_state=unpack(x, packing))


def build(module: Any, ctx: PatchContext) -> None:
    """Journaled instance attributes only: ``module.forward`` and, when eager, the attention implementation."""
    ctx.set_attr(module, "forward", types.MethodType(packed_forward, module))
    ctx.note("padding-free forward without cache; padded outputs are zeros")
    head = plain_linear_head(ctx.root)
    if head is not None and head.in_features == module.config.word_embed_proj_dim:
        # The LM head is the largest GEMM of a forward: skip it on the zero rows left at padding.
        ctx.set_attr(head, "forward", types.MethodType(skip_zero_rows_forward, head))
        ctx.note("output head skips all-zero (padded) rows in inference")
    config = module.config
    if getattr(config, "_attn_implementation", None) in (None, "eager"):
        ctx.set_attr(config, "_attn_implementation", "sdpa")
        ctx.note("config._attn_implementation: eager -> sdpa (cached path and generation)")
    return None
