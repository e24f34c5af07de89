"""FlashAttention-2 patchers for Llama, Mistral and Falcon, and the varlen kernels they run.

``patchkit.apply(model, attention="flash2", backend="auto"|"flash_attn"|"torch"|"reference",
padding_free=True)``. Importing this package is cheap: torch and transformers are imported by
the hooks' submodules only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from patchkit import hookimpl

PATCHKIT_API = ">=1,<2"
REQUIRES = {"transformers": ">=5.0"}


@hookimpl
def register_patchers(register: Callable[[Any], None]) -> None:
    """Offer the Llama/Mistral, Falcon and generic (every other interface-dispatching decoder) flash2 patchers."""
    from . import falcon, generic, llama

    register(llama.patcher())
    register(falcon.patcher())
    register(generic.patcher())


@hookimpl
def register_attention_backends(register: Callable[[Any], None]) -> None:
    """Offer the flash_attn, torch and reference varlen kernels."""
    from .backends import all_backends

    for backend in all_backends():
        register(backend)
