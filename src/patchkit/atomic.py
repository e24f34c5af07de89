"""Keeping a multi-step change whole: interrupts held until a commit ends, and GC paused safely.

- :func:`interrupts_held`: a Ctrl-C (SIGINT) arriving while the block runs is delivered when it
  ends. Commit phases (freeing originals after a successful apply, putting originals back on
  reverse) cannot be rolled back halfway, so they finish first; the interrupt follows.
- :func:`gc_paused`: cyclic garbage collection off while a large model is swapped (its passes over
  the object graph made apply superlinear in depth), back on when the last pauser leaves, also
  when several threads pause at once or an interrupt lands anywhere in it.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT while the block runs (main thread only: other threads never receive signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, Any]] = []
    previous: Any = None
    installed = False
    try:
        try:
            previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
            installed = True
        except (ValueError, OSError):  # not the main interpreter: signals cannot be handled here
            pass
        yield
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)
            if received:
                if callable(previous):
                    previous(*received[0])  # Python's default handler raises KeyboardInterrupt here
                elif previous == signal.SIG_DFL:
                    signal.raise_signal(signal.SIGINT)


def run_all(steps: list[Callable[[], None]]) -> None:
    """Run every step with interrupts held; a step that raises does not stop the others, and the
    first error is raised once all ran (the change they make is whole either way)."""
    first: BaseException | None = None
    with interrupts_held():
        for step in steps:
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other steps
                first = first or exc
    if first is not None:
        raise first


_lock = threading.Lock()
_pausers: dict[int, int] = {}  # thread -> how deep it is inside gc_paused
_enable_after = False  # whether GC was on when the first pauser came


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Cyclic GC off inside the block; on again when the last thread inside leaves (if it was on)."""
    global _enable_after
    me = threading.get_ident()
    try:
        with _lock:
            if not _pausers:
                _enable_after = gc.isenabled()
            _pausers[me] = _pausers.get(me, 0) + 1
            gc.disable()
        yield
    finally:
        with _lock:
            depth = _pausers.pop(me, 0) - 1
            if depth > 0:
                _pausers[me] = depth
            if not _pausers and _enable_after:
                gc.enable()
