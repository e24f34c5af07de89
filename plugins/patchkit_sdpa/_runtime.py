"""Call-time questions the packed paths ask before running: is output capture on, are there
arguments they do not understand?"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Collection, Mapping
from typing import Any


def capture_requested() -> bool:
    """True while transformers collects attentions / hidden states through its capture hooks,
    which sit on modules the packed path does not call."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older/newer transformers: the explicit kwargs are still checked
        return False
    collected = _active_collector.get()
    return bool(collected)


def unexpected_kwargs(kwargs: Mapping[str, Any], ignorable: Collection[str]) -> list[str]:
    """Names of kwargs with a truthy value that the packed path would otherwise drop silently."""
    # No set(ignorable) here: torch 2.11's dynamo asserts on set() of a module-global set.
    out = []
    for key, value in kwargs.items():
        if value is None or value is False:
            continue
        if key in ignorable and key not in ("output_attentions", "output_hidden_states", "use_cache"):
            continue
        out.append(key)
    return out


def request_problem(kwargs: Mapping[str, Any], ignorable: Collection[str]) -> str | None:
    """Why a call's own arguments need the original path: output capture, or an argument the packed
    path would drop; ``None`` when they are fine."""
    if capture_requested() or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        return "attentions / hidden states were requested"
    if extra := unexpected_kwargs(kwargs, ignorable):
        return f"unsupported arguments {extra}"
    return None


def warn_fallback(why: str, what: str, stacklevel: int = 3) -> None:
    """The one warning a call that takes the original path gives (``patchkit.PatchkitWarning``)."""
    from patchkit import PatchkitWarning

    warnings.warn(
        f"patchkit sdpa: {why}; running the original {what} forward for this call",
        PatchkitWarning,
        stacklevel=stacklevel,
    )


def hooks_reason(hooked: list[str]) -> str:
    """The fallback reason for :func:`patchkit.toolkit.hooked_modules`' findings."""
    more = f" and {len(hooked) - 3} more" if len(hooked) > 3 else ""
    return f"hooks inside the patched region would see the packed path's calls (or none): {'; '.join(hooked[:3])}{more}"


def refuse_config_outputs(config: Any) -> None:
    """``UnsupportedError`` when ``config.output_attentions`` / ``output_hidden_states`` is set: every
    call would take the original path, so patching would only add a check per call."""
    if getattr(config, "output_attentions", False) or getattr(config, "output_hidden_states", False):
        from patchkit import UnsupportedError

        raise UnsupportedError(
            "config.output_attentions / output_hidden_states is set: every call would need the original path; "
            "unset it (pass output_*=True per call instead) or leave the model unpatched"
        )


@functools.cache
def mixed_class(mixin: type, cls: type, prefix: str) -> type:
    """The subclass ``<prefix><cls>`` of the user's class ``cls`` with ``mixin``'s packed forward in
    front, made once per class (so ``isinstance`` keeps working and reverse restores ``cls``)."""
    return type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
