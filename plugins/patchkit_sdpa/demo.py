"""The sdpa plugin's ``patchkit demo``: a MiniLM-shaped BERT encoder on a padded batch.

The model is built from the config below with random weights (nothing is downloaded): the shape
of all-MiniLM-L6-v2, a sentence-embedding encoder, run on a right-padded batch as a server would;
the baseline is transformers' own SDPA path.
"""

from __future__ import annotations

from typing import Any

import torch

from patchkit import Demo, DemoCase

CONFIG: dict[str, Any] = {
    "model_type": "bert",
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
}


def build(quick: bool) -> DemoCase:
    """The model (eval mode), a padded batch (8x64 quick, else 32x256), ``attention="sdpa"``."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(**CONFIG)
    model = AutoModel.from_config(config, attn_implementation="sdpa").eval()
    batch, seq = (8, 64) if quick else (32, 256)
    lengths = torch.randint(seq // 10, seq + 1, (batch,))
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, config.vocab_size, (batch, seq)) * mask
    padding = 1 - mask.float().mean().item()
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    return DemoCase(
        model=model,
        inputs={"input_ids": ids, "attention_mask": mask},
        apply={"attention": "sdpa"},
        output=lambda out: out.last_hidden_state,
        valid=mask.bool(),
        tolerance=1e-4,
        lines=[
            f"model: {type(model).__name__}, {millions:.1f}M parameters, all-MiniLM-L6-v2 shape, random init",
            "baseline: transformers' own SDPA path",
            f"batch: {batch} x {seq} tokens, {padding:.0%} padding (right-padded); compared: real tokens",
        ],
    )


DEMO = Demo(name="minilm", build=build, description="padding-free SDPA on a MiniLM-shaped BERT encoder")
