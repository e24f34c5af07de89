"""The sdpa benchmark's GPU entry point dry-runs on the CPU (small=True) and returns JSON-able results.

A benchmark, not a unit test: it lives in bench/ (outside the suite's testpaths) and runs with
``python -m pytest bench/test_sdpa_bench.py`` or as part of ``python bench/gpu_check.py --small``.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

BENCH = pathlib.Path(__file__).resolve().parent / "bench_sdpa.py"


def test_gpu_checks_dry_run_on_cpu() -> None:
    spec = importlib.util.spec_from_file_location("bench_sdpa", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.gpu_checks(small=True)
    json.dumps(result)
    assert result["card"] == "cpu" and len(result["results"]) == 10  # MiniLM x3, OPT x4, BERT-base x3
    assert [round(c["padding"], 1) for c in result["results"][-3:]] == [0.0, 0.5, 0.8]
    for case in result["results"]:
        assert case["max_abs_diff_valid"] < 1e-5, case  # the benchmark also checks exactness
        assert case["hf_sdpa_s"] > 0 and case["patchkit_s"] > 0
    cases = {c["case"]: c for c in result["results"]}
    assert any("plain call" in name for name in cases)
    (gen,) = (c for name, c in cases.items() if "generate" in name)
    assert gen["tokens_identical"] and gen["new_tokens"] == 16
