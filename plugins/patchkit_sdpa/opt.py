"""OPT decoders: padding-free forward and prefill (the KV cache filled in the host's layout); decode
steps through transformers' own SDPA path.

The decoder's class is left alone (transformers keys its output-capture registry on the class),
so the patch is journaled instance attributes: ``decoder.forward`` (the packed path for every call
that does not continue a cache: without a cache, or starting one, where each layer writes its
keys/values through ``cache.update`` in the unpatched padded layout; it defers to the class's
forward for decode steps, and, with one ``PatchkitWarning``, for output capture, hooks inside the
decoder, LayerDrop in training, a 4D mask or an unknown argument) and, if the model ran eager
attention, ``config._attn_implementation = "sdpa"`` so decode steps use SDPA with transformers'
own masks: left and right padding, greedy tokens identical to eager. A plain Linear output head
also gets an instance ``forward`` that skips the all-zero rows the packed path leaves at padding
(``Linear(0) == bias`` exactly; inference only). Both instance forwards are bound methods, so
``copy.deepcopy`` of a patched model binds the copy's to the copy's modules.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from patchkit import PatchContext, UnsupportedError
from patchkit.paths import LOG_ATTR, PathLog, check_choice
from patchkit.toolkit import PaddedBuffers, governed, hooked_modules, require_known

from ._head import plain_linear_head, skip_zero_rows_forward
from ._inference import inference_ready, linear
from ._packing import KERNELS_ATTR, Packing, kernels_of, make_packing, pack, run_layers, unpack, varlen_sdpa
from ._paths import OPTION_ATTR, choose_opt_path, decide, describe_opt_rule, record_original
from ._runtime import hooks_reason, request_problem, warn_fallback
from ._verify import method_differs, unwrap

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


# sha256 of the source of the transformers methods the packed path mirrors (see ``_fingerprint``),
# for every release it was checked on. A release whose source differs is refused until recorded here.
KNOWN_SOURCES = {
    "5.17.0": "ee8c4e66fc43a5f7020c42effaf52b4ac81591ae696165df80daf2ef8294fa1f",
    "5.24.0": "db36edafbc37bc9ca9419679f54a4623cb09fd8a25d059fed98134cd2fcaced2",
    "5.25.0": "db36edafbc37bc9ca9419679f54a4623cb09fd8a25d059fed98134cd2fcaced2",  # same source as 5.24.0
}


def mirrored(ref: dict[str, Any]) -> list[Any]:
    """The transformers methods whose computation the packed decoder re-derives."""
    return [ref["decoder"].forward, ref["layer"].forward, ref["attention"].forward, ref["positions"].forward]


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
    require_known("the sdpa OPT decoder path", mirrored(ref), KNOWN_SOURCES, ctx)
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


class _Prefill:
    """A packed call that starts a KV cache (``generate``'s prefill, a plain call with ``use_cache``).

    Every layer writes its keys/values through ``cache.update`` in the padded ``[B, heads, T, D]``
    layout the unpatched model writes (zeros at padded positions, which every later step masks).
    Rows whose last position is padding (right padding) but which hold tokens get one extra packed
    row, the *tail*: generation predicts the next token from the last position, so its output is
    computed as the unpatched model computes it (that position's query attends to all of the row's
    valid keys). Tails follow the ``packing``'s ``N`` valid tokens in the packed tensor.
    """

    def __init__(self, cache: Any, packing: Packing, keep: torch.Tensor | None) -> None:
        self.cache = cache
        self.packing = packing
        self.tails: list[int] = []  # rows whose last position is padding but which hold tokens
        self.tail_keep: torch.Tensor | None = None  # [1, 1, tails, N]: each tail's row's packed keys
        from transformers.cache_utils import DynamicLayer  # concatenates: its update copies

        self.buffers = PaddedBuffers(packing.index, packing.batch, packing.length, copying=DynamicLayer)
        if keep is not None and packing.index is not None:
            cu = packing.cu_seqlens.tolist()
            last = keep[:, -1].tolist()
            self.tails = [b for b in range(packing.batch) if not last[b] and cu[b + 1] > cu[b]]
            if self.tails:
                start, end = (torch.tensor([cu[b + i] for b in self.tails], device=keep.device) for i in (0, 1))
                j = torch.arange(cu[-1], device=keep.device)
                self.tail_keep = ((j >= start[:, None]) & (j < end[:, None]))[None, None]

    def _write_cache(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, heads: int, dim: int) -> None:
        """``cache.update`` (the host's own dispatch point) with ``[B, heads, T, D]`` keys/values, zeros
        where padded; the buffers are zeroed once per forward where the cache copies them
        (:class:`patchkit.padded.PaddedBuffers`)."""
        pk, pv = (self.buffers.padded(slot, z.view(-1, heads, dim)) for slot, z in enumerate((k, v)))
        self.cache.update(pk.transpose(1, 2), pv.transpose(1, 2), layer_idx)
        self.buffers.updated(self.cache, layer_idx)

    def attend(self, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """Causal attention of the valid tokens, the cache write, and the tails' attention."""
        heads, dim = attn.num_heads, attn.head_dim
        n = q.shape[0] - len(self.tails)
        k, v = k[:n], v[:n]
        out = varlen_sdpa(q[:n], k, v, self.packing, heads, dim, scale=1.0, causal=True, dropout_p=dropout_p)
        self._write_cache(attn.layer_idx, k, v, heads, dim)
        if not self.tails:
            return out
        # All tails in one call, as the query rows of one sequence: each attends to its own row's
        # packed keys (views of k/v, no gather; the mask keeps the row's span), all of them.
        nt = len(self.tails)
        qt = q[n:].view(1, nt, heads, dim).transpose(1, 2)
        kt, vt = (z.view(1, n, heads, dim).transpose(1, 2) for z in (k, v))
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=self.tail_keep, dropout_p=dropout_p, scale=1.0)
        return torch.cat([out, o.transpose(1, 2).reshape(nt, heads * dim)])


def _attend(
    attn: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packing: Packing,
    dropout_p: float,
    prefill: _Prefill | None,
) -> torch.Tensor:
    if prefill is not None:
        return prefill.attend(attn, q, k, v, dropout_p)
    return varlen_sdpa(q, k, v, packing, attn.num_heads, attn.head_dim, scale=1.0, causal=True, dropout_p=dropout_p)


def _layer_packed(layer: Any, x: torch.Tensor, packing: Packing, prefill: _Prefill | None = None) -> torch.Tensor:
    """One OPT decoder layer on packed tokens ``[N, hidden]``, through the layer's own submodules."""
    attn = layer.self_attn
    pre = layer.do_layer_norm_before
    h = layer.self_attn_layer_norm(x) if pre else x
    q = attn.q_proj(h) * attn.scaling  # OPT scales q before the product, as its own forward does
    k, v = attn.k_proj(h), attn.v_proj(h)
    a = _attend(attn, q, k, v, packing, attn.dropout if attn.training else 0.0, prefill)
    h = x + F.dropout(attn.out_proj(a), p=layer.dropout, training=layer.training)
    if not pre:
        h = layer.self_attn_layer_norm(h)
    f = layer.final_layer_norm(h) if pre else h
    f = layer.fc2(layer.activation_fn(layer.fc1(f)))
    h = h + F.dropout(f, p=layer.dropout, training=layer.training)
    return h if pre else layer.final_layer_norm(h)


def _layer_inference(layer: Any, x: torch.Tensor, packing: Packing, prefill: _Prefill | None = None) -> torch.Tensor:
    """:func:`_layer_packed` for inference: fused GEMM epilogues (residual, activation), dropout is off."""
    attn = layer.self_attn
    pre = layer.do_layer_norm_before
    h = layer.self_attn_layer_norm(x) if pre else x
    q = linear(attn.q_proj, h).mul_(attn.scaling)
    k, v = linear(attn.k_proj, h), linear(attn.v_proj, h)
    a = _attend(attn, q, k, v, packing, 0.0, prefill)
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


@functools.cache
def _cache_names(cls: Any) -> tuple[str, str]:
    """``(forward's cache parameter, BaseModelOutputWithPast's cache field)``: ``cache`` in recent
    transformers 5.x, ``past_key_values`` before the rename (5.17)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    params = inspect.signature(unwrap(cls.forward)).parameters
    arg = "cache" if "cache" in params else "past_key_values"
    field = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
    return arg, field


def _checkpointing(decoder: Any) -> bool:
    return bool(getattr(decoder, "gradient_checkpointing", False)) and decoder.training


def _why_not_packed(
    decoder: Any,
    input_ids: Any,
    attention_mask: Any,
    cache: Any,
    inputs_embeds: Any,
    use_cache: bool,
    kwargs: dict[str, Any],
) -> str | None:
    """``None``: the packed path can run this call; ``""``: the original's own path (no warning: a
    decode step, or an error the original reports itself); otherwise why not, for the warning."""
    if cache is not None:
        from transformers.cache_utils import Cache

        if not isinstance(cache, Cache) or int(cache.get_seq_length()) > 0:
            return ""  # a decode step / continuation: transformers' cached SDPA path is the fast path
    if (cache is not None or use_cache) and _checkpointing(decoder):
        return "gradient checkpointing in training with a KV cache (pass use_cache=False for the padding-free path)"
    if decoder.training and decoder.layerdrop > 0.0:
        return "LayerDrop while training"
    if problem := request_problem(kwargs, _IGNORABLE):
        return problem
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
    """The decoder's forward while patched: padding-free unless the call continues a cache.

    Padding-free: calls without a cache, and calls that start one (none passed with ``use_cache``,
    the OPT default, or an empty cache object: ``generate``'s prefill), whose keys/values go into
    the cache through ``cache.update`` in the unpatched model's padded layout. Calls that continue
    a cache (decode steps) run the class's forward with SDPA. Outputs at padded positions are zeros
    (logits there are the LM head applied to zeros; give padded labels ``-100``), except, when a
    cache is started, each row's last position, computed as unpatched (generation reads it).
    Anything else the packed path cannot reproduce exactly runs the original forward with one
    ``patchkit.PatchkitWarning``.
    """
    cls: Any = type(self)
    arg, field = _cache_names(cls)
    legacy = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if cache is None and use_cache and _checkpointing(self) and torch.is_grad_enabled():
        use_cache = False  # as transformers' forward does: caching is off under gradient checkpointing
    why = _why_not_packed(self, input_ids, attention_mask, cache, inputs_embeds, use_cache, kwargs)
    if why is None:
        anchor = input_ids if input_ids is not None else inputs_embeds
        b, t = anchor.shape[0], anchor.shape[1]  # type: ignore[union-attr]
        keep = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        compiling = torch.compiler.is_compiling()
        if decide(self, keep, b, t, anchor.device, choose_opt_path, compiling) == "original":  # type: ignore[union-attr]
            why = ""  # the cost model's choice: no warning
    else:
        record_original(self, why or "continues a KV cache (decode step) or an error the original reports")
    if why is not None:
        if why:
            warn_fallback(why, "OPT decoder")
        original = type(self).forward.__get__(self)
        anchor = input_ids if input_ids is not None else inputs_embeds
        # decode steps too: on a busy CPU they run on the free cores only
        with governed(anchor if isinstance(anchor, torch.Tensor) else None):
            return original(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **({arg: cache} if cache is not None else {}),
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                position_ids=position_ids,
                **kwargs,
            )
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if cache is None and use_cache:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.config)  # what the unpatched forward creates
    if inputs_embeds is None:
        input_ids = input_ids.view(-1, input_ids.shape[-1])  # type: ignore[union-attr]
        inputs_embeds = self.embed_tokens(input_ids)
    b, t = inputs_embeds.shape[:2]
    mask = attention_mask if attention_mask is not None else torch.ones(b, t, device=inputs_embeds.device)
    mask = mask.to(inputs_embeds.device)
    if self.project_in is not None:
        inputs_embeds = self.project_in(inputs_embeds)
    # the user's module; explicit position_ids (generate passes them) only change this embedding
    positions = self.embed_positions(mask.long(), 0, position_ids=position_ids)
    hidden = inputs_embeds + positions.to(inputs_embeds.device)
    keep = mask.bool() if attention_mask is not None else None
    with governed(hidden):  # on a busy CPU: only the free cores
        out = _decode_packed(self, hidden, keep, cache)
    # Only last_hidden_state and the cache: the cache field was renamed (past_key_values -> cache) in 5.x.
    return BaseModelOutputWithPast(last_hidden_state=out, **({field: cache} if cache is not None else {}))


def _decode_packed(decoder: Any, hidden: torch.Tensor, keep: torch.Tensor | None, cache: Any) -> torch.Tensor:
    """The layers and final projections on the valid tokens of ``hidden`` ``[B, T, C]`` (plus each
    right-padded row's last position when a cache is started); ``[B, T, C]``, zeros where padded."""
    b, t = hidden.shape[:2]
    packing = make_packing(keep, b, t, hidden.device, kernels_of(decoder))
    x = pack(hidden, packing)
    prefill = _Prefill(cache, packing, keep) if cache is not None else None
    packed, inference = _layer_packed, _layer_inference
    if prefill is not None:
        packed = functools.partial(_layer_packed, prefill=prefill)
        inference = functools.partial(_layer_inference, prefill=prefill)
        if prefill.tails:
            x = torch.cat([x, hidden[prefill.tails, -1]])
    x = run_layers(decoder.layers, x, packing, packed=packed, inference=inference, inference_ok=_inference_ok)
    if decoder.final_layer_norm is not None:
        x = decoder.final_layer_norm(x)
    if decoder.project_out is not None:
        x = decoder.project_out(x)
    n = x.shape[0] - (len(prefill.tails) if prefill is not None else 0)
    out = unpack(x[:n], packing)
    if prefill is not None and prefill.tails:
        out[prefill.tails, -1] = x[n:]
    return out


def build(module: Any, ctx: PatchContext) -> None:
    """Journaled instance attributes only: ``module.forward`` and, when eager, the attention implementation."""
    ctx.set_attr(module, KERNELS_ATTR, ctx.registry.attention_backends())
    ctx.set_attr(module, "forward", types.MethodType(packed_forward, module))
    ctx.note("padding-free forward and prefill (KV cache filled via cache.update); padded outputs are zeros")
    log = PathLog()
    ctx.set_attr(module, LOG_ATTR, log)
    ctx.set_attr(module, OPTION_ATTR, check_choice(ctx.option("path")))
    ctx.note(f"path per call: {describe_opt_rule()}")
    head = plain_linear_head(ctx.root)
    if head is not None and head.in_features == module.config.word_embed_proj_dim:
        # The LM head is the largest GEMM of a forward: skip it on the zero rows left at padding.
        ctx.set_attr(head, "forward", types.MethodType(skip_zero_rows_forward, head))
        ctx.set_attr(head, LOG_ATTR, log)  # the decoder's: only a packed call leaves zero rows
        ctx.note("output head skips all-zero (padded) rows in inference")
    config = module.config
    if getattr(config, "_attn_implementation", None) in (None, "eager"):
        ctx.set_attr(config, "_attn_implementation", "sdpa")
        ctx.note("config._attn_implementation: eager -> sdpa (cached path and generation)")
    return None
