"""bitsandbytes quantizers for patchkit: ``apply(model, quantize="int8" | "fp4" | "nf4")``.

Every ``nn.Linear`` (subclasses included, e.g. Falcon's ``FalconLinear``) becomes a
``bnb.nn.Linear8bitLt`` or ``bnb.nn.Linear4bit`` on the module's device; ``reverse`` puts the
original module and parameter objects back (dequantized, or bit-identical with
``keep_original=``). ``patchkit.save_pretrained(model, path, quantized=True)`` is the one way
to write a checkpoint transformers reloads quantized (the patchers' ``save``). Importing this
package is cheap: torch-heavy code lives in submodules and bitsandbytes is imported only when a
patcher runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from patchkit import hookimpl

PATCHKIT_API = ">=1,<2"
REQUIRES = {"transformers": ">=5.0", "bitsandbytes": ">=0.45"}


@hookimpl
def register_patchers(register: Callable[[Any], None]) -> None:
    """Offer the three quantizers: families ``int8``, ``fp4`` and ``nf4`` (kind ``quantize``)."""
    from .patchers import make_patchers

    for patcher in make_patchers():
        register(patcher)


__all__ = ["PATCHKIT_API", "REQUIRES", "register_patchers"]
