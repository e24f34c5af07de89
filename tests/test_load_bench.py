"""bench/bench_load.py dry-runs small on the CPU through gpu_check.py (every route in its own subprocess)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow  # every benchmark route in its own subprocess
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_dry_runs_bench_load_small(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--small",
            "--only",
            "bench_load",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    section = json.loads((tmp_path / "gpu_check.json").read_text())["bench_load"]
    assert section["ok"], section
    result = section["result"]
    assert result["small"] and result["shards"] > 1
    routes = result["routes"]
    assert set(routes) == {"hf_nf4", "pk_nf4", "pk_int8"}
    for name, r in routes.items():
        assert r["logits_finite"], name
        assert r["peak_mib"] >= r["base_mib"] > 0 and r["seconds"] > 0, r
    # the 4-bit model patchkit loaded is the size of transformers' (same layers quantized, same layout)
    assert abs(routes["pk_nf4"]["model_mib"] - routes["hf_nf4"]["model_mib"]) < 0.05
    assert set(result["goals"]) == {"nf4"}


def test_bench_load_quantize_command_small(tmp_path: pathlib.Path) -> None:
    """`patchkit quantize` against transformers' load + save, tiny OPT: written, reloaded, within the bound."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_load.py"), "--quantize-command", "--small"]
        + ["--routes", "hf_nf4_save,cli_nf4", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "bench_load.json").read_text())
    routes = result["routes"]
    assert set(routes) == {"hf_nf4_save", "cli_nf4"}
    for name, r in routes.items():
        assert r["logits_finite"] and r["model_mib"] > 0, (name, r)
    assert result["goals"]["quantize_nf4"]["rss_within_bound"], result["goals"]
