"""DDP training scenarios: build a model, patch it, train; run in 2 gloo processes or in one.

Each scenario returns a :class:`Scenario`. ``train`` is the same code for both runs, so the only
difference is DDP's gradient averaging across the two halves of each batch. Batches with padding
give both halves the same number of valid tokens, so the mean of the two half-batch losses (and
gradients) equals the full batch's: DDP and one process must agree to float rounding.
Dropout is 0: the ranks' RNG streams differ from the single process's.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import patchkit  # noqa: E402

STEPS = 3
BATCH = 4  # per step, split 2 + 2 across ranks under DDP
Batch = dict[str, torch.Tensor]


@dataclass
class Scenario:
    model: nn.Module
    batch: Callable[[int], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    # what to compare at the end, given the unwrapped model (default: reverse, then the whole state)
    final: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    lr: float = 0.05


def _reverse_and_state(model: nn.Module) -> dict[str, torch.Tensor]:
    patchkit.reverse(model)  # reverse after training: the user's own parameters hold the result
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def linear_scenario() -> Scenario:
    from helpers import registry_with, scaled_linear_patcher

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))

    def batch(step: int) -> Batch:
        g = torch.Generator().manual_seed(step)
        return {"x": torch.randn(BATCH, 8, generator=g), "y": torch.randn(BATCH, 1, generator=g)}

    def loss(model: nn.Module, b: Batch) -> torch.Tensor:
        return nn.functional.mse_loss(model(b["x"]), b["y"])

    return Scenario(model, batch, loss)


def padded_tokens(step: int, vocab: int, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0 and 2 full, rows 1 and 3 right-padded by 3: each half has the same valid-token count."""
    g = torch.Generator().manual_seed(100 + step)
    mask = torch.ones(BATCH, length, dtype=torch.long)
    mask[1::2, length - 3 :] = 0
    ids = torch.randint(1, vocab, (BATCH, length), generator=g) * mask
    return ids, mask


def tiny_llama(**over: object) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
        pad_token_id=0,
        **over,
    )
    return LlamaForCausalLM(cfg)


def lm_batch(step: int) -> Batch:
    ids, mask = padded_tokens(step, 64)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def lm_loss(model: nn.Module, b: Batch) -> torch.Tensor:
    return model(**b).loss


def llama_flash2_scenario() -> Scenario:
    """Llama, attention="flash2" on the reference kernel, padding-free training on a padded batch."""
    model = tiny_llama(attn_implementation="eager").train()
    patchkit.apply(model, attention="flash2", backend="reference")
    return Scenario(model, lm_batch, lm_loss)


def bert_sdpa_scenario() -> Scenario:
    """BERT sequence classifier, attention="sdpa" (the packed encoder fastpath) in training mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    cfg._attn_implementation = "eager"
    model = BertForSequenceClassification(cfg).train()
    patchkit.apply(model, attention="sdpa")

    def batch(step: int) -> Batch:
        ids, mask = padded_tokens(step, 64)
        labels = torch.randint(0, 3, (BATCH,), generator=torch.Generator().manual_seed(200 + step))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return Scenario(model, batch, lm_loss)


def int8_lora_scenario() -> Scenario:
    """quantize="int8", then a PEFT LoRA adapter on top; DDP trains (and averages) only the adapter."""
    import peft

    base = tiny_llama().train()
    patchkit.apply(base, quantize="int8")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, config)

    def final(model: nn.Module) -> dict[str, torch.Tensor]:
        # The adapter is what trained; the quantized base is frozen (and must still be).
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert state and all("lora_" in n for n in state)
        model.unload()
        patchkit.reverse(base)
        return state

    return Scenario(model, lm_batch, lm_loss, final=final, lr=0.1)


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "linear": linear_scenario,
    "llama-flash2": llama_flash2_scenario,
    "bert-sdpa": bert_sdpa_scenario,
    "int8-lora": int8_lora_scenario,
}


def train(scenario: str, rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train ``STEPS`` steps; under DDP each rank takes its slice of every batch."""
    sc = SCENARIOS[scenario]()
    model = sc.model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)  # patch before wrapping
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=sc.lr)
    losses = []
    for step in range(STEPS):
        full = sc.batch(step)
        per = BATCH // world
        part = {k: v[rank * per : (rank + 1) * per] for k, v in full.items()}
        opt.zero_grad()
        loss = sc.loss(model, part)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    inner = model.module if world > 1 else model
    return losses, (sc.final or _reverse_and_state)(inner)


def worker(rank: int, world: int, scenarios: list[str], port: int, out: str) -> None:
    """One DDP rank: every scenario in turn in one process group (one spawn for the whole file)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for scenario in scenarios:
            try:
                losses, state = train(scenario, rank, world)
                result = {"losses": losses, "state": state}
            except Exception as exc:  # reported by the test for this scenario, the others still run
                result = {"error": f"{type(exc).__name__}: {exc}"}
            torch.save(result, os.path.join(out, f"{scenario}.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
