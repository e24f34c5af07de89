"""DDP training scenarios: build a model, patch it, train; run in 2 gloo processes or in one.

Each scenario returns (model, batch_fn, loss_fn). ``train`` is the same code for both runs, so
the only difference is DDP's gradient averaging across the two halves of each batch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import patchkit  # noqa: E402

STEPS = 3
BATCH = 4  # per step, split 2 + 2 across ranks under DDP


def linear_scenario() -> tuple[nn.Module, Callable[[int], dict[str, torch.Tensor]], Callable[..., torch.Tensor]]:
    from helpers import registry_with, scaled_linear_patcher

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))

    def batch(step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        return {"x": torch.randn(BATCH, 8, generator=g), "y": torch.randn(BATCH, 1, generator=g)}

    def loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(model(b["x"]), b["y"])

    return model, batch, loss


SCENARIOS: dict[str, Callable[[], Any]] = {"linear": linear_scenario}


def train(scenario: str, rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train ``STEPS`` steps; under DDP each rank takes its slice of every batch."""
    model, batch, loss_fn = SCENARIOS[scenario]()
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(STEPS):
        full = batch(step)
        per = BATCH // world
        part = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
        opt.zero_grad()
        loss = loss_fn(model, part)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    inner = model.module if world > 1 else model
    patchkit.reverse(inner)  # reverse after training: the user's own parameters hold the result
    return losses, {k: v.detach().clone() for k, v in inner.state_dict().items()}


def worker(rank: int, world: int, scenario: str, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        losses, state = train(scenario, rank, world)
        torch.save({"losses": losses, "state": state}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
