"""Padding-free execution for any bidirectional encoder whose attention dispatches through
transformers' attention interface (``sdpa-generic-encoder``).

The patched module is the *encoder stack*: the module holding the layer list. Two call shapes:

- **stack** (``forward(hidden_states, attention_mask, ...)``, e.g. ``AlbertTransformer``,
  ``EsmEncoder``, ``LayoutLMEncoder``): the embeddings ran padded outside; the replacement packs the
  hidden states once (``[B, T, C]`` -> ``[1, N, C]``, valid tokens only), calls the original
  forward on them with no mask, and unpacks its output once;
- **base model** (``forward(input_ids, attention_mask, position_ids, ...)``, e.g. ``ModernBertModel``,
  ``GteModel``, ``NomicBertModel``, ``EuroBertModel``, ``JinaEmbeddingsV3Model``): the replacement packs
  ``input_ids`` / ``inputs_embeds`` / ``token_type_ids`` and the *original* position ids of every token
  (``arange(T)`` unless given: exactly what the host uses), so rotary embeddings see each token's own
  position; a pooler is re-run on the unpacked output.

In both, the original layers' own forward runs on the packed row: nothing is copied out of
transformers. Attention reaches the packed kernels through the model's config, switched per
instance (journaled) to :data:`patchkit_sdpa.encoder_dispatch.KEY`; inside the packed call each
sequence attends only to itself (a bidirectional sliding window, as ModernBERT's local layers,
is applied per sequence). Without padding, the call runs the original forward unchanged (never
slower than unpatched). What the packed call cannot reproduce exactly takes the original forward
with one ``PatchkitWarning``: a mask that is not padding, a sliding window over a mask with holes,
requested attentions / hidden states, hooks inside, gradient checkpointing, unknown arguments.

Declared differences are read from the attention forward's source (the keywords it passes to the
interface) and the modules inside the layers: relative position biases, attention sinks, rotary
embeddings computed inside a layer (positions of the packed row), convolutions or other token-mixing
modules are refused with the reason. Exactness is verified per architecture by
``tools/support_matrix.py``.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from typing import Any

import torch
from torch import nn

from patchkit import PatchContext, UnsupportedError
from patchkit.toolkit import dispatch_keywords, governed, hooked_modules

from . import encoder_dispatch as dispatch
from ._packing import KERNELS_ATTR, kernels_of, make_packing, pack, unpack
from ._runtime import hooks_reason, refuse_config_outputs, request_problem, warn_fallback

# Keywords an attention module may pass to the interface: what the packed attention implements.
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
        "query",
        "key",
        "value",
        "head_mask",
        "deterministic",  # a flash-attn flag (ModernBERT): no effect on the packed kernels' math
    }
)
_WHY = {
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "a relative position bias added to the scores",
    "softcap": "logit soft-capping",
    "indices": "sparse attention indices",
}
# Architectures that dispatch through the interface but whose packed run is not exact: found by the
# support matrix, refused with the reason.
DECLINED: dict[str, str] = {}
# kwargs of the patched forward that the packed path may pass through when they are falsy/None.
_IGNORABLE = frozenset({"return_dict", "use_cache", "output_attentions", "output_hidden_states"})
_BASE_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids")


def attention_keywords(cls: Any) -> frozenset[str] | None:
    """Keywords ``cls.forward`` passes to transformers' attention interface, or ``None`` when it does
    not dispatch through ``ALL_ATTENTION_FUNCTIONS``."""
    forward = getattr(cls, "forward", None)
    if forward is None:
        return None
    return dispatch_keywords(forward, "ALL_ATTENTION_FUNCTIONS", "attention_interface")


def _from_transformers(module: Any) -> bool:
    return type(module).__module__.startswith("transformers.models.")


def _attentions(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in module.named_modules()
        if _from_transformers(m) and attention_keywords(type(m)) is not None
    ]


def _layer_list(module: nn.Module) -> nn.ModuleList | None:
    """The child ModuleList holding the layers (a list whose first item holds an attention module)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList) and len(child) > 0 and any(True for _ in _attentions(child[0])):
            return child
    return None


def match(module: nn.Module, path: str = "", root: nn.Module | None = None) -> bool:
    """Encoder stacks of transformers models: a layer list whose attention modules are not causal."""
    if "transformers" not in sys.modules or not _from_transformers(module) or not hasattr(module, "config"):
        return False
    config = module.config
    if getattr(config, "is_decoder", False):
        return False
    layers = _layer_list(module)
    if layers is None:
        return False
    return not any(getattr(m, "is_causal", False) for _, m in _attentions(layers[0]))


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _signature(cls: Any) -> inspect.Signature:
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    return _SIGNATURES[cls]


def mode_of(module: nn.Module) -> tuple[str | None, str]:
    """``("stack" | "base", "")`` or ``(None, why not)`` from the forward's parameters and source."""
    params = [p for p in _signature(type(module)).parameters.values() if p.name != "self"]
    first = params[0].name if params else ""
    names = {p.name for p in params}
    if first in ("hidden_states", "inputs_embeds"):
        if "attention_mask" not in names:
            return None, f"{type(module).__name__}.forward takes no attention_mask"
        return "stack", ""
    if first == "input_ids":
        if "position_ids" not in names or "attention_mask" not in names:
            return None, (
                f"{type(module).__name__}.forward computes positions from the sequence length (no position_ids "
                "argument): a packed row would renumber them"
            )
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            return None, "its source is not available"
        if not re.search(r"position_ids\s*=\s*torch\.arange\(", source) or "cumsum" in source:
            return None, f"{type(module).__name__} derives default positions from the mask or the ids"
        if "token_type_ids" not in names and re.search(r"token_type", source):
            return None, f"{type(module).__name__} builds token types itself"
        return "base", ""
    return None, f"{type(module).__name__}.forward takes {first!r} first (neither hidden states nor input ids)"


_PER_TOKEN = (nn.Linear, nn.Dropout, nn.Identity, nn.LayerNorm, nn.GELU, nn.ReLU, nn.Tanh, nn.SiLU)


def _per_token(module: nn.Module) -> bool:
    """Leaf modules whose forward works on each token alone (norms, linears, activations, dropout)."""
    if isinstance(module, _PER_TOKEN):
        return True
    cls = type(module)
    if cls.__module__ in ("torch.nn.modules.activation", "transformers.activations"):
        return True
    return cls.__name__.endswith(("Norm", "RMSNorm", "Activation", "GELUActivation", "Dropout"))


def _mixing_leaves(module: nn.Module, mode: str) -> list[str]:
    """Leaf modules that may mix tokens or positions (anything not known to be per-token), with their
    paths. A base model's own rotary embedding and its embeddings (fed the packed original position
    ids) are fine; an embedding *inside the layers* (a relative-position table) is not."""
    layers = _layer_list(module)
    inside = {id(m) for m in layers.modules()} if layers is not None else set()
    found = []
    for name, m in module.named_modules():
        if any(True for _ in m.children()):
            continue
        if isinstance(m, nn.Embedding):
            if mode == "base" and id(m) not in inside:
                continue
        elif _per_token(m):
            continue
        if _from_transformers(m) and attention_keywords(type(m)) is not None:
            continue  # an attention module without submodules (fused projections as parameters)
        if mode == "base" and "." not in name and "Rotary" in type(m).__name__:
            continue
        found.append(f"{name} ({type(m).__name__})")
    return found


def _refusal(module: nn.Module) -> str | None:
    mode, why = mode_of(module)
    if mode is None:
        return why
    layers = _layer_list(module)
    assert layers is not None
    attentions = [m for layer in layers for _, m in _attentions(layer)]
    for att in attentions:
        name = type(att).__name__
        if name in DECLINED:
            return f"{name}: {DECLINED[name]}"
        odd = sorted((attention_keywords(type(att)) or frozenset()) - EXACT_KEYWORDS)
        if odd:
            what = ", ".join(_WHY.get(k, k) for k in odd)
            return f"{name} passes {what} to the attention kernel; the packed path does not implement it"
        if getattr(att, "config", None) is not module.config:
            return f"{name} reads another config than the encoder's: its attention could not be routed"
        if getattr(att, "is_cross_attention", False) or getattr(att, "is_causal", False):
            return f"{name} is causal or cross-attention"
    if mixing := _mixing_leaves(module, mode):
        more = f" and {len(mixing) - 3} more" if len(mixing) > 3 else ""
        return (
            f"modules that may mix tokens or positions run inside the layers ({'; '.join(mixing[:3])}{more}): "
            "on a packed row they would see other sequences' tokens or the packed positions"
        )
    return None


def check(module: Any, ctx: PatchContext) -> str | None:
    """Raise UnsupportedError with the reason for what the packed path cannot run exactly."""
    params = [p for p in _signature(type(module)).parameters.values() if p.name != "self"]
    if "attention_mask" not in {p.name for p in params}:
        return f"{type(module).__name__}.forward takes no attention mask (nothing is ever padded)"
    if not params or params[0].name not in ("hidden_states", "inputs_embeds", "input_ids"):
        first = params[0].name if params else "nothing"
        return f"{type(module).__name__}.forward takes {first!r} first: not a text encoder"
    reason = _refusal(module)
    if reason is not None:
        raise UnsupportedError(f"{reason}; leave it unpatched (strict=False)")
    config = module.config
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedError("cross-attention encoders are not supported by the packed path")
    refuse_config_outputs(config)
    if hooked := hooked_modules(module, include_global=False):
        raise UnsupportedError(
            f"{hooks_reason(hooked)}; remove the hooks before patching or leave the encoder unpatched (strict=False)"
        )
    return None


def _windowed(module: Any) -> bool:
    layers = _layer_list(module)
    return layers is not None and any(
        getattr(m, "sliding_window", None) for layer in layers for _, m in _attentions(layer)
    )


def _holes(keep: torch.Tensor) -> bool:
    """A row whose valid tokens are not contiguous (a hole between two valid tokens)."""
    idx = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    first = torch.where(keep, idx, keep.shape[1]).amin(dim=1)
    last = torch.where(keep, idx, -1).amax(dim=1)
    count = keep.sum(dim=1)
    return bool(((last - first + 1 != count) & (count > 0)).any())


def _per_position(value: Any, batch: int, length: int) -> bool:
    """A ``(cos, sin)`` pair of ``[1 or B, T, D]`` tensors: rows per original position, packable."""
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and all(
            isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[1] == length and t.shape[0] in (1, batch)
            for t in value
        )
    )


def _unpack_output(self: Any, out: Any, packing: Any) -> Any:
    """The host's output with ``[1, N, C]`` fields back in ``[B, T, C]`` (zeros at padding)."""
    if isinstance(out, tuple):
        rest = [x for x in out[1:] if x is not None]
        if rest:
            raise UnsupportedError("the packed encoder returned more than its last hidden state")
        return (unpack(out[0][0], packing), *out[1:])
    hidden = unpack(out.last_hidden_state[0], packing)
    out.last_hidden_state = hidden
    for name in list(out.keys()):
        if name == "last_hidden_state":
            continue
        if name == "pooler_output" and getattr(self, "pooler", None) is not None:
            out.pooler_output = self.pooler(hidden)
            continue
        raise UnsupportedError(f"the packed encoder cannot unpack the output field {name!r}")
    return out


def packed_forward(module: Any, mode: str, *args: Any, **kwargs: Any) -> Any:
    """The patched encoder's forward (installed on the instance as a ``functools.partial`` over the
    module, journaled): the packed path, or the class's own forward."""
    return _Call(module, mode).forward(*args, **kwargs)


class _Call:
    """One call of a patched encoder stack: packed forward, the class's own forward as fallback."""

    def __init__(self, module: Any, mode: str) -> None:
        self.module = module
        self._patchkit_mode = mode
        self.config = module.config
        self.training = module.training

    def _patchkit_original(self) -> type:
        return type(self.module)

    def _super_forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    def modules(self) -> Any:
        return self.module.modules()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        original = self._patchkit_original()
        try:
            bound = _signature(original).bind(self.module, *args, **kwargs)
        except TypeError:
            return self._super_forward(*args, **kwargs)
        params: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if name == "self":
                continue
            if _signature(original).parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                params.update(value)
            elif _signature(original).parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    return self._super_forward(*args, **kwargs)
            else:
                params[name] = value
        if self._patchkit_mode == "stack":
            return self._stack_forward(params, args, kwargs)
        return self._base_forward(params, args, kwargs)

    def _fallback(self, why: str | None, args: Any, kwargs: Any) -> Any:
        if why is not None:
            warn_fallback(why, self._patchkit_original().__name__, stacklevel=4)
        return self._super_forward(*args, **kwargs)

    def _common_problem(self, rest: dict[str, Any]) -> str | None:
        if rest.get("cache") is None and rest.get("past_key_values") is None:
            rest = {k: v for k, v in rest.items() if k != "use_cache"}  # no cache to fill: an encoder's default
        if problem := request_problem(rest, _IGNORABLE):
            return problem
        if hooked := hooked_modules(self.module):
            return hooks_reason(hooked)
        if (
            self.training
            and torch.is_grad_enabled()
            and any(getattr(m, "gradient_checkpointing", False) for m in self.modules())
        ):
            return "gradient checkpointing recomputes layers outside the packed call"
        return None

    def _packing(self, keep: torch.Tensor, batch: int, length: int, device: torch.device) -> Any:
        return make_packing(keep, batch, length, device, kernels_of(self.module))

    def _stack_forward(self, params: dict[str, Any], args: Any, kwargs: Any) -> Any:
        from ._masks import key_padding

        name = "hidden_states" if "hidden_states" in params else "inputs_embeds"
        hidden = params.pop(name)
        mask = params.pop("attention_mask", None)
        batch, length = hidden.shape[0], hidden.shape[1]
        keep, why = key_padding(mask, batch, length)
        if why is not None:
            return self._fallback(why, args, kwargs)
        if keep is None or bool(keep.all()):
            return self._fallback(None, args, kwargs)  # nothing padded: the original path
        rest = {k: v for k, v in params.items() if k != "position_embeddings"}
        if (why := self._common_problem(rest)) is not None:
            return self._fallback(why, args, kwargs)
        if _windowed(self.module) and _holes(keep):
            return self._fallback("a sliding window over a padding mask with holes", args, kwargs)
        rotary = params.get("position_embeddings")
        if rotary is not None and not _per_position(rotary, batch, length):
            return self._fallback("position_embeddings of an unknown layout were passed", args, kwargs)
        with governed(hidden):
            packing = self._packing(keep, batch, length, hidden.device)
            x = pack(hidden, packing).unsqueeze(0)
            if rotary is not None:  # (cos, sin) per original position: the packed tokens' own rows
                params["position_embeddings"] = tuple(
                    pack(t.expand(batch, length, t.shape[-1]), packing).unsqueeze(0) for t in rotary
                )
            token = dispatch.ACTIVE.set(dispatch.Active(self.config, packing, x.shape[1]))
            try:
                out = self._super_forward(**{name: x}, attention_mask=None, **params)
            finally:
                dispatch.ACTIVE.reset(token)
            return _unpack_output(self.module, out, packing)

    def _base_forward(self, params: dict[str, Any], args: Any, kwargs: Any) -> Any:
        inputs = {name: params.pop(name, None) for name in _BASE_INPUTS}
        ids, embeds, mask = inputs["input_ids"], inputs["inputs_embeds"], inputs["attention_mask"]
        source = ids if ids is not None else embeds
        if source is None or mask is None:
            return self._fallback(None, args, kwargs)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != tuple(source.shape[:2]):
            return self._fallback("the attention mask is not a 2D padding mask", args, kwargs)
        keep = mask.bool()
        if bool(keep.all()):
            return self._fallback(None, args, kwargs)  # nothing padded: the original path
        if (why := self._common_problem(params)) is not None:
            return self._fallback(why, args, kwargs)
        if _windowed(self.module) and _holes(keep):
            return self._fallback("a sliding window over a padding mask with holes", args, kwargs)
        batch, length = source.shape[0], source.shape[1]
        with governed(source if embeds is None else embeds):
            packing = self._packing(keep, batch, length, source.device)
            index = packing.index
            assert index is not None

            def flat(x: torch.Tensor) -> torch.Tensor:
                return x.expand(batch, length).reshape(-1).index_select(0, index).unsqueeze(0)

            positions = inputs["position_ids"]
            if positions is None:
                positions = torch.arange(length, device=source.device)
            packed: dict[str, Any] = {
                "input_ids": flat(ids) if ids is not None else None,
                "inputs_embeds": pack(embeds, packing).unsqueeze(0) if embeds is not None else None,
                "position_ids": flat(positions),
                "attention_mask": None,
            }
            if inputs["token_type_ids"] is not None:
                packed["token_type_ids"] = flat(inputs["token_type_ids"])
            token = dispatch.ACTIVE.set(dispatch.Active(self.config, packing, int(index.shape[0])))
            try:
                out = self._super_forward(**packed, **params)
            finally:
                dispatch.ACTIVE.reset(token)
            return _unpack_output(self.module, out, packing)


def build(module: nn.Module, ctx: PatchContext) -> None:
    """Install the packed forward on ``module`` itself (journaled: the object, its class and its
    parameters stay as they are, so a patched model root works too) and switch the config's
    attention field to the packed dispatch (journaled)."""
    mode, _ = mode_of(module)
    assert mode is not None  # check() passed
    dispatch.register_keys()
    previous = dispatch.switch_config(module.config, ctx)
    ctx.note(
        f"padding-free encoder ({mode} mode): packed tokens, the layers' own forward, attention via "
        f"{dispatch.KEY!r} (was {previous!r}); padded outputs are zeros"
    )
    ctx.set_attr(module, KERNELS_ATTR, ctx.registry.attention_backends())
    ctx.set_attr(module, "forward", functools.partial(packed_forward, module, mode))
    return None
