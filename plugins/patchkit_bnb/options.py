"""User options of the quantizers, read from ``apply(..., **options)`` and validated in ``check``.

Names (all optional):
- ``threshold`` (int8): LLM.int8 outlier threshold on activations, default 6.0 (0 disables the
  fp16 outlier path).
- ``int8_cpu_kernel`` (int8): ``"dequant"`` (default) computes CPU inputs as dequantize-then-matmul
  (bitsandbytes' CPU training strategy: fp32 speed, weight-only error); ``"llm_int8"`` keeps
  bitsandbytes' emulated LLM.int8 path on the CPU (slower, activations quantized too). CUDA
  always runs LLM.int8.
- ``compute_dtype`` (4-bit): dtype of the matmul, default the layer's own dtype.
- ``compress_statistics`` or its alias ``double_quant`` (4-bit): quantize the block scales too,
  default True.
- ``quant_storage`` (4-bit): dtype the packed 4-bit values are stored in, default torch.uint8.
- ``blocksize`` (4-bit): values per absmax block, default 64.
- ``keep_original`` is patchkit's own option (:mod:`patchkit.keep`), not this plugin's: without it
  the original weight is freed and reverse dequantizes into it; with it patchkit keeps the weight
  and reverse is bit-identical.
- ``cpu_packing`` (4-bit, default False): let bitsandbytes repack 4-bit weights for its
  AVX512-BF16 CPU kernel on the first inference forward (about 1.5x faster CPU inference; PEFT's
  merge cannot read repacked weights).
- ``skip_defaults`` (default True): leave the output embedding, tied weights and the model's
  ``_keep_in_fp32_modules`` in full precision; False quantizes them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from patchkit import PatchContext, UnsupportedError

_DTYPE_NAMES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_STORAGE = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)


OPTION_DOCS = {
    "threshold": "int8: LLM.int8 outlier threshold (default 6.0; 0 disables the fp16 outlier path)",
    "int8_cpu_kernel": "int8: 'dequant' (default) or 'llm_int8' for CPU inputs",
    "compute_dtype": "4-bit: dtype of the matmul (default: the layer's dtype)",
    "compress_statistics": "4-bit: double-quantize the block scales (default True)",
    "double_quant": "alias of compress_statistics",
    "quant_storage": "4-bit: dtype the packed values are stored in (default torch.uint8)",
    "blocksize": "4-bit: values per absmax block (default 64)",
    "cpu_packing": "4-bit: allow bitsandbytes' AVX512-BF16 CPU repacking (default False)",
    "skip_defaults": "leave lm_head, tied weights and _keep_in_fp32_modules full precision (default True)",
    "has_fp16_weights": "not offered (refused with the reason)",
}


@dataclass(frozen=True)
class Options:
    """Validated options for one quantizer call."""

    threshold: float = 6.0
    compute_dtype: torch.dtype | None = None
    compress_statistics: bool = True
    quant_storage: torch.dtype = torch.uint8
    blocksize: int = 64
    skip_defaults: bool = True
    cpu_packing: bool = False
    int8_cpu_kernel: str = "dequant"


def _dtype(value: Any, name: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.replace("torch.", "") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.replace("torch.", "")]
    raise UnsupportedError(f"option {name}={value!r} is not a dtype; pass e.g. torch.bfloat16 or 'bfloat16'")


def read_options(ctx: PatchContext) -> Options:
    """The validated options of this apply; raises :class:`UnsupportedError` naming a bad one."""
    threshold = ctx.option("threshold", 6.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise UnsupportedError(f"option threshold={threshold!r} must be a number >= 0 (6.0 is LLM.int8's default)")
    if ctx.option("has_fp16_weights", False):
        raise UnsupportedError(
            "has_fp16_weights=True keeps full-precision weights and saves no memory; it is not offered. "
            "Train adapters (PEFT LoRA) on the quantized model instead"
        )
    compute = ctx.option("compute_dtype")
    compress = ctx.option("compress_statistics", ctx.option("double_quant", True))
    if not isinstance(compress, bool):
        raise UnsupportedError(f"option compress_statistics/double_quant={compress!r} must be True or False")
    storage = _dtype(ctx.option("quant_storage", torch.uint8), "quant_storage")
    if storage not in _STORAGE:
        raise UnsupportedError(f"option quant_storage={storage} is not one of {[str(s) for s in _STORAGE]}")
    blocksize = ctx.option("blocksize", 64)
    if not isinstance(blocksize, int) or blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise UnsupportedError(f"option blocksize={blocksize!r} must be a power of two from 32 to 4096 (default 64)")
    kernel = ctx.option("int8_cpu_kernel", "dequant")
    if kernel not in ("dequant", "llm_int8"):
        raise UnsupportedError(f"option int8_cpu_kernel={kernel!r} must be 'dequant' (default) or 'llm_int8'")
    return Options(
        threshold=float(threshold),
        compute_dtype=None if compute is None else _dtype(compute, "compute_dtype"),
        compress_statistics=compress,
        quant_storage=storage,
        blocksize=blocksize,
        skip_defaults=bool(ctx.option("skip_defaults", True)),
        cpu_packing=bool(ctx.option("cpu_packing", False)),
        int8_cpu_kernel=kernel,
    )
