"""Patch before wrapping in DDP: 2 gloo processes on the CPU match a single-process run."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from ddp_scenarios import SCENARIOS, train, worker
from helpers import registry_with, scaled_linear_patcher
from torch import nn

import patchkit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_ddp_two_processes_match_single_process(scenario, tmp_path):
    mp.start_processes(worker, args=(2, scenario, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single_losses, single_state = train(scenario, rank=0, world=1)
    ddp_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    for key, value in single_state.items():
        for rank in ranks:
            assert torch.allclose(rank["state"][key].float(), value.float(), atol=1e-5, rtol=1e-4), key


def test_patching_through_ddp_wrapper_prefix_and_refusal(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        # shared-parameter replacements work through the wrapper; `only` ignores the `module.` prefix
        report = patchkit.apply(ddp, patch="scale", only=["1"], registry=registry_with(scaled_linear_patcher()))
        assert report.swaps[0].paths == ["module.1"]
        patchkit.reverse(ddp)
        assert type(model[1]) is nn.Linear

        def copying_build(module, ctx):
            return nn.Linear(4, 4)  # new parameters DDP never saw

        from patchkit import Patcher, UnsupportedError

        copying = Patcher(name="copy", kind="other", family="copy", match=nn.Linear, build=copying_build)
        first = model[0]
        with pytest.raises(UnsupportedError, match="before wrapping"):
            patchkit.apply(ddp, patch="copy", registry=registry_with(copying))
        assert model[0] is first and not patchkit.is_patched(ddp)
    finally:
        dist.destroy_process_group()


def test_torch_compile_prefix_and_reverse():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 4)
    before = compiled(x)
    report = patchkit.apply(compiled, patch="scale", skip=["0"], registry=registry_with(scaled_linear_patcher()))
    assert [s.paths for s in report.swaps] == [["_orig_mod.2"]]
    assert torch.allclose(compiled(x), 2 * before)  # the compiled model sees the patch (dynamo re-guards)
    patchkit.reverse(compiled)
    assert torch.equal(compiled(x), before)
