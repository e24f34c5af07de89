"""The three quantizer patchers: int8 (LLM.int8), fp4 and nf4 (QLoRA's 4-bit types)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from patchkit import PatchContext, Patcher, Requirements, UnsupportedError

from .guard import guard_root
from .options import OPTION_DOCS, read_options
from .quantize import PRECOMPUTED, int8_quantize, linear_weight, make_build, refuse_load
from .reverse import restore
from .runtime import load_bnb, unsupported_tensor
from .saving import save_quantized
from .selection import is_linear, model_facts, skip_reason

_FP16_MAX = 65504.0
_DESCRIPTIONS = {
    "int8": "bitsandbytes Linear8bitLt (LLM.int8 with fp16 outlier decomposition, threshold 6.0)",
    "fp4": "bitsandbytes Linear4bit, FP4 weights with double-quantized block scales",
    "nf4": "bitsandbytes Linear4bit, NF4 (QLoRA) weights with double-quantized block scales",
}


def make_check(family: str) -> Callable[[nn.Module, PatchContext], str | None]:
    """``check`` for ``family``: bitsandbytes present, options valid, weight quantizable, defaults applied."""

    def check(module: nn.Module, ctx: PatchContext) -> str | None:
        bnb = load_bnb()
        opts = read_options(ctx)
        facts = model_facts(ctx)
        reason = skip_reason(bnb, module, ctx.root, ctx.paths or ("",), facts, defaults=opts.skip_defaults)
        if reason is not None:
            return reason
        if "forward" in module.__dict__ or hasattr(module, "_hf_hook"):
            # Checked first: an offloaded layer's weight is on meta, and "load the weights" would mislead.
            raise UnsupportedError(
                "the layer is dispatched or offloaded by accelerate (its forward is wrapped on the instance); "
                "quantize before dispatching the model (dispatch_model / cpu_offload / device_map), or load it "
                "on one device"
            )
        if module.weight.device.type == "meta" and not facts.has_loaded_weights:
            # A model built on the meta device (planning before loading, `patchkit plan`): the plan
            # is what apply would do once loaded; build refuses meta weights before changing anything.
            return None
        weight = module.weight
        assert isinstance(weight, torch.Tensor)  # nn.Linear or Conv1D: a Parameter
        problem = unsupported_tensor(bnb, weight)
        if problem is not None:
            raise UnsupportedError(problem)
        if family == "int8":
            if ctx.checkpoint_source(weight) is not None and weight.numel():
                # Streaming a load (patchkit.from_pretrained): build follows at once, so quantize
                # here and read the range off the row scales (row maxima of the float16 values),
                # saving a pass over the weight. Rounding to float16 is monotonic and 65504 is
                # exact: all scales below it means every |w| is; at it (or NaN), the exact test decides.
                quantized = int8_quantize(bnb, linear_weight(module, weight.detach()))
                if not bool(quantized[1].max() < _FP16_MAX):
                    refuse_beyond_fp16(weight)
                ctx.cache[(PRECOMPUTED, id(weight))] = (weight, quantized)  # build takes it
            else:
                refuse_beyond_fp16(weight)
        return None

    return check


def refuse_beyond_fp16(weight: torch.Tensor) -> None:
    """Raise :class:`UnsupportedError` if a value of ``weight`` exceeds the float16 range (int8 only)."""
    low, high = torch.aminmax(weight.detach())  # one pass, no |w| temporary
    if max(-low.item(), high.item()) > _FP16_MAX:
        # LLM.int8 quantizes through float16: larger weights would become inf.
        raise UnsupportedError("the weight exceeds the float16 range LLM.int8 quantizes through; use nf4 or fp4")


def make_setup(family: str) -> Callable[[nn.Module, PatchContext], None]:
    """``setup``: mark the model the way transformers marks a bitsandbytes model it loaded.

    PEFT reads ``is_loaded_in_8bit`` / ``is_loaded_in_4bit`` to wrap these layers with its
    bitsandbytes-aware LoRA classes (whose merge dequantizes and requantizes); without the flag
    it would add LoRA deltas straight into the packed integer weights. Also guards ``load_state_dict``
    and moves to the meta device (:mod:`patchkit_bnb.guard`). Journaled: reverse removes them.
    """
    flag = "is_loaded_in_8bit" if family == "int8" else "is_loaded_in_4bit"

    def setup(root: nn.Module, ctx: PatchContext) -> None:
        if ctx.selected:
            ctx.set_attr(root, flag, True)
            # load_state_dict into the quantized model is refused before any module loads
            # (recorded first: dropping a hook that was never added is harmless).
            ctx.on_reverse(functools.partial(drop_load_guard, root), "load_state_dict guard removed")
            root._register_load_state_dict_pre_hook(refuse_load)
            # model.to("meta") is refused at the root, before any child moves (journaled instance _apply).
            guard_root(root, ctx.set_attr)

    return setup


def drop_load_guard(root: nn.Module) -> None:
    """Reverse step: remove the root's :func:`refuse_load` pre-hook (if it was added)."""
    hooks = root._load_state_dict_pre_hooks
    for key in [k for k, hook in hooks.items() if getattr(hook, "hook", hook) is refuse_load]:
        del hooks[key]


def make_patchers() -> list[Patcher]:
    """The ``bnb-int8``, ``bnb-fp4`` and ``bnb-nf4`` patchers."""
    return [
        Patcher(
            name=f"bnb-{family}",
            kind="quantize",
            family=family,
            match=is_linear,  # nn.Linear and subclasses (FalconLinear), transformers' Conv1D
            check=make_check(family),
            build=make_build(family),
            restore=restore,
            setup=make_setup(family),
            save=save_quantized,  # the one way to save: patchkit.save_pretrained(model, path, quantized=True)
            # bitsandbytes (and its version) is checked by load_bnb() in check, once per process:
            # Requirements.packages reads package metadata for every candidate layer.
            requires=Requirements(),
            description=_DESCRIPTIONS[family],
            covers=("torch.nn.Linear and subclasses", "transformers' Conv1D (GPT-2 and kin)"),
            options=OPTION_DOCS,
        )
        for family in ("int8", "fp4", "nf4")
    ]
