"""FSDP2 training scenarios: patch, then ``fully_shard``, train on 2 gloo ranks; or train in one process.

The models, batches and losses are the DDP scenarios' (``ddp_scenarios``): each rank takes half of
every batch, both halves hold the same number of valid tokens, dropout is 0, so the mean of the
ranks' losses and the trained parameters must equal a single process's to float rounding.

Under FSDP each transformer block and then the root are sharded (``fully_shard``), as the FSDP2
tutorials do. After training, what the user keeps is gathered as a full state dict
(``get_model_state_dict(..., full_state_dict=True, cpu_offload=True)``: rank 0 holds it), then the
model is reversed in place (LoRA: ``unload()`` first) and used once more, sharded and unpatched.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from ddp_scenarios import (  # noqa: E402
    BATCH,
    STEPS,
    Scenario,
    bert_sdpa_scenario,
    llama_flash2_scenario,
    lm_batch,
    lm_loss,
    tiny_llama,
)

import patchkit  # noqa: E402


def nf4_lora(storage: torch.dtype | None) -> Callable[[], Scenario]:
    """QLoRA: nf4 base (packed values stored as ``storage``; None: the default uint8), LoRA on q/v."""

    def build() -> Scenario:
        import peft

        base = tiny_llama().train()
        options = {} if storage is None else {"quant_storage": storage}
        patchkit.apply(base, quantize="nf4", **options)
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(base, config)
        model.patchkit_base = base  # type: ignore[assignment]  # what to reverse after unload()
        return Scenario(model, lm_batch, lm_loss, lr=0.1)

    return build


# "-root": only the root is sharded (one FSDP unit); else each block, then the root.
SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "llama-flash2": llama_flash2_scenario,
    "llama-flash2-root": llama_flash2_scenario,
    "bert-sdpa": bert_sdpa_scenario,
    "bert-sdpa-root": bert_sdpa_scenario,
    "nf4-lora-uint8": nf4_lora(None),
    "nf4-lora-float32": nf4_lora(torch.float32),  # storage = the model's dtype, as bitsandbytes' FSDP guide does
}


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the entries of the largest ModuleList (Llama's layers, BERT's layer)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters, by name, full (gathered from the shards) and on the CPU."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().cpu().clone()
    return out


def _steps(sc: Scenario, model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int, losses: list) -> None:
    for step in range(STEPS):
        full = sc.batch(step)
        per = BATCH // world
        part = {k: v[rank * per : (rank + 1) * per] for k, v in full.items()}
        opt.zero_grad()
        loss = sc.loss(model, part)
        loss.backward()
        opt.step()
        losses.append(loss.item())


def train(scenario: str, rank: int, world: int) -> dict[str, Any]:
    """Train ``STEPS`` SGD steps (sharded with ``fully_shard`` when ``world > 1``); then reverse."""
    sc = SCENARIOS[scenario]()
    model = sc.model
    result: dict[str, Any] = {}
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        if not scenario.endswith("-root"):
            for block in blocks(model):
                fully_shard(block)
        fully_shard(model)  # patch, then shard
        # the frozen (quantized) linear weights of the blocks; with float32 storage their dtype says nothing
        quantized = [
            (n, p)
            for n, p in model.named_parameters()
            if ".layers." in n and not p.requires_grad and n.endswith("weight") and p.dim() == 2
        ]
        result["sharded_frozen"] = {n: (tuple(p.shape), tuple(p.to_local().shape)) for n, p in quantized}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=sc.lr)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", patchkit.PatchkitWarning)
        _steps(sc, model, opt, rank, world, losses)
    # a patched region that sees hooks inside it (FSDP's, per block) runs the unpatched or padded path
    result["fallbacks"] = sorted(
        {str(w.message)[:60] for w in caught if issubclass(w.category, patchkit.PatchkitWarning)}
    )
    result["losses"] = losses
    result["trained"] = trained(model)
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # what a user saves: the full state dict, gathered to rank 0 (every rank takes part)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        result["full_state_keys"] = sorted(state)  # empty on the other ranks
    # reverse after training, on the (sharded) model itself
    base = getattr(model, "patchkit_base", None)
    if base is not None:
        model.unload()  # type: ignore[operator]  # PEFT's adapter layers out first
    try:
        patchkit.reverse(base if base is not None else model)
    except Exception as exc:  # sharded 4-bit weights: see test_fsdp.py (a known limit)
        result["reverse_error"] = f"{type(exc).__name__}: {exc}"
    result["reversed"] = not patchkit.is_patched(base if base is not None else model)
    # fully_shard swaps a module's class for an FSDP subclass (FSDPBertLayer); compare the originals
    result["classes"] = sorted({type(m).__name__.removeprefix("FSDP") for m in (base or model).modules()})
    if base is None:  # the unpatched (still sharded) model runs and gives the single process's loss
        with torch.no_grad():
            full = sc.batch(0)
            per = BATCH // world
            part = {k: v[rank * per : (rank + 1) * per] for k, v in full.items()}
            result["loss_after_reverse"] = sc.loss(model, part).item()
    return result


def worker(rank: int, world: int, scenarios: list[str], port: int, out: str) -> None:
    """One FSDP rank: every scenario in turn in one process group (one spawn for the whole file)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for scenario in scenarios:
            try:
                result = train(scenario, rank, world)
            except Exception as exc:  # reported by the test for this scenario, the others still run
                import traceback

                result = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
            torch.save(result, os.path.join(out, f"{scenario}.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
