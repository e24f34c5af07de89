"""The varlen kernels: reference numerics, torch signature adaptation, backend resolution, extension hook."""

from __future__ import annotations

import inspect
import math
import types

import patchkit_flash2
import pytest
import torch
from patchkit_flash2 import backends
from transformers import LlamaConfig, LlamaForCausalLM

import patchkit
from patchkit import AttentionBackend, Registry, UnsupportedError
from patchkit.attention_backends import resolve_backend


def naive(q, k, v, cu_q, cu_k, scale, causal, window=(-1, -1), slopes=None):
    """Dense loops over every (query, key) pair: the definition the kernels must meet."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    for s in range(len(cu_q) - 1):
        nq, nk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        for h in range(q.shape[1]):
            for i in range(nq):
                scores = []
                for j in range(nk):
                    qpos = i + nk - nq
                    ok = (not causal or j <= qpos) and (window[0] < 0 or j >= qpos - window[0])
                    score = (q[cu_q[s] + i, h] @ k[cu_k[s] + j, h // groups]).item() * scale
                    if slopes is not None:
                        score -= slopes[h].item() * abs(qpos - j)
                    scores.append(score if ok else -math.inf)
                p = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).to(q.dtype)
                out[cu_q[s] + i, h] = p @ v[cu_k[s] : cu_k[s + 1], h // groups]
    return out


CASES = {
    "causal": dict(lq=[3, 5], lk=[3, 5], causal=True),
    "decode": dict(lq=[1, 2], lk=[4, 6], causal=True),
    "window": dict(lq=[6, 4], lk=[6, 4], causal=True, window=(2, 0)),
    "bidirectional": dict(lq=[3, 2], lk=[3, 2], causal=False),
    "alibi": dict(lq=[5, 3], lk=[5, 3], causal=True, slopes=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_reference_matches_definition(case, kv_heads):
    c = CASES[case]
    gen = torch.Generator().manual_seed(0)
    cu_q = [0, *torch.tensor(c["lq"]).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(c["lk"]).cumsum(0).tolist()]
    q = torch.randn(cu_q[-1], 4, 8, generator=gen)
    k = torch.randn(cu_k[-1], kv_heads, 8, generator=gen)
    v = torch.randn(cu_k[-1], kv_heads, 8, generator=gen)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if c.get("slopes") else None
    window = c.get("window", (-1, -1))
    got = backends.reference_varlen(
        q,
        k,
        v,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
        max_seqlen_q=max(c["lq"]),
        max_seqlen_k=max(c["lk"]),
        scale=0.3,
        causal=c["causal"],
        window=window,
        alibi_slopes=slopes,
    )
    want = naive(q, k, v, cu_q, cu_k, 0.3, c["causal"], window, slopes)
    assert (got - want).abs().max() <= 1e-5


def _fake_kernel(signature_of: str):
    """Stand-ins for torch's CUDA varlen kernel with the signatures of different torch releases
    (a CUDA kernel is the one thing tests may mock); they compute with the reference."""
    calls = []

    def compute(q, k, v, cu_q, cu_k, max_q, max_k, scale, window):
        assert k.shape[1] == q.shape[1] or signature_of == "2.13", "kernel without enable_gqa got GQA"
        calls.append(dict(scale=scale, window=window, heads=(q.shape[1], k.shape[1])))
        return backends.reference_varlen(
            q,
            k,
            v,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            scale=scale,
            causal=window[1] == 0,
            window=(window[0], -1),
        )

    if signature_of == "2.13":

        def kernel(
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            *,
            return_aux=None,
            scale=None,
            window_size=(-1, -1),
            enable_gqa=False,
            seqused_k=None,
        ):
            return compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size)
    elif signature_of == "2.11":

        def kernel(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
        ):
            return compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size)
    else:  # an early form: is_causal, no scale, no window

        def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            default = 1 / math.sqrt(query.shape[-1])
            return compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, default, (-1, 0 if is_causal else -1))

    return kernel, calls


@pytest.mark.parametrize("signature_of", ["2.13", "2.11", "2.10"])
def test_torch_backend_adapts_to_signature(monkeypatch, signature_of):
    kernel, calls = _fake_kernel(signature_of)
    params = frozenset(inspect.signature(kernel).parameters)
    monkeypatch.setattr(backends, "_torch_varlen", lambda: (kernel, params))
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    q = torch.randn(9, 4, 8, generator=gen)
    k, v = torch.randn(9, 2, 8, generator=gen), torch.randn(9, 2, 8, generator=gen)
    args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5, scale=0.2, causal=True)
    got = backends.torch_varlen(q, k, v, **args)
    want = backends.reference_varlen(q, k, v, **args)
    assert (got - want).abs().max() <= 1e-5
    assert calls[0]["heads"] == ((4, 2) if signature_of == "2.13" else (4, 4))
    assert ("window" in backends.torch_features()) == (signature_of != "2.10")


def test_resolve_never_picks_reference_and_explains():
    found = {b.name: b for b in backends.all_backends()}
    with pytest.raises(UnsupportedError) as err:
        resolve_backend(found, "auto", torch.device("cpu"), torch.float32)
    text = str(err.value)
    assert "flash_attn:" in text and "torch:" in text and "backend='reference'" in text
    assert resolve_backend(found, "reference", torch.device("cpu"), torch.float32).name == "reference"
    with pytest.raises(UnsupportedError, match="does not support alibi"):
        resolve_backend(found, "torch", torch.device("cuda"), torch.bfloat16, frozenset({"alibi"}))
    with pytest.raises(UnsupportedError, match="unknown attention backend"):
        resolve_backend(found, "nope", torch.device("cpu"), torch.float32)


def test_flash_attn_reason_names_the_extra():
    reason = backends._flash_attn_unavailable(torch.device("cuda"), torch.bfloat16, frozenset())
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert "pip install 'patchkit[flash]'" in reason


def test_plugin_registers_backends_through_entry_points():
    info = {p.name: p for p in patchkit.plugins()}["flash2"]
    assert info.status == "loaded"
    assert set(info.backends) == {"flash_attn", "torch", "reference"}
    assert set(info.patchers) == {"flash2-llama", "flash2-falcon", "flash2-generic"}


def test_third_party_backend_is_picked_by_auto():
    """A kernel from another plugin joins backend='auto' through the hook (here: CPU-capable)."""
    used = []

    def kernel(q, k, v, **kw):
        used.append(q.shape)
        return backends.reference_varlen(q, k, v, **kw)

    extra = types.ModuleType("pk_test_kernel")

    @patchkit.hookimpl
    def register_attention_backends(register):
        register(
            AttentionBackend(
                name="cpu-test",
                varlen=kernel,
                unavailable=lambda d, t, n: None,
                priority=5,
                features=frozenset({"backward", "gqa", "window"}),
            )
        )

    extra.register_attention_backends = register_attention_backends
    registry = Registry()
    registry.add_plugin(patchkit_flash2, name="flash2")
    registry.add_plugin(extra, name="pk_test_kernel")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            use_cache=False,
        )
    ).eval()
    patchkit.apply(model, attention="flash2", registry=registry)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 5)), attention_mask=torch.tensor([[1] * 5, [0, 1, 1, 1, 1]]))
    assert used and used[0][0] == 9  # packed: 5 + 4 valid tokens
