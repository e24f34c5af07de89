"""The flash2 patcher for every other decoder that calls attention through transformers' interface.

Most causal LMs in transformers (Qwen, Gemma, Phi, OLMo, Granite, GPT-NeoX, ...) compute their
projections, norms and rotary embeddings themselves and hand q/k/v to
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, passing the extras they need as
keywords. What differs between architectures is therefore *declared* by those keywords, read
once per class from the attention forward's source:

- ``scaling``, ``dropout``, ``is_causal``, ``sliding_window``, ``position_ids``, the varlen
  ``cu_seq_lens_*`` / ``max_length_*`` and ``output_attentions`` are what the varlen kernels
  implement exactly; ``softcap`` (Gemma 2/3 logit soft-capping) needs a kernel declaring the
  ``softcap`` feature (reference, flash_attn; not torch's varlen_attn);
- anything else changes the math in a way the kernels do not implement: ``s_aux`` / ``sinks``
  (attention sinks), ``position_bias`` (T5-style relative bias), ``indices`` / ``block_indices``
  (sparse attention): refused with the reason.

Only causal self-attention of decoder-only models is taken. Padding-free execution needs the base
model, its decoder layers and the attention forward to pass ``**kwargs`` down (the varlen
boundaries travel there); otherwise the model runs padded, each layer unpadding for the kernel.
Llama / Mistral keep their own patcher (higher priority), Falcon its own.
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

from torch import nn

from patchkit import Patcher, UnsupportedError
from patchkit.paths import OPTION as PATH_OPTION
from patchkit.toolkit import dispatch_keywords

from . import dispatch
from .common import check_output_attentions, pick_backend, route_through_patchkit

EXACT_KEYWORDS = frozenset(
    {
        "scaling",
        "dropout",
        "is_causal",
        "attention_mask",
        "sliding_window",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "output_attentions",
        "deterministic",
        "query",
        "key",
        "value",
        "softcap",  # Gemma 2/3 logit soft-capping: kernels declaring the "softcap" feature
    }
)
# Architectures whose attention dispatches through the interface but whose math the kernels do not
# reproduce: declared, found by the support matrix (tools/support_matrix.py), refused with the reason.
DECLINED = {
    "DiffLlamaAttention": "differential attention (two attention maps subtracted) reshapes values for the kernel",
    "JetMoeAttention": "mixture-of-attention-heads experts route each token's heads",
    "PhimoeAttention": "its eager path ignores config.sliding_window, which the kernels would apply",
}
# Modules with a patcher of their own in this plugin, never taken here even when they dispatch through the
# interface: that patcher's refusal must stand (Falcon >= 5.25 dispatches, but folds ALiBi into the mask).
OWN_PATCHER = frozenset({"transformers.models.falcon.modeling_falcon"})
# Layer types that are attention: anything else in config.layer_types (linear attention, Mamba,
# convolutions) keeps per-sequence state the packed call would mix.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention", "chunked_attention"})
_WHY = {
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "a relative position bias added to the scores",
    "indices": "sparse attention indices",
    "block_indices": "block-sparse attention",
}


def attention_keywords(cls: Any) -> frozenset[str] | None:
    """Keywords ``cls.forward`` passes to transformers' attention interface, or ``None`` when it does
    not dispatch through ``ALL_ATTENTION_FUNCTIONS``."""
    forward = getattr(cls, "forward", None)
    if forward is None:
        return None
    return dispatch_keywords(forward, "ALL_ATTENTION_FUNCTIONS", "attention_interface")


def match(module: nn.Module, path: str, root: nn.Module) -> bool:
    """Causal self-attention modules of decoder-only transformers models that dispatch through the
    attention interface (encoders and cross-attention are not candidates: sdpa is the encoder path)."""
    if "transformers" not in sys.modules or not hasattr(module, "config"):
        return False
    cls = type(module)
    if not cls.__module__.startswith("transformers.models.") or cls.__module__ in OWN_PATCHER:
        return False
    if getattr(module, "is_causal", None) is not True or getattr(module.config, "is_encoder_decoder", False):
        return False
    return attention_keywords(cls) is not None


def _base(root: nn.Module, module: nn.Module) -> nn.Module:
    """The deepest ``PreTrainedModel`` under ``root`` holding ``module`` (e.g. ``Qwen2Model``)."""
    from transformers import PreTrainedModel

    found: nn.Module | None = None
    for candidate in root.modules():
        if isinstance(candidate, PreTrainedModel) and candidate is not module:
            if any(m is module for m in candidate.modules()):
                found = candidate  # modules() is pre-order: a later hit is deeper
    if found is None:
        raise UnsupportedError(
            "flash2 patches attention through the model's config and base model: apply it to the whole "
            "transformers model, not to a lone layer"
        )
    return found


def _refusal(module: Any, root: nn.Module) -> str | None:
    declined = DECLINED.get(type(module).__name__)
    if declined is not None:
        return f"{type(module).__name__}: {declined}"
    other = sorted(set(getattr(module.config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES)
    if other:
        return f"hybrid model: layers of type {', '.join(other)} are not attention and keep their own state"
    root_config = getattr(root, "config", None)
    if root_config is not None and any(hasattr(root_config, k) for k in ("vision_config", "audio_config")):
        return "multimodal model: apply flash2 to its language model (e.g. model.language_model)"
    keywords = attention_keywords(type(module)) or frozenset()
    odd = sorted(keywords - EXACT_KEYWORDS)
    if odd:
        what = ", ".join(_WHY.get(k, k) for k in odd)
        return f"{type(module).__name__} passes {what} to the attention kernel; the varlen kernels do not implement it"
    return None


def _needs(module: Any) -> set[str]:
    needs: set[str] = set()
    keywords = attention_keywords(type(module)) or frozenset()
    window = getattr(module, "sliding_window", None) or getattr(module.config, "sliding_window", None)
    if "sliding_window" in keywords and window:
        needs.add("window")
    if "softcap" in keywords and getattr(module.config, "attn_logit_softcapping", None):
        needs.add("softcap")
    if module.training and getattr(module, "attention_dropout", 0.0):
        needs.add("dropout")
    return needs


def check(module: Any, ctx: Any) -> str | None:
    """Refuse (UnsupportedError, with the reason) what the varlen kernels cannot run exactly."""
    reason = _refusal(module, ctx.root)
    if reason is not None:
        raise UnsupportedError(reason)
    _base(ctx.root, module)
    check_output_attentions(module.config)
    if module.config._attn_implementation == dispatch.KEY and dispatch.STATE_ATTR in module.__dict__:
        raise UnsupportedError("this attention module is already patched by flash2: reverse first")
    pick_backend(module, ctx, _needs(module))
    return None


def build(module: Any, ctx: Any) -> None:
    """Store the kernel on the module instance (journaled); the module object stays in place."""
    backend = pick_backend(module, ctx, _needs(module))
    ctx.set_attr(module, dispatch.STATE_ATTR, dispatch.Flash2State(backend=backend))
    ctx.note(f"kernel: {backend.name}")
    return None


def padding_free_problem(base: nn.Module, attention: nn.Module) -> str | None:
    """Why a packed (padding-free) call would not be exact for ``base``, or ``None``.

    It is exact when the base model's forward hands ``**kwargs`` to its layers and the layers and
    the attention accept them (the varlen boundaries of the packed call then reach every kernel
    call), and when positions come from ``position_ids``, not from the mask (OPT-style learned
    positions count the mask's ones: packing would renumber them).
    """
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return "the base model's source is not available"
    if not re.search(r"layer\w*\(\s*[^)]*\*\*kwargs", source, re.S):
        return "the base model does not pass **kwargs down to its layers"
    layer = next((m for m in base.modules() if any(c is attention for c in m.children())), None)
    if layer is None:
        return "the attention module's layer was not found"
    attr = next(name for name, child in layer.named_children() if child is attention)
    try:
        layer_source = inspect.getsource(type(layer).forward)
    except (OSError, TypeError):
        return "the decoder layer's source is not available"
    if not re.search(rf"self\.{attr}\(\s*[^)]*\*\*kwargs", layer_source, re.S):
        return f"its decoder layer does not pass **kwargs to {attr}"
    attention_params = inspect.signature(type(attention).forward).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in attention_params):
        return "its attention does not accept **kwargs"
    if "position_ids" not in inspect.signature(type(base).forward).parameters or "cumsum" in source:
        return "positions are derived from the attention mask"
    return None


def setup(root: nn.Module, ctx: Any) -> None:
    """Switch each patched base model's config to ``"patchkit"`` and wrap its forward (journaled)."""
    dispatch.register_keys()
    wanted = bool(ctx.option("padding_free", True))
    bases: dict[int, tuple[nn.Module, nn.Module]] = {}
    for path in ctx.selected:
        attention = root.get_submodule(path)
        base = _base(root, attention)
        bases.setdefault(id(base), (base, attention))
    for base, attention in bases.values():
        why_not = padding_free_problem(base, attention)
        padding_free = wanted and why_not is None
        route_through_patchkit(base, ctx, padding_free, why_not if wanted and why_not else "")


def patcher() -> Patcher:
    """The registered patcher."""
    return Patcher(
        name="flash2-generic",
        kind="attention",
        family="flash2",
        match=match,
        check=check,
        build=build,
        setup=setup,
        priority=10,
        description="FlashAttention-2 varlen kernels for any decoder dispatching through the attention interface",
        covers=("decoder-only causal LMs using ALL_ATTENTION_FUNCTIONS (see docs/support.md)",),
        options={"padding_free": "pack valid tokens across the model (default True)", **PATH_OPTION},
    )
