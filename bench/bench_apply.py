"""Engine overhead: plan, apply and reverse on a Llama-2-70B-shaped model built on the meta device.

    python bench/bench_apply.py            # 80, 160 and 320 layers
    python bench/bench_apply.py --quick    # fewer repeats

The patcher swaps every nn.Linear (7 per layer, 561 at 80 layers) for a subclass sharing its
parameters: the engine's own cost, with no kernel work. Reports medians and growth per doubling.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from pathlib import Path

import torch
from torch import nn

import patchkit
from patchkit.cli import build_meta_model

CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "llama-2-70b"


class SharedLinear(nn.Linear):
    pass


def registry() -> patchkit.Registry:
    plugin = types.ModuleType("bench_plugin")

    @patchkit.hookimpl
    def register_patchers(register):
        register(
            patchkit.Patcher(
                name="bench-linear",
                kind="other",
                family="bench",
                match=nn.Linear,
                build=lambda m, ctx: patchkit.share_as(m, SharedLinear),
            )
        )

    plugin.register_patchers = register_patchers  # type: ignore[attr-defined]
    reg = patchkit.Registry()
    reg.add_plugin(plugin, name="bench")
    return reg


def deepen(model: nn.Module, factor: int) -> nn.Module:
    """Repeat the decoder layers ``factor`` times (new module objects, still on meta)."""
    import copy

    layers = model.model.layers
    extra = [copy.deepcopy(layer) for _ in range(factor - 1) for layer in layers]
    for layer in extra:
        layers.append(layer)
    return model


def measure(depth_factor: int, repeats: int, reg: patchkit.Registry) -> dict[str, float]:
    model = deepen(build_meta_model(CONFIG), depth_factor)
    times: dict[str, list[float]] = {"plan": [], "apply": [], "reverse": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        patchkit.plan(model, patch="bench", registry=reg)
        t1 = time.perf_counter()
        patchkit.apply(model, patch="bench", registry=reg)
        t2 = time.perf_counter()
        patchkit.reverse(model)
        t3 = time.perf_counter()
        times["plan"].append(t1 - t0)
        times["apply"].append(t2 - t1)
        times["reverse"].append(t3 - t2)
    result = {k: statistics.median(v) * 1000 for k, v in times.items()}
    result["layers"] = len(model.model.layers)
    result["linears"] = sum(isinstance(m, nn.Linear) for m in model.modules())
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    reg = registry()
    rows = [measure(f, 3 if args.quick else 9, reg) for f in (1, 2, 4)]
    print(f"{'layers':>7} {'linears':>8} {'plan ms':>9} {'apply ms':>9} {'reverse ms':>11}")
    for row in rows:
        print(
            f"{row['layers']:>7} {row['linears']:>8} {row['plan']:>9.1f} {row['apply']:>9.1f} {row['reverse']:>11.1f}"
        )
    for key in ("apply", "reverse"):
        growth = [rows[i + 1][key] / rows[i][key] for i in range(2)]
        print(f"{key}: growth per doubling of depth {growth[0]:.2f}x, {growth[1]:.2f}x (linear = 2.00x)")


if __name__ == "__main__":
    main()
