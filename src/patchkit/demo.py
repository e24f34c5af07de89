"""``patchkit demo``: run a demo a plugin offers: patch, check outputs, time both, reverse, prove exactness.

Core names no architecture: the model, its inputs and the ``apply`` arguments come from a
plugin's ``register_demos`` hook (the first-party attention plugin offers one).
This module only runs what a :class:`Demo` builds and measures it.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .threads import run_queue_wait

if TYPE_CHECKING:
    from .registry import Registry


@dataclass
class DemoCase:
    """What a demo's ``build(quick)`` returns.

    ``model``: the model in inference mode, random weights. ``inputs``: keyword arguments of its
    forward. ``apply``: keyword arguments of :func:`patchkit.apply` (e.g. ``{"patch": "nodropout"}``).
    ``output(result)``: the tensor to compare from a forward's result. ``valid``: a boolean mask
    selecting the compared elements (e.g. real tokens, not padding), or ``None`` for all.
    ``tolerance``: the largest acceptable ``max |patched - original|``. ``lines``: what to print
    about the model and the batch.
    """

    model: nn.Module
    inputs: Mapping[str, Any]
    apply: Mapping[str, Any]
    output: Callable[[Any], torch.Tensor]
    valid: torch.Tensor | None = None
    tolerance: float = 1e-4
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Demo:
    """A demo a plugin offers through ``register_demos``: ``build(quick: bool) -> DemoCase``."""

    name: str
    build: Callable[[bool], DemoCase]
    description: str = ""
    plugin: str = ""  # filled in by the registry


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    config = getattr(model, "config", None)
    return (
        [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)],
        [(name, id(p), p.data_ptr()) for name, p in model.named_parameters()],
        buf.getvalue(),
        sorted(vars(config).items(), key=lambda kv: kv[0]).__repr__() if config is not None else None,
    )


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def machine_busy(original_ms: list[float], patched_ms: list[float], waited_share: float | None = None) -> str | None:
    """Why timings taken on this machine right now are not a fair comparison, or ``None``.

    Busy means: this process's threads spent more than 10% of the timed runs waiting for a CPU
    (``waited_share``, from :func:`patchkit.threads.run_queue_wait`: other processes held cores;
    the load average would count this process's own threads), or the runs of one variant spread by
    more than 25% (another process took cores mid-run).
    """
    reasons = []
    if waited_share is not None and waited_share > 0.10:
        reasons.append(f"this process's threads waited {waited_share:.0%} of the time for a CPU")
    for label, runs in (("original", original_ms), ("patched", patched_ms)):
        spread = (max(runs) - min(runs)) / statistics.median(runs)
        if spread > 0.25:
            reasons.append(f"{label} runs spread {spread:.0%}")
    return "the machine looks busy (" + ", ".join(reasons) + ")" if reasons else None


def _status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def _peak_rss_growth_mib(fn: Callable[[], Any]) -> float | None:
    """Peak resident-memory growth during one call (Linux: reset VmHWM, run, read it); None elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS counter
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) / 1024
    except (OSError, KeyError):
        return None


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with at most ``n`` intra-op threads, and give the process its setting back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_demo(registry: Registry, name: str | None = None) -> Demo:
    """The demo called ``name`` (``"plugin:name"`` or a bare name), or the first one registered.

    Raises :class:`~patchkit.UnsupportedError` naming the registered demos when there is none such.
    """
    from .errors import UnsupportedError

    demos = registry.demos()
    if name is None and demos:
        return demos[sorted(demos)[0]]
    matches = [d for key, d in demos.items() if name in (key, d.name)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted(demos)) or "none (no loaded plugin offers one; see `patchkit plugins`)"
    raise UnsupportedError(f"no demo {name!r} (ambiguous or unknown); registered demos: {known}")


def run_demo(quick: bool = False, name: str | None = None, registry: Registry | None = None) -> int:
    """Run a registered demo and print what happened; returns 0 when the outputs match within the
    demo's tolerance and reverse restored the model exactly, 1 otherwise. Restores the process's
    torch thread count and random state on return."""
    import patchkit

    registry = registry or patchkit.default_registry()
    demo = pick_demo(registry, name)
    with _threads(2), torch.random.fork_rng():
        torch.manual_seed(0)
        case = demo.build(quick)
        return _run(demo, case, quick, registry)


def _run(demo: Demo, case: DemoCase, quick: bool, registry: Registry) -> int:
    import patchkit

    model = case.model
    print(f"demo {demo.plugin}:{demo.name}: {demo.description}")
    for line in case.lines:
        print(line)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return case.output(model(**case.inputs))

    def compared(out: torch.Tensor) -> torch.Tensor:
        return out if case.valid is None else out[case.valid]

    before = _fingerprint(model)
    reference = forward()
    o_mem = _peak_rss_growth_mib(forward)
    report = patchkit.apply(model, registry=registry, **case.apply)
    print(report)
    diff = (compared(forward()) - compared(reference)).abs().max().item()
    print(f"outputs on compared elements: max |patched - original| = {diff:.2e} (tolerance {case.tolerance:.0e})")
    p_mem = _peak_rss_growth_mib(forward)

    repeats = 3 if quick else 7
    patched_ms, original_ms = [], []
    waited, start = run_queue_wait(), time.perf_counter()
    for _ in range(repeats):  # alternate patched and original runs so both see the same machine state
        patched_ms.append(_median_ms(forward, 1))
        patchkit.reverse(model)
        original_ms.append(_median_ms(forward, 1))
        patchkit.apply(model, registry=registry, **case.apply)
    after, wall = run_queue_wait(), time.perf_counter() - start
    share = (after - waited) / (wall * torch.get_num_threads()) if waited is not None and after is not None else None
    p_ms, o_ms = statistics.median(patched_ms), statistics.median(original_ms)
    ratios = sorted(o / p for o, p in zip(original_ms, patched_ms, strict=True))
    print(
        f"speed: original {o_ms:.1f} ms, patched {p_ms:.1f} ms per forward -> speed-up {o_ms / p_ms:.2f}x "
        f"(median of {repeats} alternating runs, per-pair range {ratios[0]:.2f}x..{ratios[-1]:.2f}x, "
        f"{torch.get_num_threads()} threads)"
    )
    busy = machine_busy(original_ms, patched_ms, share)
    if busy:
        print(f"note: {busy}; this speed-up is not a fair figure, rerun on an idle machine")
    if o_mem is not None and p_mem is not None:
        print(f"peak memory growth during a forward: original {o_mem:.0f} MiB, patched {p_mem:.0f} MiB")
    patchkit.reverse(model)
    exact = _fingerprint(model) == before and not patchkit.is_patched(model)
    print(
        f"reverse restored the original exactly (same module and parameter objects, same bytes): "
        f"{'yes' if exact else 'NO'}"
    )
    ok = exact and diff <= case.tolerance
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1
