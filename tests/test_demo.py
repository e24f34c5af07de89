"""The README's first command: `patchkit demo` runs a plugin's demo end to end and reports exactness."""

from __future__ import annotations

import os
import types

import pytest
import torch
from helpers import ScaledLinear
from torch import nn

import patchkit
from patchkit import Demo, DemoCase, Registry
from patchkit.cli import main


def test_demo_quick_runs_and_reverse_is_exact(capsys):
    pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "demo sdpa:minilm" in out  # the demo comes from the plugin that owns the model and the patch
    assert "BertEncoder" in out and "SdpaBertEncoder" in out and "sdpa-bert-encoder" in out  # the swap is listed
    assert "reverse restored the original exactly (same module and parameter objects, same bytes): yes" in out
    assert "demo OK" in out
    assert torch.get_num_threads() == threads  # the demo gave the process its thread setting back


def _doubling_plugin(tolerance: float) -> types.ModuleType:
    """A plugin offering a patcher that doubles Linear outputs, and a demo of it."""
    module = types.ModuleType("doubler")

    def build_patch(linear: nn.Module, ctx: patchkit.PatchContext) -> nn.Module:
        return patchkit.share_as(linear, ScaledLinear)

    def build_demo(quick: bool) -> DemoCase:
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        return DemoCase(
            model=model,
            inputs={"input": torch.randn(4, 8)},
            apply={"patch": "double"},
            output=lambda out: out,
            tolerance=tolerance,
            lines=["model: a two-layer MLP"],
        )

    @patchkit.hookimpl
    def register_patchers(register):
        register(patchkit.Patcher(name="double", kind="other", family="double", match=nn.Linear, build=build_patch))

    @patchkit.hookimpl
    def register_demos(register):
        register(Demo(name="mlp", build=build_demo, description="doubles every Linear"))

    module.register_patchers = register_patchers
    module.register_demos = register_demos
    return module


def test_demo_fails_when_the_patch_changes_outputs(capsys):
    from patchkit.demo import run_demo

    registry = Registry()
    assert registry.add_plugin(_doubling_plugin(1e-4), name="doubler").status == "loaded"
    assert list(registry.demos()) == ["doubler:mlp"]
    assert run_demo(quick=True, name="mlp", registry=registry) == 1  # outputs differ: the demo can fail
    out = capsys.readouterr().out
    assert "demo doubler:mlp: doubles every Linear" in out and "demo FAILED" in out
    assert "reverse restored the original exactly (same module and parameter objects, same bytes): yes" in out
    generous = Registry()
    generous.add_plugin(_doubling_plugin(1e9), name="doubler")
    assert run_demo(quick=True, registry=generous) == 0


def test_demo_without_a_registered_demo_is_a_one_line_error():
    from patchkit.demo import run_demo

    with pytest.raises(patchkit.UnsupportedError, match="no demo 'nope'.*registered demos: none"):
        run_demo(quick=True, name="nope", registry=Registry())
    bad = types.ModuleType("baddemo")

    @patchkit.hookimpl
    def register_demos(register):
        register("not a demo")

    bad.register_demos = register_demos
    info = Registry().add_plugin(bad, name="baddemo")
    assert info.status == "failed" and "register_demos takes patchkit.Demo objects" in info.reason


def test_core_demo_names_no_architecture():
    from pathlib import Path

    text = (Path(patchkit.__file__).parent / "demo.py").read_text().lower()
    for word in ("bert", "minilm", "transformers", "automodel", "sdpa"):
        assert word not in text, f"patchkit/demo.py names {word!r}: the demo's model belongs to a plugin"


def test_demo_says_when_the_machine_is_too_busy_for_a_fair_figure() -> None:
    from patchkit.demo import machine_busy

    spread = machine_busy([100.0, 160.0, 100.0], [50.0, 50.0, 51.0])
    assert spread is not None and "original runs spread 60%" in spread
    assert machine_busy([100.0, 101.0, 100.0], [50.0, 50.0, 51.0], waited_share=0.02) is None
    waited = machine_busy([100.0, 101.0, 100.0], [50.0, 50.0, 51.0], waited_share=0.3)
    assert waited is not None and "waited 30% of the time" in waited and "spread" not in waited


@pytest.mark.slow  # the demo timed twice against a busy competitor
def test_demo_flags_a_competing_process() -> None:
    """A busy process on one of the demo's two CPUs: the demo measures its own threads' run-queue wait and
    says the figure is not fair (the load average counted the demo's own threads, so it said that
    on an idle machine too)."""
    import subprocess
    import sys

    cpus = sorted(os.sched_getaffinity(0))[:2]  # the demo on two CPUs, a busy process on one of them
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    pin = f"import os; os.sched_setaffinity(0, {set(cpus)}); "
    spin = f"import os; os.sched_setaffinity(0, {{{cpus[0]}}}); exec('while True: pass')"
    competitor = subprocess.Popen([sys.executable, "-c", spin])
    try:
        demo = pin + "import sys, torch; torch.set_num_threads(2); from patchkit.cli import main; "
        run = subprocess.run(
            [sys.executable, "-c", demo + "sys.exit(main(['demo', '--quick']))"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        competitor.kill()
        competitor.wait()
    assert run.returncode == 0, run.stderr[-2000:]
    assert "the machine looks busy (this process's threads waited" in run.stdout, run.stdout[-1500:]
