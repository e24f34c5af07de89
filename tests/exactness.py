"""Shared helpers of the exactness tests (no tests here): tiny real models and a full-state fingerprint."""

from __future__ import annotations

import io
import types
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn

import patchkit
from patchkit import Patcher, Registry


def tiny_llama(**over: Any) -> nn.Module:
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg.update(num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **over})).eval()


def tiny_mistral(layers: int = 2) -> nn.Module:
    cfg = transformers.MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        sliding_window=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).eval()


def tiny_falcon(layers: int = 2) -> nn.Module:
    cfg = transformers.FalconConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=128,
        new_decoder_architecture=True,
        num_kv_heads=2,
    )
    torch.manual_seed(0)
    return transformers.FalconForCausalLM(cfg).eval()


def tiny_bert(cls: type = transformers.BertModel, **over: Any) -> nn.Module:
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    cfg = transformers.BertConfig(**{**base, **over})
    torch.manual_seed(0)
    return cls(cfg).eval()


def tiny_opt(layers: int = 2) -> nn.Module:
    cfg = transformers.OPTConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=layers,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        dropout=0.0,
    )
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg).eval()


def batch(length: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 128, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, : length // 3] = 0  # left padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = model(**(inputs or batch()))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def full_state(model: nn.Module) -> dict[str, Any]:
    """Everything a failed apply or a reverse must leave as it was: state bytes, module and
    parameter objects and classes, hooks, instance attributes, config."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    cfg = getattr(model, "config", None)
    return {
        "state": buf.getvalue(),
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "params": [
            (n, id(p), p.dtype, tuple(p.shape), p.requires_grad)
            for n, p in model.named_parameters(remove_duplicate=False)
        ],
        "hooks": [
            tuple(
                tuple(getattr(m, d).items())
                for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_load_state_dict_pre_hooks")
            )
            for m in model.modules()
        ],
        "instance": [sorted(m.__dict__) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "config": None if cfg is None else (cfg.to_json_string(), sorted(vars(cfg)), cfg._attn_implementation),
    }


def registry_plus(*extra: Patcher) -> Registry:
    """The installed plugins (real entry points) plus ``extra`` patchers from a test plugin."""
    registry = Registry()
    registry.load_entry_points()
    plugin = types.ModuleType("exactness_test_plugin")

    @patchkit.hookimpl
    def register_patchers(register: Callable[[Any], None]) -> None:
        for patcher in extra:
            register(patcher)

    plugin.register_patchers = register_patchers  # type: ignore[attr-defined]
    registry.add_plugin(plugin, name="exactness_test_plugin")
    return registry


def failing_patcher() -> Patcher:
    """A patcher of family "boom" that matches embeddings and always fails in build."""

    def build(module: nn.Module, ctx: patchkit.PatchContext) -> nn.Module:
        raise RuntimeError("injected build failure")

    return Patcher(name="boom", kind="other", family="boom", match=nn.Embedding, build=build)
