"""Loading bitsandbytes lazily, and what it can run on. The only place that imports it."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from types import ModuleType

import torch

from patchkit import UnsupportedError

MIN_VERSION = "0.45"
# Floating dtypes bitsandbytes quantizes from (and dequantizes back to).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Used when bitsandbytes does not declare its devices (older releases): what 0.45+ runs on.
_FALLBACK_DEVICES = frozenset({"cpu", "cuda", "xpu"})


def load_bnb() -> ModuleType:
    """Import bitsandbytes, or raise :class:`UnsupportedError` saying how to get it.

    bitsandbytes prints a notice about the optional ``kernels`` package on import; it is noise
    for patchkit users, so the first import runs with that output captured.
    """
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            logging.getLogger("bitsandbytes").disabled = True
            try:
                import bitsandbytes as bnb
            finally:
                logging.getLogger("bitsandbytes").disabled = False
    except Exception as exc:  # ImportError, or a broken native library raising anything
        raise UnsupportedError(
            f"the bitsandbytes package cannot be imported ({exc.__class__.__name__}: {exc}); "
            "install it with `pip install 'bitsandbytes>=0.45'` (or `pip install 'patchkit[bnb]'`)"
        ) from exc
    version = str(getattr(bnb, "__version__", "0"))
    if _too_old(version):
        raise UnsupportedError(
            f"bitsandbytes {version} is too old (int8_vectorwise_quant and CPU kernels need >= {MIN_VERSION}); "
            f"upgrade with `pip install -U 'bitsandbytes>={MIN_VERSION}'`"
        )
    return bnb


@functools.lru_cache(maxsize=4)
def _too_old(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) < Version(MIN_VERSION)
    except InvalidVersion:
        return False  # a local build with an odd version string: let its API speak for itself


def supported_devices(bnb: ModuleType) -> frozenset[str]:
    """Device types this bitsandbytes build runs on."""
    declared = getattr(bnb, "supported_torch_devices", None)
    return frozenset(declared) if declared else _FALLBACK_DEVICES


def unsupported_tensor(bnb: ModuleType, tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` (a linear weight) cannot be quantized here, or ``None``."""
    device = tensor.device
    if device.type == "meta":
        return (
            "the weight is on the meta device (not loaded); load the weights (e.g. from_pretrained without "
            "device_map='meta' / init_empty_weights) before quantizing"
        )
    if device.type not in supported_devices(bnb):
        return (
            f"bitsandbytes {getattr(bnb, '__version__', '?')} does not run on {device.type}; supported: "
            f"{sorted(supported_devices(bnb))}. Move the model with model.to('cpu') or model.to('cuda') first"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        return "the weight is on CUDA but CUDA is not available in this process"
    if tensor.dtype not in DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
        return (
            f"bitsandbytes quantizes {names} weights, this one is {str(tensor.dtype).replace('torch.', '')}; "
            "cast the model first, e.g. model.to(torch.float32)"
        )
    return None
