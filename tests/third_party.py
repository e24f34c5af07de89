"""Third-party patchers written the way outside plugin authors write them (no tests here).

They follow the public docs only and do what real tools do, which the core must survive without
trusting anything they declare:
- :func:`fused_qkv_patcher`: an attention patcher that fuses ``q_proj/k_proj/v_proj`` into one
  ``qkv_proj`` weight (what Liger-Kernel and unsloth do). Its state dict has another layout.
- :func:`int8_patcher`: a plain-torch int8 quantizer whose ``restore`` dequantizes (lossy), whose
  commit frees the original weight, and which has no guard of its own for ``load_state_dict``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import patchkit
from patchkit import PatchContext, Patcher


class _Rows(nn.Module):
    """Computes ``x @ W[start:stop].T`` from a fused linear: stands where q/k/v_proj stood."""

    def __init__(self, fused: nn.Linear, start: int, stop: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the fused weight is saved once, as qkv_proj
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.fused.bias[self.start : self.stop] if self.fused.bias is not None else None
        return F.linear(x, self.fused.weight[self.start : self.stop], bias)


def _fuse(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    q, k, v = module.q_proj, module.k_proj, module.v_proj
    replacement = patchkit.share_as(module, cls)
    weight = torch.cat([q.weight.detach(), k.weight.detach(), v.weight.detach()])  # a copy: new layout
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    fused.weight = nn.Parameter(weight, requires_grad=q.weight.requires_grad)
    for name in ("q_proj", "k_proj", "v_proj"):
        del replacement._modules[name]
    replacement.qkv_proj = fused
    a, b = q.out_features, q.out_features + k.out_features
    # The attention's own forward still calls self.q_proj(...): rows of the fused projection.
    object.__setattr__(replacement, "q_proj", _Rows(fused, 0, a))
    object.__setattr__(replacement, "k_proj", _Rows(fused, a, b))
    object.__setattr__(replacement, "v_proj", _Rows(fused, b, weight.shape[0]))
    return replacement


def fused_qkv_patcher(*, layout_view: bool = False, **kw: Any) -> Patcher:
    """Fuse q/k/v of every Llama attention. ``layout_view=True``: the replacement's state dict
    shows the original q/k/v layout (sliced from the fused weight), as a careful author might."""
    import transformers

    base = transformers.models.llama.modeling_llama.LlamaAttention

    class FusedAttention(base):  # type: ignore[misc, valid-type]
        pass

    class FusedAttentionOriginalLayout(base):  # type: ignore[misc, valid-type]
        def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
            out = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
            fused = out.pop(prefix + "qkv_proj.weight")
            for name in ("q_proj", "k_proj", "v_proj"):
                rows = self.__dict__[name]
                out[f"{prefix}{name}.weight"] = fused[rows.start : rows.stop]
            return out

    cls = FusedAttentionOriginalLayout if layout_view else FusedAttention

    def build(module: nn.Module, ctx: PatchContext) -> nn.Module:
        return _fuse(module, cls)

    kw.setdefault("name", "fused-qkv")
    kw.setdefault("kind", "attention")
    kw.setdefault("family", "fused")
    return Patcher(match=base, build=build, **kw)


class Int8Linear(nn.Module):
    """A plain-torch int8 linear: per-row absmax scales, the bias shared with the original."""

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(x.dtype) * self.scale.to(x.dtype), self.bias)


def _free(weight: torch.Tensor) -> None:
    weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)


def _put(original: nn.Linear, values: torch.Tensor) -> None:
    original.weight.data = values


def int8_patcher(
    *, fail_at: int | None = None, on_commit: Callable[[int], None] | None = None, **kw: Any
) -> tuple[Patcher, dict[str, int]]:
    """Quantize every ``nn.Linear``; ``restore`` dequantizes. ``fail_at``: raise in the n-th build.
    ``on_commit(n)``: called by the n-th commit step, after it freed its weight. Returns the
    patcher and its call counters (``build``, ``commit``, ``restore``)."""
    calls = {"build": 0, "commit": 0, "restore": 0}

    def commit(weight: torch.Tensor) -> None:
        _free(weight)
        calls["commit"] += 1
        if on_commit is not None:
            on_commit(calls["commit"])

    def build(module: nn.Module, ctx: PatchContext) -> nn.Module:
        calls["build"] += 1
        if calls["build"] == fail_at:
            raise RuntimeError(f"injected failure in build {fail_at}")
        layer = Int8Linear(module.weight.detach(), module.bias)
        ctx.on_commit(functools.partial(commit, module.weight))  # free the full-precision weight
        return layer

    def restore(original: nn.Module, replacement: nn.Module, ctx: PatchContext) -> Callable[[], None]:
        calls["restore"] += 1
        values = (replacement.qweight.float() * replacement.scale).to(original.weight.dtype)
        return functools.partial(_put, original, values)

    kw.setdefault("name", "int8")
    kw.setdefault("kind", "quantize")
    kw.setdefault("family", "tq8")
    return Patcher(match=nn.Linear, build=build, restore=restore, **kw), calls
