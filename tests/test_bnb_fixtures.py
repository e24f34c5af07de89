"""Shared helpers of the bitsandbytes tests (no tests here): tiny random models and comparisons."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def tiny_llama(**overrides: object) -> nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        **overrides,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(**overrides: object) -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        **overrides,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def tiny_falcon() -> nn.Module:
    cfg = transformers.FalconConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        new_decoder_architecture=True,
        num_kv_heads=2,
    )
    torch.manual_seed(0)
    return transformers.FalconForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "bert": tiny_bert, "falcon": tiny_falcon}


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(1))


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def snapshot(model: nn.Module) -> dict[str, object]:
    """Every module and parameter object by name, plus a copy of each parameter's values."""
    return {
        "modules": dict(model.named_modules(remove_duplicate=False)),
        "params": dict(model.named_parameters(remove_duplicate=False)),
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def assert_same_objects(model: nn.Module, snap: dict[str, object]) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    assert modules.keys() == snap["modules"].keys()  # type: ignore[attr-defined]
    assert all(modules[k] is v for k, v in snap["modules"].items())  # type: ignore[attr-defined]
    assert params.keys() == snap["params"].keys()  # type: ignore[attr-defined]
    assert all(params[k] is v for k, v in snap["params"].items())  # type: ignore[attr-defined]
