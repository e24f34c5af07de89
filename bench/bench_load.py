"""Benchmark: loading a checkpoint quantized, patchkit.from_pretrained vs transformers' routes.

Generates an OPT-350m-shape checkpoint (331M parameters, random weights, fp32, about 7 safetensors
shards) into a temporary folder, then loads it along each route **in its own subprocess** and
reports that process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the wall time
of the load call (imports excluded; the RSS after imports is reported as ``base_mib``):

- ``fp32``: ``OPTForCausalLM.from_pretrained(path)``
- ``hf_nf4`` / ``hf_int8``: ``from_pretrained(path, quantization_config=BitsAndBytesConfig(...))``
- ``apply_nf4``: ``from_pretrained(path)`` then ``patchkit.apply(model, quantize="nf4")``
- ``pk_nf4`` / ``pk_int8``: ``patchkit.from_pretrained(OPTForCausalLM, path, quantize=...)``

``--quantize-command`` compares writing a quantized checkpoint instead (``model_mib`` is then the
size of the written ``model.safetensors``):

- ``hf_nf4_save`` / ``hf_int8_save``: ``from_pretrained(path, quantization_config=...)`` then
  ``model.save_pretrained(dest)``
- ``cli_nf4`` / ``cli_int8``: ``patchkit quantize path dest --quantize ...`` (in the process:
  ``patchkit.cli.main``)

Goals (checked and printed, not asserted): patchkit's peak RSS <= 0.5x transformers'
BitsAndBytesConfig route of the same family, and <= base + quantized size + largest tensor +
400 MiB; load time <= 1.2x transformers' route.

    python bench/bench_load.py              # the issue's size (a few minutes on 2 cores)
    python bench/bench_load.py --small      # tiny OPT, seconds: a dry run of every route
    python bench/bench_load.py --out DIR    # also write DIR/bench_load.json
    python bench/bench_load.py --quantize-command [--small]   # `patchkit quantize` vs transformers' save

``gpu_checks(small)`` runs the quantized routes with ``device_map="cuda"`` and reports peak host
RSS and peak device memory (``torch.cuda.max_memory_allocated``); small=True is a CPU dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
ROUTES = ("fp32", "hf_nf4", "hf_int8", "apply_nf4", "pk_nf4", "pk_int8")
QUANTIZE_ROUTES = ("hf_nf4_save", "cli_nf4", "hf_int8_save", "cli_int8")
MIB = 1024 * 1024


def opt_config(small: bool) -> Any:
    """OPT-350m's shape (or a tiny OPT for dry runs)."""
    import transformers

    if small:
        return transformers.OPTConfig(
            hidden_size=64,
            ffn_dim=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=512,
            word_embed_proj_dim=128,
            max_position_embeddings=128,
        )
    return transformers.OPTConfig(
        hidden_size=1024,
        ffn_dim=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        vocab_size=50272,
        word_embed_proj_dim=512,
        max_position_embeddings=2048,
        do_layer_norm_before=False,
    )


def generate(folder: str, small: bool) -> dict[str, Any]:
    """Write the random-weight checkpoint (run in a subprocess: the parent stays small)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(opt_config(small))
    model.save_pretrained(folder, max_shard_size="30KB" if small else "200MB")
    params = sum(p.numel() for p in model.parameters())
    return {"params": params}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tensor_bytes(model: Any) -> int:
    """Bytes the loaded model holds: parameters, buffers and bitsandbytes quantization state."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        import torch

        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for name in ("absmax", "code"):
                add(getattr(state, name, None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                add(nested.absmax)
                add(nested.code)
        add(getattr(t, "SCB", None))
    return total


def route(name: str, folder: str, device: str) -> dict[str, Any]:
    """Load ``folder`` along route ``name`` in this process; peak RSS and load time."""
    import torch
    import transformers

    import patchkit

    torch.set_num_threads(2)
    cls = transformers.OPTForCausalLM
    base = _rss_mib()
    cuda = device.startswith("cuda")
    kwargs: dict[str, Any] = {"device_map": device} if device != "cpu" else {}
    start = time.perf_counter()
    if name.startswith("cli_") or name.endswith("_save"):
        return _quantize_route(name, folder, base, start)
    if name == "fp32":
        model = cls.from_pretrained(folder, **kwargs)
    elif name.startswith("hf_"):
        family = name[3:]
        quant = (
            transformers.BitsAndBytesConfig(load_in_8bit=True)
            if family == "int8"
            else transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=family)
        )
        model = cls.from_pretrained(folder, quantization_config=quant, **kwargs)
    elif name.startswith("apply_"):
        model = cls.from_pretrained(folder, **kwargs)
        patchkit.apply(model, quantize=name[6:])
    elif name.startswith("pk_"):
        model = patchkit.from_pretrained(cls, folder, quantize=name[3:], progress=False, **kwargs)
    else:
        raise ValueError(name)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"route": name, "seconds": round(seconds, 2), "peak_mib": round(_rss_mib(), 1), "base_mib": round(base, 1)}
    out["model_mib"] = round(_tensor_bytes(model) / MIB, 1)
    if cuda:
        out["device_peak_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
    with torch.no_grad():  # it works
        ids = torch.randint(0, 100, (1, 8), device=device)
        out["logits_finite"] = bool(torch.isfinite(model(input_ids=ids).logits).all())
    return out


def _quantize_route(name: str, folder: str, base: float, start: float) -> dict[str, Any]:
    """Write a quantized checkpoint along route ``name``; peak RSS, time, written size; reload check."""
    import torch
    import transformers

    from patchkit.cli import main as cli_main

    family = name.split("_")[1]
    with tempfile.TemporaryDirectory(prefix="patchkit-bench-quantize-") as tmp:
        dest = os.path.join(tmp, "out")
        if name.startswith("cli_"):
            code = cli_main(["quantize", folder, dest, "--quantize", family, "--no-progress"])
            if code != 0:
                raise RuntimeError(f"patchkit quantize exited {code}")
        else:
            quant = (
                transformers.BitsAndBytesConfig(load_in_8bit=True)
                if family == "int8"
                else transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=family)
            )
            model = transformers.OPTForCausalLM.from_pretrained(folder, quantization_config=quant)
            model.save_pretrained(dest)
            del model
        seconds = time.perf_counter() - start
        peak = _rss_mib()
        written = os.path.getsize(os.path.join(dest, "model.safetensors"))
        out = {"route": name, "seconds": round(seconds, 2), "peak_mib": round(peak, 1), "base_mib": round(base, 1)}
        out["model_mib"] = round(written / MIB, 1)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(dest)
        with torch.no_grad():  # it reloads and works
            ids = torch.randint(0, 100, (1, 8))
            out["logits_finite"] = bool(torch.isfinite(reloaded(input_ids=ids).logits).all())
    return out


def _subprocess(args: list[str]) -> dict[str, Any]:
    # Prepend, never replace: a GPU machine may carry bitsandbytes on PYTHONPATH.
    inherited = filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))
    paths = [str(ROOT / "src"), str(ROOT / "plugins"), *inherited]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run([sys.executable, str(HERE / "bench_load.py"), *args], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench_load {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def largest_tensor(folder: str) -> int:
    """Bytes of the largest tensor in the checkpoint (headers only)."""
    sys.path.insert(0, str(ROOT / "src"))
    from patchkit.checkpoint import open_checkpoint

    return max(e.nbytes for e in open_checkpoint(folder).entries.values())


def run(small: bool, device: str = "cpu", routes: tuple[str, ...] = ROUTES) -> dict[str, Any]:
    """Generate the checkpoint, run every route in a subprocess, compare against the goals."""
    with tempfile.TemporaryDirectory(prefix="patchkit-bench-load-") as folder:
        generated = _subprocess(["--generate", folder] + (["--small"] if small else []))
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        largest = largest_tensor(folder)
        results = {r: _subprocess(["--route", r, folder, "--device", device]) for r in routes}
    out: dict[str, Any] = {
        "device": device,
        "small": small,
        "params": generated["params"],
        "shards": len(files),
        "checkpoint_mib": round(size / MIB, 1),
        "largest_tensor_mib": round(largest / MIB, 1),
        "routes": results,
        "load_average": os.getloadavg(),
    }
    goals = {}
    for family in ("nf4", "int8"):
        pk, hf = results.get(f"pk_{family}"), results.get(f"hf_{family}")
        if pk is None or hf is None:
            continue
        bound = pk["base_mib"] + pk["model_mib"] + largest / MIB + 400
        goals[family] = {
            "rss_ratio_vs_transformers": round(pk["peak_mib"] / hf["peak_mib"], 3),
            "rss_bound_mib": round(bound, 1),
            "rss_within_bound": pk["peak_mib"] <= bound,
            "time_ratio_vs_transformers": round(pk["seconds"] / hf["seconds"], 3),
            "met": pk["peak_mib"] <= 0.5 * hf["peak_mib"]
            and pk["peak_mib"] <= bound
            and pk["seconds"] <= 1.2 * hf["seconds"],
        }
    for family in ("nf4", "int8"):
        cli, hf = results.get(f"cli_{family}"), results.get(f"hf_{family}_save")
        if cli is None:
            continue
        bound = cli["base_mib"] + cli["model_mib"] + largest / MIB + 400
        goals[f"quantize_{family}"] = {
            "rss_bound_mib": round(bound, 1),
            "rss_within_bound": cli["peak_mib"] <= bound,
            **(
                {
                    "rss_ratio_vs_transformers": round(cli["peak_mib"] / hf["peak_mib"], 3),
                    "time_ratio_vs_transformers": round(cli["seconds"] / hf["seconds"], 3),
                }
                if hf
                else {}
            ),
        }
    out["goals"] = goals
    return out


def table(result: dict[str, Any]) -> str:
    """The routes as a markdown table, then the goals."""
    rows = ["| route | peak RSS MiB | after imports MiB | model MiB | load s |", "|---|---|---|---|---|"]
    for r in result["routes"].values():
        device = f" (device peak {r['device_peak_mib']} MiB)" if "device_peak_mib" in r else ""
        rows.append(f"| {r['route']} | {r['peak_mib']}{device} | {r['base_mib']} | {r['model_mib']} | {r['seconds']} |")
    head = (
        f"{result['params'] / 1e6:.0f}M params, {result['shards']} shards, {result['checkpoint_mib']} MiB, largest "
        f"tensor {result['largest_tensor_mib']} MiB, device {result['device']}, load average {result['load_average']}"
    )
    return "\n".join([head, *rows, json.dumps(result["goals"], indent=1)])


def gpu_checks(small: bool) -> dict[str, Any]:
    """The quantized routes with device_map='cuda': peak host RSS and device memory; small: CPU dry run."""
    import torch

    if small and not torch.cuda.is_available():
        return run(True, device="cpu", routes=("hf_nf4", "pk_nf4", "pk_int8"))
    if not torch.cuda.is_available():
        return {"skipped": "CUDA is not available"}
    result = run(small, device="cuda", routes=("hf_nf4", "hf_int8", "pk_nf4", "pk_int8"))
    result["card"] = torch.cuda.get_device_name(0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--generate", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--route", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quantize-command", action="store_true", help="patchkit quantize vs transformers' save")
    parser.add_argument("--routes", help="comma-separated routes to run (default: all of the chosen set)")
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(generate(args.generate, args.small)))
        return
    if args.route:
        print(json.dumps(route(args.route[0], args.route[1], args.device)))
        return
    routes = QUANTIZE_ROUTES if args.quantize_command else ROUTES
    if args.routes:
        routes = tuple(args.routes.split(","))
    result = run(args.small, device=args.device, routes=routes)
    print(table(result))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        pathlib.Path(args.out, "bench_load.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
