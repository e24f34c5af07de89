"""flash2 on a CUDA GPU (run by bench/gpu_check.py; skipped without one): full rows take torch's dense
SDPA flash kernel, padded rows the varlen kernel, both as transformers' SDPA computes them."""

from __future__ import annotations

import copy

import pytest
import torch

import patchkit

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def llama_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    return base, copy.deepcopy(base)


@pytest.mark.parametrize("with_mask", [False, True])
def test_full_rows_run_dense_sdpa_and_equal_hf_sdpa(with_mask: bool) -> None:
    base, fast = llama_pair()
    patchkit.apply(fast, attention="flash2", backend="torch")
    ids = torch.randint(3, 1000, (2, 300), device="cuda")
    kw = {"attention_mask": torch.ones_like(ids)} if with_mask else {}
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        got = fast(ids, **kw).logits
    with torch.inference_mode():
        want = base(ids, **kw).logits
    ops = {e.key for e in prof.key_averages()}
    assert not any("varlen" in op for op in ops), sorted(ops)  # the dense kernel, not the varlen one
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_padded_rows_still_match_hf_sdpa() -> None:
    base, fast = llama_pair()
    patchkit.apply(fast, attention="flash2", backend="torch")
    ids = torch.randint(3, 1000, (2, 300), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 200:] = 0
    with torch.inference_mode():
        got = fast(ids, attention_mask=mask).logits
        want = base(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (got[keep].float() - want[keep].float()).abs().max() < 0.1
