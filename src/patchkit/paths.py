"""Per-call path choice for patchers that have a fast path and the original's own path.

A patched module may run its fast (packed, padding-free) path or the original module's own code
for a call. Which one is a small cost model owned by each plugin (it knows its architecture and
its measurements); this module holds the architecture-free parts every such plugin shares:

- :func:`requested`: the user's forced choice, ``"auto"`` (the cost model), ``"packed"`` or
  ``"original"``, from the ``path=`` option given to ``apply`` or, when that is absent or
  ``"auto"``, the ``PATCHKIT_PATH`` environment variable (read on every call, so tests and
  benchmarks can switch it between calls);
- :class:`CallFacts`: the facts known before a call that the cost models read;
- :class:`PathLog`: per patched module, how many calls took each path and why the last one did
  (``module._patchkit_paths``; what tests and ``bench/regimes.py`` read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

PATHS = ("auto", "packed", "original")
ENV = "PATCHKIT_PATH"
LOG_ATTR = "_patchkit_paths"
OPTION = {"path": "per-call path: 'auto' (cost model, default), 'packed' or 'original' (forced; also PATCHKIT_PATH)"}


def check_choice(value: Any) -> str:
    """``value`` as one of :data:`PATHS` (``None`` -> ``"auto"``); ValueError otherwise."""
    choice = "auto" if value is None else str(value)
    if choice not in PATHS:
        raise ValueError(f"path={value!r}: expected one of {', '.join(PATHS)}")
    return choice


def requested(option: str | None) -> str:
    """The path asked for: ``option`` unless it is ``None`` / ``"auto"``, then ``$PATCHKIT_PATH``,
    then ``"auto"``. Raises ValueError on an unknown value."""
    choice = check_choice(option)
    if choice != "auto":
        return choice
    return check_choice(os.environ.get(ENV) or None)


@dataclass(frozen=True)
class CallFacts:
    """What a cost model may read, all known before the call runs.

    ``tokens``: valid (non-padding) tokens; ``slots``: ``batch * length``; ``batch``; ``length``
    (query length of the call); ``device``: ``"cpu"``, ``"cuda"``, ...; ``cached``: the call
    continues a KV cache (a decode step or a chunk after a prefill); ``compiling``: traced by
    ``torch.compile``; ``training``: grad mode on and the module in training mode.
    """

    tokens: int
    slots: int
    batch: int
    length: int
    device: str = "cpu"
    cached: bool = False
    compiling: bool = False
    training: bool = False

    @property
    def padding(self) -> float:
        """The padded fraction of the call's ``batch x length`` slots (0.0 for an empty call)."""
        return 1.0 - self.tokens / self.slots if self.slots else 0.0

    @property
    def padded_slots(self) -> int:
        """How many of the ``batch x length`` slots are padding (what a packed path would skip)."""
        return self.slots - self.tokens


@dataclass
class PathLog:
    """Counts of the paths a patched module's calls took, and the last decision with its reason."""

    counts: dict[str, int] = field(default_factory=lambda: {"packed": 0, "original": 0})
    last: str | None = None
    reason: str = ""

    def record(self, path: str, reason: str) -> str:
        """Count one call on ``path`` (``"packed"`` or ``"original"``); returns ``path``."""
        self.counts[path] = self.counts.get(path, 0) + 1
        self.last = path
        self.reason = reason
        return path

    def reset(self) -> None:
        """Forget the counts and the last decision."""
        self.counts = {"packed": 0, "original": 0}
        self.last = None
        self.reason = ""


def log_of(module: Any) -> PathLog | None:
    """The :class:`PathLog` of a patched module (``None`` when it has none)."""
    log = getattr(module, "__dict__", {}).get(LOG_ATTR)
    return log if isinstance(log, PathLog) else None
