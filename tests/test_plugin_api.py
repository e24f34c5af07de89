"""Plugin API stability: a frozen 1.0-era plugin (tests/data/legacy-plugin-1.0), installed for real,
plans, applies and reverses; deprecated names warn and keep working; a plugin's exception in the
CLI is one line naming the plugin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from exactness import full_state, tiny_bert

import patchkit
from patchkit import Registry

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy-plugin-1.0"


@pytest.fixture(scope="module")
def legacy_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The frozen plugin pip-installed (from a copy: the source tree stays clean) into a folder."""
    source = tmp_path_factory.mktemp("legacy-src") / "project"
    shutil.copytree(LEGACY, source)
    target = tmp_path_factory.mktemp("legacy-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True,
    )
    return target


@pytest.fixture
def legacy_registry(legacy_site: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.syspath_prepend(str(legacy_site))
    registry = Registry()
    registry.load_entry_points()
    info = {p.name: p for p in registry.plugins()}["legacy10"]
    assert info.status == "loaded", info
    return registry


def test_a_1_0_plugin_plans_applies_and_reverses(legacy_registry: Registry) -> None:
    model = tiny_bert()
    before = full_state(model)
    with pytest.warns(DeprecationWarning, match="ctx.dry_run .* use ctx.plan_only"):
        planned = patchkit.plan(model, patch="legacy-nodropout", registry=legacy_registry)
    assert planned.patches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        report = patchkit.apply(model, patch="legacy-nodropout", quantize="legacy-half", registry=legacy_registry)
    assert {s.patcher for s in report.swaps} == {"nodropout", "half"}
    out = model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert torch.isfinite(out).all()
    patchkit.reverse(model)  # the 1.0 restore (mutates, returns None) still runs on reverse
    after = full_state(model)
    assert after["modules"] == before["modules"] and after["params"] == before["params"]


def test_a_plugin_exception_in_the_cli_is_one_line_naming_the_plugin(legacy_site: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_bert().config.to_dict()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(legacy_site), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-m", "patchkit.cli", "plan", str(config), "--patch", "legacy-boom"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("patchkit")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "legacy10" in lines[0] and "boom" in lines[0] and "KeyError" in lines[0]
