"""CPU threads for packed regions on a machine that is not idle: measure the run-queue wait, use the free cores.

A packed forward is many short parallel regions (one per GEMM, per attention call, per gather).
Each region ends at a barrier, so when another process holds one of the cores the region waits
for the thread that is off the CPU: on a 2-core VM with one busy competitor, MiniLM's packed
encoder ran 2-3x slower with 2 threads than with 1, while transformers' padded forward (fewer,
larger regions) lost less. The remedy is to run on the cores that are actually free.

:func:`governed` wraps a packed region. It never raises the thread count above the caller's
``torch.get_num_threads()``; it lowers it for the region when a measurement says cores are taken:

- **signal**: the run-queue wait of this process's threads (``/proc/self/task/*/schedstat``, field
  2), the time they were runnable but another task had the CPU. An idle machine shows ~0.
- **estimate**: with ``t`` threads waiting ``lost`` thread-seconds per second on ``cores`` cores
  shared fairly with ``k`` other busy tasks, ``lost = t * (1 - cores / (t + k))``; solve for ``k``
  and use ``cores - k`` threads (:func:`choose_threads`, pure and tested on its own).
- **probe**: at a lowered count the idle threads cannot see whether the competitor left. A region
  runs at the caller's count again (and is measured) when the kernel's instantaneous count of
  runnable tasks, less this process's, shows more free cores than in use (:func:`free_cores`, at most every 0.5 s), or
  after 32 s whatever it shows (in a container that count is the host's).

The count is torch's own (``torch.set_num_threads``), lowered only while the region runs and
restored when it ends, also on error. OpenMP and MKL hold it per thread, but torch's bookkeeping
is process-wide: a Python thread that reads ``torch.get_num_threads()`` (or starts its first torch
op) during a governed region may see the lowered count, and only one governed region at a time
changes it (a second one, nested or in another thread, runs as it is). Nothing happens on GPUs,
while compiling or tracing, off Linux, or with ``PATCHKIT_ADAPT_THREADS=0``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import torch

WAIT_SHARE = 0.15  # lower the count only when a thread waits this share of the time on average
MEASURE_EVERY = 0.05  # seconds between measured regions (a measurement reads a few /proc files)
DECIDE_AFTER = 0.02  # seconds of measured regions at one count before deciding
FIRST_PROBE, LAST_PROBE = 0.5, 32.0  # seconds between probes: at least, and at most

_TASKS = "/proc/self/task"


def choose_threads(used: int, waited: float, wall: float, cores: int, most: int) -> int:
    """Threads to use next, given that ``used`` threads waited ``waited`` thread-seconds in a run
    queue during ``wall`` seconds on ``cores`` cores; between 1 and ``most`` (the caller's count).

    Returns ``most`` unless the wait says other tasks hold cores (each thread waited more than
    :data:`WAIT_SHARE` of the time); then the cores left free by them, at least 1.
    """
    if wall <= 0 or used < 1 or waited <= WAIT_SHARE * used * wall:
        return most
    lost = min(waited / wall, used - 0.05)  # thread-seconds lost per second, < used by definition
    others = used * cores / (used - lost) - used  # busy tasks besides ours: lost = t(1 - c/(t+k))
    free = round(cores - others)
    return max(1, min(most, free))


class _SchedStats:
    """Open ``schedstat`` files of this process's threads, re-listed at most once a second (and after
    a fork): a measurement is then one ``pread`` per thread, ~1 us each, instead of ~10 us opens."""

    def __init__(self) -> None:
        self.pid = -1
        self.listed = 0.0
        self.fds: dict[str, int] = {}

    def _relist(self) -> None:
        if self.pid != os.getpid():  # forked: the inherited files describe the parent's threads
            self.fds = {}
            self.pid = os.getpid()
        else:
            self._close(set(self.fds))
        for tid in os.listdir(_TASKS):
            with contextlib.suppress(FileNotFoundError):  # the thread ended between listdir and open
                self.fds[tid] = os.open(f"{_TASKS}/{tid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        self.listed = time.monotonic()

    def _close(self, tids: set[str]) -> None:
        for tid in tids:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop(tid))

    def wait(self) -> float | None:
        if self.pid != os.getpid() or time.monotonic() - self.listed > 1.0:
            self._relist()
        total, gone = 0, set()
        for tid, fd in self.fds.items():
            try:
                total += int(os.pread(fd, 128, 0).split()[1])
            except ProcessLookupError:  # the thread ended
                gone.add(tid)
        self._close(gone)
        return total / 1e9


_STATS = _SchedStats()
_STATS_LOCK = threading.Lock()


def run_queue_wait() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU, summed over the
    threads alive now; ``None`` where the kernel does not report it (not Linux, no schedstat)."""
    try:
        with _STATS_LOCK:
            return _STATS.wait()
    except (OSError, ValueError, IndexError):
        return None


def free_cores() -> int:
    """Cores not taken by other processes' runnable tasks right now: the kernel's instantaneous
    count of runnable tasks (``/proc/loadavg``, field 4) less this process's own (its spinning
    OpenMP workers count there too); 0 if unknown. System-wide: in a container it counts the
    host's tasks, so it only ever triggers probes, never lowers the count."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
        ours = 0
        for tid in os.listdir(_TASKS):
            try:
                with open(f"{_TASKS}/{tid}/stat", "rb") as f:
                    ours += f.read().rpartition(b")")[2].split()[0] == b"R"
            except FileNotFoundError:  # the thread ended between listdir and open
                continue
    except (OSError, ValueError, IndexError):
        return 0
    return _cores() - max(running - ours, 0)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _dynamo_active() -> bool:
    """True in eager code that runs between the graphs of a ``torch.compile``'d call (dynamo's frame
    callback is installed): changing the count there would make its graphs recompile."""
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback
    except ImportError:  # builds without dynamo
        return False
    return get_eval_frame_callback() not in (None, False)


class Governor:
    """The thread count packed regions use on this machine now (one per process: it describes the
    machine, not a model)."""

    def __init__(self) -> None:
        self.cap: int | None = None  # lowered count, or None: the caller's
        self.probing = False  # regions run at the caller's count until one decision is made
        self.last_probe = 0.0
        self.next_measure = 0.0
        self.pending: tuple[int, float, float] = (0, 0.0, 0.0)  # (threads, waited, wall) not yet decided on
        # One governed region at a time in the process: torch's count is process-wide bookkeeping,
        # so a second region (nested, or in another thread) runs as it is, neither measured nor changed.
        self._one_region = threading.Lock()

    def _want_probe(self, now: float) -> bool:
        if self.cap is None or self.probing or now - self.last_probe < FIRST_PROBE:
            return False
        return now - self.last_probe >= LAST_PROBE or free_cores() > self.cap

    def _record(self, used: int, most: int, waited: float, wall: float) -> None:
        threads, w, t = self.pending
        if threads != used:
            w = t = 0.0
        w, t = w + max(waited, 0.0), t + wall
        if t < DECIDE_AFTER:
            self.pending = (used, w, t)
            return
        self.pending = (0, 0.0, 0.0)
        choice = choose_threads(used, w, t, _cores(), most)
        if used < most:
            # At a lowered count only more waiting says something (fewer free cores); no waiting
            # does not mean the competitor left: the probes find that out.
            if choice < used:
                self.cap = choice
            return
        self.probing = False
        self.cap = choice if choice < most else None
        if choice < most:
            self.last_probe = time.perf_counter()

    @contextlib.contextmanager
    def region(self, x: torch.Tensor) -> Iterator[None]:
        """Run the body with the thread count this machine affords now (see the module docstring)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _dynamo_active():
            yield  # graphs (and eager code between their breaks): a count change would recompile them
            return
        most = torch.get_num_threads()
        if (
            x.device.type != "cpu"
            or most <= 1
            or os.environ.get("PATCHKIT_ADAPT_THREADS", "1") == "0"
            or not self._one_region.acquire(blocking=False)  # nested, or running in another thread
        ):
            yield
            return
        try:
            now = time.perf_counter()
            if self._want_probe(now):
                self.probing, self.last_probe = True, now
            threads = most if self.cap is None or self.probing else min(most, self.cap)
            before = run_queue_wait() if (self.probing or now >= self.next_measure) else None
            if threads != most:
                torch.set_num_threads(threads)
            start = time.perf_counter()
            try:
                yield
            finally:
                end = time.perf_counter()
                if threads != most:
                    torch.set_num_threads(most)
            if before is not None:
                after = run_queue_wait()
                self.next_measure = time.perf_counter() + MEASURE_EVERY
                if after is not None:
                    self._record(threads, most, after - before, end - start)
        finally:
            self._one_region.release()


governor = Governor()


def governed(x: torch.Tensor | None) -> contextlib.AbstractContextManager[None]:
    """Context for a packed region computing on ``x``'s device: on a busy CPU, runs it on the free
    cores (never more threads than ``torch.get_num_threads()``, restored afterwards). ``x=None``
    (no tensor to tell the device): the body runs as it is."""
    return governor.region(x) if x is not None else contextlib.nullcontext()
