"""The attention-kernel vocabulary shared by attention patchers and the plugins that offer kernels.

Core only stores backends by name (see :func:`patchkit.registry.Registry.attention_backends`);
what a backend computes is described here so third parties can add one through the
``register_attention_backends`` hook without importing any first-party plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AttentionBackend:
    """A varlen attention kernel.

    ``varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
    window=(-1, -1), alibi_slopes=None, dropout=0.0) -> out``: ``q`` is ``[total_q, heads, dim]``,
    ``k``/``v`` are ``[total_k, kv_heads, dim]`` (``heads`` a multiple of ``kv_heads``),
    ``cu_seqlens_*`` int32 offsets of each sequence; ``out`` is ``[total_q, heads, dim]``.
    Causal masks align to the bottom-right (the last query sees the last key), as in flash-attn.

    ``unavailable(device, dtype, needs)`` returns ``None`` when the kernel can run for tensors on
    ``device`` with ``dtype`` and the features in ``needs`` (e.g. ``{"alibi", "window", "backward"}``),
    else a one-line reason that says what to change. ``auto=False`` keeps it out of
    ``backend="auto"`` (the pure-PyTorch reference is only used when asked for by name).
    ``packages``: ``{"distribution": "specifier"}`` the kernel needs; while one is missing the
    backend is listed as unavailable (with the install command) and never chosen.
    """

    name: str
    varlen: Callable[..., Any]
    unavailable: Callable[[Any, Any, frozenset[str]], str | None]
    priority: int = 0
    auto: bool = True
    features: frozenset[str] = frozenset()
    description: str = ""
    packages: Mapping[str, str] = field(default_factory=dict)
    plugin: str = ""


def missing_packages(packages: Mapping[str, str]) -> str | None:
    """Why ``packages`` (``{"distribution": "specifier"}``) are not satisfied here, with the pip command;
    ``None`` when every one is installed in a matching version. Reads package metadata only."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    for package, spec in packages.items():
        try:
            have = metadata.version(package)
        except metadata.PackageNotFoundError:
            return f"needs {package}{spec}, which is not installed: pip install '{package}{spec}'"
        if Version(have) not in SpecifierSet(spec, prereleases=True):
            return f"needs {package}{spec}, found {have}: pip install -U '{package}{spec}'"
    return None


def resolve_backend(
    backends: dict[str, AttentionBackend],
    name: str,
    device: Any,
    dtype: Any,
    needs: frozenset[str] = frozenset(),
) -> AttentionBackend:
    """Pick the kernel for tensors on ``device`` with ``dtype`` needing the features ``needs``.

    ``name="auto"`` tries backends with ``auto=True`` by descending ``priority`` and returns the
    first whose ``unavailable`` says ``None``; a named backend must exist and fit. Raises
    :class:`~patchkit.errors.UnsupportedError` listing each backend's reason (what to change)
    when nothing fits. Pure query: changes nothing.
    """
    from .errors import UnsupportedError

    def reason_of(backend: AttentionBackend) -> str | None:
        missing = sorted(needs - backend.features)
        if missing:
            return f"does not support {', '.join(missing)}"
        problem = missing_packages(backend.packages)
        if problem is not None:
            return problem
        return backend.unavailable(device, dtype, needs)

    if name != "auto":
        if name not in backends:
            known = ", ".join(sorted(backends)) or "none registered"
            raise UnsupportedError(f"unknown attention backend {name!r} (known: {known})")
        reason = reason_of(backends[name])
        if reason is not None:
            raise UnsupportedError(f"attention backend {name!r} cannot run here: {reason}")
        return backends[name]
    candidates = sorted((b for b in backends.values() if b.auto), key=lambda b: (-b.priority, b.name))
    reasons = []
    for backend in candidates:
        reason = reason_of(backend)
        if reason is None:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    manual = sorted(b.name for b in backends.values() if not b.auto)
    hint = f"; or pass backend={manual[0]!r} explicitly (slow, exact)" if manual else ""
    detail = "; ".join(reasons) if reasons else "no automatic backend is registered"
    raise UnsupportedError(
        f"no attention backend fits tensors on {device} with dtype {dtype}"
        + (f" needing {', '.join(sorted(needs))}" if needs else "")
        + f" ({detail}){hint}"
    )
