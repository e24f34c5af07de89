"""Writing a quantized model as a checkpoint that transformers reloads with its bitsandbytes support.

``patchkit.save_pretrained(model, path, quantized=True)`` calls :func:`save_quantized`. The file
layout is transformers' own: ``config.json`` with a ``quantization_config`` (a
``BitsAndBytesConfig``), ``model.safetensors`` with bitsandbytes' state-dict keys
(``weight``/``SCB``/``weight_format`` for int8, ``weight`` plus ``weight.absmax``, ``weight.quant_map``,
``weight.nested_*`` and ``weight.quant_state.bitsandbytes__<type>`` for 4-bit). Linear layers left in
full precision are listed in ``llm_int8_skip_modules`` by exact name, so transformers converts
exactly the layers patchkit converted.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from patchkit import UnsupportedError

from .dequantize import unpacked_4bit
from .record import QuantRecord, record_of
from .runtime import load_bnb
from .selection import is_conv1d


def _fourbit_entries(bnb: Any, layer: Any, record: QuantRecord, prefix: str) -> dict[str, torch.Tensor]:
    weight = layer.weight
    qweight, live = unpacked_4bit(bnb, weight.data, weight.quant_state)
    # The state as quantized, unless the weight was replaced since (then the live one describes it).
    state = record.canonical if weight is record.param and record.canonical is not None else live
    out = {prefix + "weight": qweight.detach().contiguous()}
    for key, value in state.as_dict(packed=True).items():
        out[prefix + "weight." + key] = value.detach().contiguous()
    if layer.bias is not None:
        out[prefix + "bias"] = layer.bias.detach()
    return out


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``model``: bitsandbytes keys for quantized layers, plain ones elsewhere.

    Never calls ``Linear4bit.state_dict`` (which rewrites a CPU-repacked layer in place). A tensor
    reachable under several names (tied weights) is written once, under its first name.
    """
    bnb = load_bnb()
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        record = record_of(module)
        if record is not None and record.family != "int8":
            out.update(_fourbit_entries(bnb, module, record, prefix))
            continue
        local: dict[str, Any] = {}
        module._save_to_state_dict(local, prefix, False)  # this module's own tensors only
        out.update(local)
    seen: dict[tuple[Any, ...], str] = {}
    unique: dict[str, torch.Tensor] = {}
    for key, tensor in out.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and ident in seen:
            continue
        seen[ident] = key
        unique[key] = tensor.contiguous().cpu()
    return unique


@functools.lru_cache(maxsize=1)
def conv1d_reload_problem() -> str | None:
    """Why the installed transformers could not reload a quantized ``Conv1D`` checkpoint, or ``None``.

    A capability probe, not a version list: transformers' own ``replace_with_bnb_linear`` is run on
    a one-``Conv1D`` model on the meta device (nothing allocated) with ``pre_quantized=True``, as
    its loader does. transformers 5.x converts a ``Conv1D`` there into a bitsandbytes layer of
    ``in_features, out_features = weight.shape`` and loads pre-quantized weights as saved (the
    ``[out, in]`` orientation patchkit quantized, no transpose), which is what this checks.
    """
    try:
        from transformers import BitsAndBytesConfig
        from transformers.integrations import replace_with_bnb_linear
        from transformers.pytorch_utils import Conv1D
    except Exception as exc:
        return f"this transformers has no bitsandbytes integration for Conv1D ({type(exc).__name__}: {exc})"
    bnb = load_bnb()
    with torch.device("meta"):
        probe = nn.Module()
        probe.proj = Conv1D(24, 8)  # nf=24 outputs, nx=8 inputs: weight [8, 24]
    try:
        replace_with_bnb_linear(probe, quantization_config=BitsAndBytesConfig(load_in_4bit=True), pre_quantized=True)
    except Exception as exc:
        return f"transformers' replace_with_bnb_linear failed on a Conv1D ({type(exc).__name__}: {exc})"
    layer = probe.proj
    if not isinstance(layer, bnb.nn.Linear4bit) or (layer.in_features, layer.out_features) != (8, 24):
        return "this transformers version does not convert Conv1D layers to bitsandbytes layers when loading"
    return None


def bnb_config(model: nn.Module) -> Any:
    """The ``BitsAndBytesConfig`` describing what patchkit quantized in ``model``.

    Raises :class:`UnsupportedError` when transformers could not rebuild it: no quantized layer,
    mixed families, or a quantized layer transformers would not convert on load. transformers
    converts only exact ``nn.Linear`` (not e.g. Falcon's ``FalconLinear``) and its ``Conv1D``
    (GPT-2 and kin; checked by :func:`conv1d_reload_problem` on the installed version).
    """
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.quantizers_utils import should_convert_module

    records = {name: r for name, m in model.named_modules() if (r := record_of(m)) is not None}
    if not records:
        raise UnsupportedError("the model has no layer quantized by patchkit; apply(model, quantize=...) first")
    families = {r.family for r in records.values()}
    if len(families) > 1:
        raise UnsupportedError(
            f"layers are quantized with several families {sorted(families)}; one checkpoint holds one"
        )
    family = families.pop()
    convs = sorted(n for n, r in records.items() if r.transposed)
    problem = conv1d_reload_problem() if convs else None
    if problem is not None:
        raise UnsupportedError(
            f"the installed transformers could not reload the quantized Conv1D layers {convs[:3]}"
            f"{' ...' if len(convs) > 3 else ''}: {problem}. Apply with skip=[...] naming them to save, upgrade "
            "transformers (5.x reloads them), or reverse and save the full-precision model"
        )
    odd = sorted(n for n, r in records.items() if r.source is not nn.Linear and not r.transposed)
    if odd:
        raise UnsupportedError(
            f"transformers only quantizes exact nn.Linear layers (and Conv1D) when loading, so it could not reload "
            f"{odd[:3]}{' ...' if len(odd) > 3 else ''} ({records[odd[0]].source.__name__}); apply with skip=[...] "
            "naming them to save, or reverse and save the full-precision model"
        )
    plain = sorted(
        n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_conv1d(m)) and n not in records
    )
    skip = [re.escape(n) for n in plain]
    fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    clash = [n for n in records if not should_convert_module(n, skip + fp32)]
    if clash:
        raise UnsupportedError(
            f"{clash[:3]} are quantized but transformers would keep them in full precision on load "
            "(_keep_in_fp32_modules); re-apply with the default skip_defaults=True to save"
        )
    layer: Any = next(m for m in model.modules() if record_of(m) is not None)
    first = next(iter(records.values()))
    if family == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=float(layer.state.threshold),
            llm_int8_skip_modules=skip,
        )
    state = first.canonical
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=family,
        bnb_4bit_use_double_quant=bool(state.nested),
        bnb_4bit_compute_dtype=layer.compute_dtype or first.dtype,
        bnb_4bit_quant_storage=layer.weight.quant_storage,
        llm_int8_skip_modules=skip,
    )


def save_quantized(
    model: nn.Module, path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``model`` (quantized by patchkit, still patched) to ``path`` for ``from_pretrained``.

    ``model`` must be a transformers ``PreTrainedModel`` (its ``config`` is written with a
    ``quantization_config``). ``AutoModel.from_pretrained(path)`` then rebuilds the bitsandbytes
    layers with the same values. The model is not changed.
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise UnsupportedError(
            f"{type(model).__name__} has no transformers config; save_quantized needs a PreTrainedModel"
        )
    quant = bnb_config(model)
    tensors = quantized_state_dict(model)
    os.makedirs(path, exist_ok=True)
    config = copy.deepcopy(config)
    config.quantization_config = quant
    config.save_pretrained(path)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
