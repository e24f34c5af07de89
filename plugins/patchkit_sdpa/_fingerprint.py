"""Fingerprints of the transformers code a re-derived path mirrors, per known-good release.

The packed BERT/OPT paths (and flash2's Falcon attention) compute what transformers' forward
methods compute without calling them. Comparing the user's classes with the *installed*
transformers classes proves the model runs that code, not that this code is still the code the
path was written against: a new release may change it. So each path records the sha256 of the
source of every method it mirrors, for each release it was checked on; any other source is
refused (``UnsupportedError``: raised under ``strict=True``, the module left alone with a
``PatchkitWarning`` under ``strict=False``) unless the user says to trust it:
``PATCHKIT_TRUST_TRANSFORMERS=1`` or ``patchkit.apply(..., trust_transformers=True)``.

Recording a new release: run its tests (``tests/test_sdpa_*.py``), then add the value
:func:`fingerprint` returns for it to the path's table.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from patchkit import UnsupportedError

TRUST_ENV = "PATCHKIT_TRUST_TRANSFORMERS"
TRUST_OPTION = "trust_transformers"


@functools.cache
def _source(fn: Callable[..., Any]) -> str:
    return textwrap.dedent(inspect.getsource(fn))  # getsource unwraps decorators (and includes their lines)


def fingerprint(functions: Sequence[Callable[..., Any]]) -> str:
    """sha256 over the qualified names and source text of ``functions``, in order."""
    digest = hashlib.sha256()
    for fn in functions:
        digest.update(f"{fn.__qualname__}\n{_source(fn)}\n".encode())
    return digest.hexdigest()


def trusted(ctx: Any) -> bool:
    """The user asked to patch whatever transformers is installed (env var or apply option)."""
    return os.environ.get(TRUST_ENV, "") not in ("", "0") or bool(ctx is not None and ctx.option(TRUST_OPTION))


def require_known(path: str, functions: Sequence[Callable[..., Any]], known: Mapping[str, str], ctx: Any = None) -> str:
    """Raise ``UnsupportedError`` unless the source of ``functions`` is one of ``known`` (release ->
    sha256) or the user trusts the installed transformers; returns the matching release (or ``""``)."""
    value = fingerprint(functions)
    for release, expected in known.items():
        if value == expected:
            return release
    if trusted(ctx):
        return ""
    import transformers

    names = ", ".join(fn.__qualname__ for fn in functions)
    raise UnsupportedError(
        f"{path} re-derives transformers' {names}; their source in the installed transformers "
        f"{transformers.__version__} differs from the releases it was checked against ({', '.join(known)}). "
        f"Leave the model unpatched (strict=False), or, after checking the results, set {TRUST_ENV}=1 "
        f"or pass {TRUST_OPTION}=True to patch anyway"
    )
