"""Building the bitsandbytes replacement of one linear layer (``Patcher.build``)."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from patchkit import PatchContext, PatchedModelError, UnsupportedError
from patchkit.toolkit import share_hooks

from .dequantize import fourbit_weight, int8_weight
from .guard import guard_layer
from .options import Options, read_options
from .record import DTYPE_MARKER, RECORD_ATTR, QuantRecord
from .runtime import load_bnb, unsupported_tensor
from .selection import model_facts, shared_weight

# ctx.cache key: (PRECOMPUTED, id(weight)) -> (weight, (CB, SCB)) quantized by check while streaming a load
PRECOMPUTED = "patchkit_bnb.int8_precomputed"


def linear_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as the [out, in] matrix of a Linear (transformers' Conv1D stores it transposed)."""
    return weight if isinstance(module, nn.Linear) else weight.t()


def int8_quantize(bnb: ModuleType, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8's row-wise quantization of an [out, in] weight: int8 rows (CB) and their scales (SCB)."""
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return cb, scb


def _int8_layer(
    bnb: ModuleType,
    module: nn.Module,
    weight: torch.Tensor,
    opts: Options,
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Any:
    from .int8_cpu import PatchkitLinear8bitLt

    layer = PatchkitLinear8bitLt(
        weight.shape[1],
        weight.shape[0],
        bias=module.bias is not None,
        has_fp16_weights=False,
        threshold=opts.threshold,
        device="meta",
    )
    cb, scb = quantized if quantized is not None else int8_quantize(bnb, weight)
    layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    layer.cpu_dequantize = opts.int8_cpu_kernel == "dequant"
    return layer


def _fourbit_layer(bnb: ModuleType, module: nn.Module, weight: torch.Tensor, opts: Options, quant_type: str) -> Any:
    from .fourbit import PatchkitLinear4bit

    layer = PatchkitLinear4bit(
        weight.shape[1],
        weight.shape[0],
        bias=module.bias is not None,
        compute_dtype=opts.compute_dtype or weight.dtype,
        compress_statistics=opts.compress_statistics,
        quant_type=quant_type,
        quant_storage=opts.quant_storage,
        device="meta",
    )
    qweight, state = bnb.functional.quantize_4bit(
        weight.contiguous(),
        blocksize=opts.blocksize,
        compress_statistics=opts.compress_statistics,
        quant_type=quant_type,
        quant_storage=opts.quant_storage,
    )
    layer.weight = bnb.nn.Params4bit(
        qweight,
        requires_grad=False,
        quant_state=state,
        blocksize=opts.blocksize,
        compress_statistics=opts.compress_statistics,
        quant_type=quant_type,
        quant_storage=opts.quant_storage,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state
    # bitsandbytes' AVX512-BF16 CPU kernel repacks the weight in place on the first inference
    # forward (bf16 block scales, another layout). PEFT's merge and other readers of weight.data
    # then see garbage, so it is opt-in (cpu_packing=True, faster CPU inference). It also needs
    # output rows in blocks of 32 and whole absmax blocks per row, or it fails.
    packable = weight.shape[0] % 32 == 0 and weight.shape[1] % opts.blocksize == 0
    if not (opts.cpu_packing and packable):
        layer.support_avx512bf16_for_cpu = False
    return layer


def make_build(family: str) -> Callable[[nn.Module, PatchContext], nn.Module]:
    """``build`` for ``family`` ("int8", "fp4", "nf4"): quantize on the module's device, record how to undo.

    Non-destructive: the original weight keeps its values until the engine's commit phase (every
    build of the apply succeeded), so a rollback loses nothing. Kept copies are written here.
    """

    def build(module: nn.Module, ctx: PatchContext) -> nn.Module:
        bnb = load_bnb()
        opts = read_options(ctx)
        original = module.weight
        assert isinstance(original, torch.Tensor)
        if original.device.type == "meta":  # only reachable for a model that is entirely on meta
            raise UnsupportedError(unsupported_tensor(bnb, original) or "the weight is on the meta device")
        # transformers' Conv1D (GPT-2 and kin) computes x @ W with W stored [in, out]: the layer is
        # a Linear of W.T, quantized as such; the original [in, out] tensor is what is kept/restored.
        transposed = not isinstance(module, nn.Linear)
        kept_weight = original.detach()
        weight = linear_weight(module, kept_weight)
        pre = ctx.cache.pop((PRECOMPUTED, id(original)), None)  # what check quantized (loading, int8)
        quantized = pre[1] if pre is not None and pre[0] is original else None
        layer: Any
        # Streaming a load (patchkit.from_pretrained): the exact error would cost as much as the
        # quantization itself, so it is not measured there (reported as such).
        loading = ctx.checkpoint_source(original) is not None
        with torch.no_grad():
            if family == "int8":
                layer = _int8_layer(bnb, module, weight, opts, quantized)
                canonical = None
            else:
                layer = _fourbit_layer(bnb, module, weight, opts, family)
                canonical = copy.copy(layer.weight.quant_state)
            error = math.nan if loading else _max_error(bnb, layer, weight, canonical, family)
        if module.bias is not None:
            layer.bias = module.bias  # shared: same Parameter object, as the contract asks
        layer.train(module.training)
        # forward/backward hooks: the same dicts, so a hook added or removed on either while quantized
        # is still added / removed after reverse (not the load hooks: refuse_load is the layer's own)
        share_hooks(module, layer)
        # Follows .half() / .to(dtype) / .to(device) of the model, so reverse restores the weight in
        # the dtype the rest of the model has by then (zero elements, not saved).
        layer.register_buffer(DTYPE_MARKER, torch.empty(0, dtype=original.dtype, device=original.device), False)
        layer._register_load_state_dict_pre_hook(refuse_load)
        guard_layer(layer)  # model.to('meta') is refused before anything moves (see guard.py)
        # A weight another module also uses (tied, with skip_defaults=False) must stay in place.
        free = not shared_weight(ctx.root, module, model_facts(ctx))
        record = QuantRecord(
            family=family,
            source=type(module),
            shape=original.shape,
            dtype=original.dtype,
            param=layer.weight,
            freed=False,
            error=error,
            canonical=canonical,
            transposed=transposed,
        )
        layer.__dict__[RECORD_ATTR] = record
        if free:
            if ctx.keep_original is None:
                ctx.note(f"{family}: reverse dequantizes, {error_text(error)}")
            else:  # patchkit keeps the original itself (and says where in the report)
                ctx.note(f"{family}: dequantized {error_text(error)}")
            # Free the full-precision copy once the whole apply succeeded; the Parameter object
            # stays and is refilled on reverse.
            ctx.on_commit(functools.partial(free_original, original, record))
        else:
            ctx.note(f"{family}: weight shared with another module, kept in place (reverse is exact)")
        return layer

    return build


def _max_error(bnb: ModuleType, layer: Any, weight: torch.Tensor, canonical: Any, family: str) -> float:
    """The exact max abs error reverse will have: it dequantizes from this same state."""
    restored = int8_weight(bnb, layer) if family == "int8" else fourbit_weight(bnb, layer, canonical)
    if weight.dtype != torch.float32:
        restored = restored.to(weight.dtype).float()
        return float(restored.sub_(weight.float()).abs_().amax().item())
    return float(restored.sub_(weight).abs_().amax().item())  # in place: no temporaries


def error_text(error: float) -> str:
    """``max|dW| 0.000123``, or why it is unknown."""
    return "error not measured while loading" if math.isnan(error) else f"max|dW| {error:.3g}"


def free_original(weight: torch.Tensor, record: QuantRecord) -> None:
    """Commit step: drop the original weight's storage (the Parameter object stays)."""
    weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
    record.freed = True


def refuse_load(*args: Any, **kwargs: Any) -> None:
    """load_state_dict pre-hook of a quantized layer (and of the model root, see ``patchers.setup``):
    loading full-precision weights into packed integer storage would silently corrupt them."""
    raise PatchedModelError(
        "load_state_dict into a bitsandbytes-quantized model is refused: the weights would not load into the "
        "packed layers (and reverse would bring back the old ones). Call patchkit.reverse(model), load the "
        "state dict, then apply again"
    )
