"""Every GPU check and benchmark in one invocation (one device call).

    python bench/gpu_check.py --out $OUT            # on a GPU machine
    python bench/gpu_check.py --small --out /tmp/x  # dry run on the CPU, tiny sizes

Runs, each in isolation (one failing section never hides the others):
- pytest's CUDA-marked tests (``-m cuda``);
- ``gpu_checks(small)`` of each bench module: flash2 (torch backend vs eager in bf16, the Llama
  8 x 4096 benchmark vs HF sdpa and a bare varlen call), sdpa (BERT / OPT fp16), bnb (int8 / fp4 /
  nf4 quality, size and speed on CUDA), load (patchkit.from_pretrained quantized with device_map="cuda"
  vs transformers' BitsAndBytesConfig: peak host and device memory, time), regimes (issue 20's
  regime matrix, fp16: every cell's ratio over HF sdpa and the path the cost model chose).
Writes ``gpu_check.json`` (full results, card, versions, date) and prints a short table last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SECTIONS = ("bench_flash2", "bench_sdpa", "bench_bnb", "bench_compile", "bench_load", "profile_calls", "regimes")


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
    }
    for package in ("transformers", "bitsandbytes", "accelerate", "peft", "flash_attn"):
        try:
            info[package] = importlib.import_module(package).__version__
        except Exception as exc:  # absent packages are part of the record
            info[package] = f"unavailable ({type(exc).__name__})"
    return info


def run_pytest_cuda(out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(HERE.parent / "tests")],
        capture_output=True,
        text=True,
    )
    (out / "pytest_cuda.txt").write_text(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"returncode": proc.returncode, "summary": tail, "seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="tiny sizes; runs on the CPU in seconds")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    parser.add_argument("--only", action="append", help="run only these sections (bench_flash2, ..., pytest)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    results: dict[str, Any] = {"environment": environment(), "small": args.small}
    wanted = args.only or ["pytest", *SECTIONS]
    if "pytest" in wanted and not args.small:
        results["pytest_cuda"] = run_pytest_cuda(out)
    for name in SECTIONS:
        if name not in wanted:
            continue
        start = time.perf_counter()
        try:
            module = importlib.import_module(name)
            results[name] = {"result": module.gpu_checks(args.small), "ok": True}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))  # partial results survive
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results["environment"]))
    print(f"{'section':<14} {'ok':<5} {'s':>6}  summary")
    for name, value in results.items():
        if isinstance(value, dict) and "seconds" in value:
            ok = value.get("ok", value.get("returncode") == 0)
            summary = value.get("summary") or (value.get("error", "").strip().splitlines() or [""])[-1]
            if ok and "result" in value:
                summary = json.dumps(value["result"], default=str)[:300]
            print(f"{name:<14} {str(ok):<5} {value['seconds']:>6}  {summary}")
    failed = [n for n, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
