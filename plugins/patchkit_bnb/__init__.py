"""bitsandbytes quantizers for patchkit: ``apply(model, quantize="int8" | "fp4" | "nf4")``.

Every ``nn.Linear`` (subclasses included, e.g. Falcon's ``FalconLinear``) becomes a
``bnb.nn.Linear8bitLt`` or ``bnb.nn.Linear4bit`` on the module's device; ``reverse`` puts the
original module and parameter objects back (dequantized, or bit-identical with
``keep_original=``). Importing this package is cheap: torch-heavy code lives in submodules and
bitsandbytes is imported only when a patcher runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from patchkit import hookimpl

PATCHKIT_API = ">=1,<2"
REQUIRES = {"transformers": ">=5.0"}


@hookimpl
def register_patchers(register: Callable[[Any], None]) -> None:
    """Offer the three quantizers: families ``int8``, ``fp4`` and ``nf4`` (kind ``quantize``)."""
    from .patchers import make_patchers

    for patcher in make_patchers():
        register(patcher)


def save_quantized(model: Any, path: Any, **kwargs: Any) -> None:
    """Write a quantized checkpoint that transformers reloads (see :func:`patchkit_bnb.saving.save_quantized`)."""
    from .saving import save_quantized as _save

    _save(model, path, **kwargs)


__all__ = ["PATCHKIT_API", "REQUIRES", "register_patchers", "save_quantized"]
