"""Patch before wrapping in DDP: 2 gloo processes on the CPU match a single-process run."""

from __future__ import annotations

import socket

import pytest
import torch
from ddp_scenarios import SCENARIOS, train, worker
from helpers import registry_with, scaled_linear_patcher
from spawn import spawn_ranks
from torch import nn

import patchkit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """One spawn of 2 gloo ranks runs every scenario (process start-up dominates on 2 cores)."""
    # joined with a deadline, killed and retried once on a hang (torch's gloo spawn, see spawn.py)
    names = sorted(SCENARIOS)
    return spawn_ranks(worker, lambda port, out: (2, names, port, str(out)), tmp_path_factory.mktemp("ddp"))


@pytest.mark.slow  # two-process gloo groups
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_ddp_two_processes_match_single_process(scenario, ddp_results):
    ranks = [torch.load(ddp_results / f"{scenario}.rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert "error" not in rank, rank.get("error")
    single_losses, single_state = train(scenario, rank=0, world=1)
    ddp_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    assert single_losses[-1] != single_losses[0]  # it trained
    for rank in ranks:
        assert rank["state"].keys() == single_state.keys()
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


@pytest.fixture
def process_group(monkeypatch):
    """A one-rank gloo group, enough to construct DDP / FSDP in this process."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_real_attention_plugins_through_ddp_module_prefix(process_group):
    from ddp_scenarios import tiny_llama
    from transformers import BertConfig, BertModel

    llama = tiny_llama(attn_implementation="eager").eval()
    ddp = nn.parallel.DistributedDataParallel(llama)
    report = patchkit.apply(ddp, attention="flash2", backend="reference", only=["model.layers.1"])
    assert [s.paths for s in report.swaps] == [["module.model.layers.1.self_attn"]]
    assert not hasattr(llama.model.layers[0].self_attn, "_patchkit_flash2")
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ddp(ids)  # runs through the wrapper
    patchkit.reverse(ddp)
    assert llama.config._attn_implementation == "eager" and not patchkit.is_patched(llama)

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    encoder, ddp = bert.encoder, nn.parallel.DistributedDataParallel(bert)
    report = patchkit.apply(ddp, attention="sdpa", skip=["module.pooler"])
    assert [s.paths for s in report.swaps] == [["module.encoder"]]
    patchkit.reverse(ddp)
    assert bert.encoder is encoder


def test_quantizing_a_ddp_wrapped_model_is_refused(process_group):
    pytest.importorskip("bitsandbytes")
    from ddp_scenarios import tiny_llama

    llama = tiny_llama()
    modules = dict(llama.named_modules())
    ddp = nn.parallel.DistributedDataParallel(llama)
    with pytest.raises(patchkit.UnsupportedError, match="patch the model before wrapping it"):
        patchkit.apply(ddp, quantize="int8")
    assert dict(llama.named_modules()) == modules and not patchkit.is_patched(ddp)


def test_fsdp_wrapped_model_is_refused(process_group):
    from ddp_scenarios import tiny_llama
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    fully_shard(model)
    with pytest.raises(patchkit.UnsupportedError, match="before wrapping it in FSDP"):
        patchkit.apply(model, attention="flash2", backend="reference")
    assert not patchkit.is_patched(model)
