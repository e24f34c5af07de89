"""BERT-structured encoders, padding-free: unpad after the embeddings, packed layers, re-pad once.

The user's ``BertEncoder`` (or a RoBERTa/XLM-R/... encoder whose code is verified identical) is
replaced by an instance of a subclass that shares every submodule and parameter. Three layer
structures are known (:data:`VARIANTS`), each verified against its own transformers classes and
pinned by its own source fingerprint: BERT's post-norm layer (BERT, RoBERTa, XLM-R, ELECTRA,
CamemBERT, ...), RoBERTa-PreLayerNorm's pre-norm layer, and XLM-RoBERTa-XL's pre-norm layer (its
encoder adds a final LayerNorm, its output projection has no dropout). Its forward
reads the padding from the mask the host built, packs the valid tokens once, runs every layer on
``[N, hidden]`` through the layer's *own* Linear/LayerNorm/activation/dropout modules with
per-sequence attention, and re-pads once (zeros at padded positions). Anything the packed path
cannot reproduce exactly at call time (a non-padding mask, requested attentions or hidden states,
a KV cache, cross-attention inputs, unknown kwargs) runs the original forward with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from ._runtime import hooks_reason, refuse_config_outputs, request_problem, warn_fallback
from ._verify import method_differs

# kwargs the host passes to the encoder that the packed path may ignore when they are falsy/None.
_IGNORABLE = frozenset({"position_ids", "output_attentions", "output_hidden_states", "return_dict", "use_cache"})


def looks_like_bert_encoder(module: nn.Module, path: str = "", root: nn.Module | None = None) -> bool:
    """Cheap structural match: a ``layer`` ModuleList of BERT-shaped layers (verified in :func:`check`)."""
    layers = getattr(module, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    first = layers[0]
    att = getattr(first, "attention", None)
    return (
        att is not None
        and all(hasattr(getattr(att, "self", None), n) for n in ("query", "key", "value"))
        and hasattr(getattr(att, "output", None), "dense")
        and hasattr(getattr(first, "intermediate", None), "dense")
        and hasattr(getattr(first, "output", None), "dense")
    )


_PARTS = ("Encoder", "Layer", "Attention", "SelfAttention", "SelfOutput", "Intermediate", "Output")
_KEYS = ("encoder", "layer", "attention", "self", "self_output", "intermediate", "output")


def _classes(module: str, prefix: str) -> dict[str, type]:
    import importlib

    mod = importlib.import_module(f"transformers.models.{module}")
    return {key: getattr(mod, prefix + part) for key, part in zip(_KEYS, _PARTS, strict=True)}


def _reference() -> dict[str, type]:
    return _classes("bert.modeling_bert", "Bert")


# sha256 of the source of the transformers methods the packed path mirrors (see ``_fingerprint``),
# for every release it was checked on. A release whose source differs is refused until recorded here.
KNOWN_SOURCES = {
    "5.17.0": "03afdbeb9947d982b75b3daf95be82ec2127382da1da57dd27d2fb8d86744d9d",
    "5.24.0": "d5840468031e44bef6b772b2c8cf6f1e91aba3685609a6ef2c5eb26c277a401b",
    "5.25.0": "d5840468031e44bef6b772b2c8cf6f1e91aba3685609a6ef2c5eb26c277a401b",  # same source as 5.24.0
}


def mirrored(ref: dict[str, Any]) -> list[Any]:
    """The transformers methods whose computation the packed encoder re-derives."""
    return [
        ref["encoder"].forward,
        ref["layer"].forward,
        ref["layer"].feed_forward_chunk,
        ref["attention"].forward,
        ref["self"].forward,
        ref["self_output"].forward,
        ref["intermediate"].forward,
        ref["output"].forward,
    ]


# The same for the pre-norm variants (see VARIANTS).
KNOWN_SOURCES_PRE_LN = {
    "5.17.0": "1795f06ab39beeb222d9c417cb242594f57ba4d603d95fa6c5a862c32d988d1d",
    "5.24.0": "ff9ea569ef326543d2953eb981102820a495f638ac6e68ce8f68f416765520e0",
    "5.25.0": "ff9ea569ef326543d2953eb981102820a495f638ac6e68ce8f68f416765520e0",  # same source as 5.24.0
}
KNOWN_SOURCES_XL = {
    "5.17.0": "f2141134046955e46aa7a7480820c8c01f7344ff167fb3e905fb199d03d4b486",
    "5.24.0": "6833602d19b85f9afb1c3b1f61ab374fc096d302a8f9fd7275306bece1495d08",
    "5.25.0": "6833602d19b85f9afb1c3b1f61ab374fc096d302a8f9fd7275306bece1495d08",  # same source as 5.24.0
}


def _no_own_tensors(module: Any) -> bool:
    return not any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))


def _execution_devices(module: Any) -> set[str]:
    return {str(getattr(m._hf_hook, "execution_device", None)) for m in module.modules() if hasattr(m, "_hf_hook")}


def _layer_problems(layer: Any, ref: dict[str, type]) -> list[str]:
    att = layer.attention
    parts = {
        "layer": layer,
        "attention": att,
        "self": att.self,
        "self_output": att.output,
        "intermediate": layer.intermediate,
        "output": layer.output,
    }
    # accelerate hooks on containers without tensors of their own only align inputs to the execution
    # device; the packed path still calls every Linear/LayerNorm (and their hooks, which load weights).
    problems = [
        p for key, mod in parts.items() if (p := method_differs(mod, ref[key], allow_accelerate=_no_own_tensors(mod)))
    ]
    if (p := method_differs(layer, ref["layer"], "feed_forward_chunk")) is not None:
        problems.append(p)
    if getattr(layer, "is_decoder", False) or getattr(att.self, "is_causal", False):
        problems.append("decoder (causal) self-attention")
    if hasattr(layer, "crossattention") or getattr(att, "is_cross_attention", False):
        problems.append("cross-attention")
    return problems


def _code_differs(problems: list[str]) -> bool:
    return any("differs" in p or "overridden" in p for p in problems)


def _variant_of(module: Any) -> tuple[Variant | None, str]:
    """The :data:`VARIANTS` entry whose encoder and layer code ``module`` runs (its first layer is
    compared; :func:`check` verifies every layer), or ``(None, why not)``. The first variant's
    reason is reported (BERT's), since every BERT-structured encoder is compared with it first."""
    reason = ""
    for variant in VARIANTS:
        try:
            ref = variant.reference()
        except (ImportError, AttributeError):
            reason = reason or f"transformers' {variant.name} reference classes are not importable"
            continue
        if (p := method_differs(module, ref["encoder"], allow_accelerate=True)) is not None:
            reason = reason or f"not a BERT-structured encoder: {p}"
            continue
        first = module.layer[0]
        if not hasattr(first, "attention"):
            return None, "layer 0 is not BERT-structured"
        if _code_differs(problems := _layer_problems(first, ref)):
            reason = reason or f"layer 0 is not verifiably {variant.name}: {'; '.join(problems)}"
            continue
        return variant, ""
    return None, reason


def check(module: Any, ctx: PatchContext) -> str | None:
    """Leave alone (str) what is not BERT-structured (one of :data:`VARIANTS`, verified by code); raise
    UnsupportedError for setups of a verified structure that it cannot run exactly."""
    variant, reason = _variant_of(module)
    if variant is None:
        return reason
    ref = variant.reference()
    require_known(f"the sdpa {variant.name} encoder path", mirrored(ref), known_sources(variant), ctx)
    if len(_execution_devices(module)) > 1:
        raise UnsupportedError(
            "accelerate spreads this encoder over several execution devices; the packed path runs it on one: "
            "dispatch the encoder as one block (device_map) or leave it unpatched (strict=False)"
        )
    config = getattr(module, "config", None)
    pos_type = getattr(config, "position_embedding_type", "absolute")
    if pos_type not in (None, "absolute"):
        raise UnsupportedError(
            f"position_embedding_type={pos_type!r}: relative position scores are not supported by the packed "
            "SDPA path; leave this model unpatched (strict=False) or use absolute positions"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedError(
            "BERT used as a decoder / with cross-attention is not supported by the padding-free encoder path; "
            "leave it unpatched (strict=False)"
        )
    refuse_config_outputs(config)
    for i, layer in enumerate(module.layer):
        if not hasattr(layer, "attention"):
            return f"layer {i} is not BERT-structured"
        if problems := _layer_problems(layer, ref):
            if _code_differs(problems):
                return f"layer {i} is not verifiably {variant.name}: {'; '.join(problems)}"
            raise UnsupportedError(f"layer {i}: {'; '.join(problems)}; leave it unpatched (strict=False)")
    if hooked := hooked_modules(module, include_global=False):
        raise UnsupportedError(
            f"{hooks_reason(hooked)}; remove the hooks before patching or leave the encoder unpatched (strict=False)"
        )
    return None


def _layer_packed(layer: Any, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """One BERT layer on packed tokens ``[N, hidden]``, through the layer's own submodules."""
    att = layer.attention
    sa, so = att.self, att.output
    q, k, v = sa.query(x), sa.key(x), sa.value(x)
    dropout_p = sa.dropout.p if sa.training else 0.0
    a = varlen_sdpa(
        q,
        k,
        v,
        packing,
        sa.num_attention_heads,
        sa.attention_head_size,
        scale=sa.scaling,
        causal=False,
        dropout_p=dropout_p,
    )
    h = so.LayerNorm(so.dropout(so.dense(a)) + x)
    inter, out = layer.intermediate, layer.output
    return out.LayerNorm(out.dropout(out.dense(inter.intermediate_act_fn(inter.dense(h)))) + h)


def _layer_inference(layer: Any, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """:func:`_layer_packed` for inference: fused GEMM epilogues (residual, GELU), dropout is off."""
    att = layer.attention
    sa, so = att.self, att.output
    inter, out = layer.intermediate, layer.output
    q, k, v = linear(sa.query, x), linear(sa.key, x), linear(sa.value, x)
    a = varlen_sdpa(q, k, v, packing, sa.num_attention_heads, sa.attention_head_size, scale=sa.scaling, causal=False)
    h = so.LayerNorm(linear(so.dense, a, residual=x))
    i = linear(inter.dense, h, activation=inter.intermediate_act_fn)
    return out.LayerNorm(linear(out.dense, i, residual=h))


def _inference_ok(layer: Any, x: torch.Tensor) -> bool:
    att = layer.attention
    sa, so = att.self, att.output
    linears = (sa.query, sa.key, sa.value, so.dense, layer.intermediate.dense, layer.output.dense)
    others = (layer, sa.dropout, so.dropout, layer.output.dropout, layer.intermediate.intermediate_act_fn)
    return inference_ready(linears, others, x)


# --- pre-norm layers (RoBERTa-PreLayerNorm, XLM-RoBERTa-XL) -------------------------------------
# RoBERTa-PreLayerNorm: attention.LayerNorm before self-attention, intermediate.LayerNorm before the
# FFN, output dropout. XLM-RoBERTa-XL: attention.self_attn_layer_norm, layer.LayerNorm (in
# feed_forward_chunk), no output dropout, and a final encoder LayerNorm.


def _attn_norm(layer: Any) -> Any:
    att = layer.attention
    return att.LayerNorm if hasattr(att, "LayerNorm") else att.self_attn_layer_norm


def _ffn_norm(layer: Any) -> Any:
    return layer.intermediate.LayerNorm if hasattr(layer.intermediate, "LayerNorm") else layer.LayerNorm


def _pre_ln_packed(layer: Any, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """One pre-norm layer on packed tokens, through the layer's own submodules."""
    att = layer.attention
    sa, so = att.self, att.output
    n = _attn_norm(layer)(x)
    q, k, v = sa.query(n), sa.key(n), sa.value(n)
    dropout_p = sa.dropout.p if sa.training else 0.0
    a = varlen_sdpa(
        q,
        k,
        v,
        packing,
        sa.num_attention_heads,
        sa.attention_head_size,
        scale=sa.scaling,
        dropout_p=dropout_p,
        causal=False,
    )
    h = so.dropout(so.dense(a)) + x
    inter, out = layer.intermediate, layer.output
    y = out.dense(inter.intermediate_act_fn(inter.dense(_ffn_norm(layer)(h))))
    if hasattr(out, "dropout"):
        y = out.dropout(y)
    return y + h


def _pre_ln_inference(layer: Any, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """:func:`_pre_ln_packed` for inference: fused GEMM epilogues (residual, GELU), dropout is off."""
    att = layer.attention
    sa, so = att.self, att.output
    inter, out = layer.intermediate, layer.output
    n = _attn_norm(layer)(x)
    q, k, v = linear(sa.query, n), linear(sa.key, n), linear(sa.value, n)
    a = varlen_sdpa(q, k, v, packing, sa.num_attention_heads, sa.attention_head_size, scale=sa.scaling, causal=False)
    h = linear(so.dense, a, residual=x)
    i = linear(inter.dense, _ffn_norm(layer)(h), activation=inter.intermediate_act_fn)
    return linear(out.dense, i, residual=h)


def _pre_ln_inference_ok(layer: Any, x: torch.Tensor) -> bool:
    att = layer.attention
    sa, so = att.self, att.output
    linears = (sa.query, sa.key, sa.value, so.dense, layer.intermediate.dense, layer.output.dense)
    others = (layer, att, sa.dropout, so.dropout, getattr(layer.output, "dropout", None), layer.intermediate)
    return inference_ready(linears, (*others, layer.intermediate.intermediate_act_fn), x)


@dataclass(frozen=True)
class Variant:
    """One verified layer structure: where its reference classes live, its fingerprint table (a
    module global of this file, looked up at check time), its packed layer functions and the
    encoder's final norm (``None``: the encoder ends with the last layer)."""

    name: str
    module: str
    prefix: str
    known: str
    packed: Any
    inference: Any
    inference_ok: Any
    final_norm: str | None = None

    def reference(self) -> dict[str, type]:
        return _classes(self.module, self.prefix)


VARIANTS = (
    Variant("BERT", "bert.modeling_bert", "Bert", "KNOWN_SOURCES", _layer_packed, _layer_inference, _inference_ok),
    Variant(
        "RoBERTa-PreLayerNorm",
        "roberta_prelayernorm.modeling_roberta_prelayernorm",
        "RobertaPreLayerNorm",
        "KNOWN_SOURCES_PRE_LN",
        _pre_ln_packed,
        _pre_ln_inference,
        _pre_ln_inference_ok,
    ),
    Variant(
        "XLM-RoBERTa-XL",
        "xlm_roberta_xl.modeling_xlm_roberta_xl",
        "XLMRobertaXL",
        "KNOWN_SOURCES_XL",
        _pre_ln_packed,
        _pre_ln_inference,
        _pre_ln_inference_ok,
        final_norm="LayerNorm",
    ),
)


def known_sources(variant: Variant) -> dict[str, str]:
    """The fingerprint table (release -> sha256) of ``variant``."""
    table: dict[str, str] = globals()[variant.known]
    return table


def encode_packed(
    encoder: Any, hidden_states: torch.Tensor, keep: torch.Tensor | None, variant: Variant = VARIANTS[0]
) -> torch.Tensor:
    """Run every layer of ``encoder`` (of structure ``variant``) on the valid tokens of
    ``hidden_states`` ``[B, T, C]``, then the encoder's final norm if the variant has one.

    Returns ``[B, T, C]`` with zeros at padded positions. Gradient checkpointing set on a layer
    (``model.gradient_checkpointing_enable()``) is honoured per layer while training.
    """
    b, t, _ = hidden_states.shape
    with governed(hidden_states):  # on a busy CPU: only the free cores
        packing = make_packing(keep, b, t, hidden_states.device, kernels_of(encoder))
        x = pack(hidden_states, packing)
        x = run_layers(
            encoder.layer,
            x,
            packing,
            packed=variant.packed,
            inference=variant.inference,
            inference_ok=variant.inference_ok,
        )
        if variant.final_norm is not None:
            x = getattr(encoder, variant.final_norm)(x)
        return unpack(x, packing)


class PackedEncoderMixin:
    _patchkit_variant: Variant = VARIANTS[0]

    """Mixed in front of the user's encoder class: padding-free forward, original forward as fallback.

    Hooks: the encoder's own hooks see the call as unpatched (padded outputs are zeros). A hook on
    any module inside it (layer, attention, output, Linear, LayerNorm, ...; forward, pre, with
    kwargs or backward) or a global module hook sends the call through the original forward, with
    one ``patchkit.PatchkitWarning``: the hook then sees exactly the unpatched calls.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Any = None,
        encoder_hidden_states: Any = None,
        encoder_attention_mask: Any = None,
        cache: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        why = None
        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            why = "cross-attention inputs were passed"
        elif cache is not None or use_cache or kwargs.get("past_key_values") is not None:
            why = "a KV cache was requested"
        elif problem := request_problem(kwargs, _IGNORABLE):
            why = problem
        elif hooked := hooked_modules(self):
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
                return super().forward(  # type: ignore[misc]
                    hidden_states,
                    attention_mask=attention_mask,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask,
                    use_cache=use_cache,
                    **({"cache": cache} if cache is not None else {}),  # older releases call it past_key_values
                    **kwargs,
                )
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        out = encode_packed(self, hidden_states, keep, self._patchkit_variant)
        # Only last_hidden_state: the cache field was renamed (past_key_values -> cache) in 5.x.
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


_CLASSES: dict[tuple[type, str], type] = {}


def packed_class(cls: type, variant: Variant = VARIANTS[0]) -> type:
    """The (cached) subclass ``Sdpa<cls>`` of the user's encoder class with the packed forward of
    ``variant``'s layer structure."""
    key = (cls, variant.name)
    if key not in _CLASSES:
        attrs = {"__module__": __name__, "_patchkit_variant": variant}
        _CLASSES[key] = type(f"Sdpa{cls.__name__}", (PackedEncoderMixin, cls), attrs)
    return _CLASSES[key]


def build(module: nn.Module, ctx: PatchContext) -> nn.Module:
    """A ``Sdpa<Encoder>`` sharing every submodule and parameter of ``module`` (no copies)."""
    variant, _ = _variant_of(module)
    assert variant is not None  # check() passed
    ctx.note(f"padding-free {variant.name} encoder: packed tokens, per-sequence SDPA; padded outputs are zeros")
    replacement: nn.Module = share_as(module, packed_class(type(module), variant))
    replacement.__dict__[KERNELS_ATTR] = ctx.registry.attention_backends()  # patchkit's own object
    replacement.__dict__[OPTION_ATTR] = check_choice(ctx.option("path"))
    replacement.__dict__[LOG_ATTR] = PathLog()  # which path each call took (tests, bench/regimes.py)
    ctx.note(f"path per call: {describe_encoder_rule()}")
    return replacement
