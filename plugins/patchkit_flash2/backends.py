"""The three varlen kernels this plugin offers: ``flash_attn``, ``torch`` and ``reference``.

Every kernel follows :class:`patchkit.AttentionBackend`'s contract: packed ``[total, heads, dim]``
tensors, int32 ``cu_seqlens``, causal masks aligned bottom-right, ``window=(left, right)`` as in
flash-attn (``-1`` = unbounded), ALiBi as ``-slope * (distance)`` added to the scaled scores.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F

from patchkit.toolkit import AttentionBackend, grouped_sdpa, plan_groups

HALF = (torch.float16, torch.bfloat16)


def _device_type(device: Any) -> str:
    return torch.device(device).type


# -- reference ------------------------------------------------------------------------------------
def _allowed(nq: int, nk: int, causal: bool, window: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    """Boolean ``[nq, nk]`` mask (True = attend) for bottom-right causal / windowed attention, or None."""
    left, right = window
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    # query i sits at key position i + nk - nq (bottom-right alignment, as flash-attn)
    qpos = torch.arange(nq, device=device).unsqueeze(1) + (nk - nq)
    kpos = torch.arange(nk, device=device).unsqueeze(0)
    ok = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= kpos <= qpos + right
    if left >= 0:
        ok &= kpos >= qpos - left
    return ok


def reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    dropout: float = 0.0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Pure-PyTorch varlen attention: a few masked ``scaled_dot_product_attention`` calls over groups
    of similar-length sequences (:mod:`patchkit.varlen`, shared with the sdpa plugin); one call per
    sequence with ALiBi or a soft cap.

    Runs on any device and dtype (GQA by repeating KV heads); exact up to SDPA's own rounding.
    ``softcap > 0`` caps the logits as Gemma 2 does (``softcap * tanh(scores / softcap)``, before
    the mask), computed explicitly instead of through SDPA.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    groups = heads // kv_heads
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lq = {cq[i + 1] - cq[i] for i in range(len(cq) - 1)}
    lk = {ck[i + 1] - ck[i] for i in range(len(ck) - 1)}
    if len(lq) == 1 and len(lk) == 1 and alibi_slopes is None:
        # equal lengths (no padding): one batched call, [N, H, n, D]
        nq, nk = lq.pop(), lk.pop()
        if nq == 0:
            return q.new_zeros(q.shape)
        qb, kb, vb = (x.view(-1, n, x.shape[1], x.shape[2]).transpose(1, 2) for x, n in ((q, nq), (k, nk), (v, nk)))
        out = _sdpa(qb, kb, vb, nq, nk, scale, causal, window, None, dropout, groups, softcap)
        return out.transpose(1, 2).reshape(q.shape)
    pairs = [(cq[i + 1] - cq[i], ck[i + 1] - ck[i]) for i in range(len(cq) - 1)]
    if alibi_slopes is None and not softcap and (causal or window[1] < 0) and all(a <= b for a, b in pairs):
        # the common case: a few masked calls over groups of similar-length sequences (patchkit.varlen)
        groups_ = plan_groups(cq, ck, causal=causal, window_left=window[0], device=q.device)
        return grouped_sdpa(q, k, v, groups_, scale=scale, dropout=dropout)
    outs = []
    for i in range(len(cq) - 1):
        nq, nk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        if nq == 0:
            continue
        qi, ki, vi = (
            x[a:b].transpose(0, 1).unsqueeze(0)
            for x, a, b in ((q, cq[i], cq[i + 1]), (k, ck[i], ck[i + 1]), (v, ck[i], ck[i + 1]))
        )  # [1, H, n, D]
        out = _sdpa(qi, ki, vi, nq, nk, scale, causal, window, alibi_slopes, dropout, groups, softcap)
        outs.append(out[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    nq: int,
    nk: int,
    scale: float,
    causal: bool,
    window: tuple[int, int],
    alibi_slopes: torch.Tensor | None,
    dropout: float,
    groups: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    """One SDPA call on 4D ``[N, H, n, D]`` tensors (4D keeps CPU/CUDA fused kernels eligible)."""
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    plain_causal = causal and nq == nk and window[0] < 0 and alibi_slopes is None
    ok = None if plain_causal else _allowed(nq, nk, causal, window, q.device)
    bias: torch.Tensor | None = None
    if alibi_slopes is not None:
        qpos = torch.arange(nq, device=q.device).unsqueeze(1) + (nk - nq)
        dist = (qpos - torch.arange(nk, device=q.device).unsqueeze(0)).abs().to(torch.float32)
        bias = (-alibi_slopes.to(device=q.device, dtype=torch.float32).view(-1, 1, 1) * dist).to(q.dtype)
        if ok is not None:
            bias = bias.masked_fill(~ok, torch.finfo(q.dtype).min)
    elif ok is not None:
        bias = ok
    if softcap:
        return _capped(
            q,
            k,
            v,
            scale,
            softcap,
            ok if plain_causal is False else _allowed(nq, nk, True, window, q.device),
            bias if bias is not None and bias.dtype != torch.bool else None,
            dropout,
        )
    simple_causal = plain_causal and bias is None
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if simple_causal else bias, dropout_p=dropout, is_causal=simple_causal, scale=scale
    )


def _capped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    softcap: float,
    ok: torch.Tensor | None,
    additive: torch.Tensor | None,
    dropout: float,
) -> torch.Tensor:
    """Attention with soft-capped logits, in transformers' eager order: scale, cap, mask, softmax in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if additive is not None:
        scores = scores + additive
    if ok is not None:
        scores = scores.masked_fill(~ok, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)


def _reference_unavailable(device: Any, dtype: Any, needs: frozenset[str]) -> str | None:
    return None


# -- torch.nn.attention.varlen ------------------------------------------------------------------
@functools.cache
def _torch_varlen() -> tuple[Any, frozenset[str]] | None:
    """``(varlen_attn, its keyword parameters)`` or None when this torch has no varlen kernel."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def torch_features() -> frozenset[str]:
    """What this torch's ``varlen_attn`` can do, read off its signature (differs across releases)."""
    found = _torch_varlen()
    if found is None:
        return frozenset()
    params = found[1]
    features = {"backward", "gqa"}
    if "window_size" in params:
        features.add("window")
    return frozenset(features)


def torch_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """PyTorch's FlashAttention-2 varlen kernel, adapting to the signature this torch has."""
    found = _torch_varlen()
    if found is None:
        raise RuntimeError("torch.nn.attention.varlen is missing (torch >= 2.10 needed)")
    if alibi_slopes is not None or dropout:
        raise RuntimeError("torch varlen_attn supports neither ALiBi nor attention dropout")
    varlen_attn, params = found
    kwargs: dict[str, Any] = {}
    left, right = window
    if causal:
        right = 0
    if "window_size" in params:
        kwargs["window_size"] = (left, right)
    elif left >= 0 or (right >= 0 and not causal):
        raise RuntimeError("this torch's varlen_attn has no window_size")
    else:
        kwargs["is_causal"] = causal
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # the kernel then uses 1/sqrt(dim): fold the difference into q
        q = q * (scale * math.sqrt(q.shape[-1]))
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # torch 2.11: no GQA, repeat KV heads
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    out = varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _cuda_problem(device: Any, dtype: Any, what: str) -> str | None:
    """Every reason ``what`` (a CUDA fp16/bf16 kernel) cannot run here, each with what to change."""
    kind = _device_type(device)
    problems = []
    if kind not in ("cuda", "meta"):
        problems.append("a CUDA GPU (move the model: model.cuda())")
    elif kind == "cuda" and not torch.cuda.is_available():
        problems.append("a CUDA-enabled torch build")
    if dtype not in HALF:
        problems.append(f"fp16/bf16 weights, not {dtype} (cast: model.to(torch.bfloat16))")
    if not problems and kind == "cuda":
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if major < 8:
            problems.append(f"an Ampere or newer GPU (sm80+), this one is sm{major}{minor}")
    return f"{what} needs " + " and ".join(problems) if problems else None


def _torch_unavailable(device: Any, dtype: Any, needs: frozenset[str]) -> str | None:
    if _torch_varlen() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10 needed): upgrade torch"
    return _cuda_problem(device, dtype, "torch varlen_attn")


# -- flash_attn --------------------------------------------------------------------------------
def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    dropout: float = 0.0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The flash-attn package's ``flash_attn_varlen_func`` (GQA, windows, ALiBi, dropout, softcap)."""
    from flash_attn import flash_attn_varlen_func

    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=q.device, dtype=torch.float32)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=causal,
        window_size=window,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
    )


def _flash_attn_unavailable(device: Any, dtype: Any, needs: frozenset[str]) -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed: pip install 'patchkit[flash]'"
    return _cuda_problem(device, dtype, "flash_attn")


def all_backends() -> list[AttentionBackend]:
    """The kernels registered through ``register_attention_backends``."""
    return [
        AttentionBackend(
            name="flash_attn",
            varlen=flash_attn_varlen,
            unavailable=_flash_attn_unavailable,
            priority=20,
            features=frozenset({"backward", "gqa", "window", "alibi", "dropout", "softcap"}),
            description="flash-attn's flash_attn_varlen_func (CUDA, fp16/bf16, sm80+)",
            packages={"flash-attn": ">=2.5"},
        ),
        AttentionBackend(
            name="torch",
            varlen=torch_varlen,
            unavailable=_torch_unavailable,
            priority=10,
            features=torch_features(),
            description="torch.nn.attention.varlen.varlen_attn (torch >= 2.10, CUDA, fp16/bf16, sm80+)",
        ),
        AttentionBackend(
            name="reference",
            varlen=reference_varlen,
            unavailable=_reference_unavailable,
            priority=0,
            auto=False,
            features=frozenset({"backward", "gqa", "window", "alibi", "dropout", "softcap"}),
            description="pure PyTorch, one SDPA call per sequence; any device and dtype (tests, CPU)",
        ),
    ]
