"""``Linear8bitLt`` with bitsandbytes' CPU strategy for inference too: dequantize, then matmul.

bitsandbytes 0.50 has no fast int8 matmul on the CPU: its LLM.int8 path there quantizes every
activation row through float16 and runs an emulated int8 matmul (measured on all-MiniLM-L6-v2:
3.7x slower than fp32, cosine to fp32 0.99921), while for training it already uses
dequantize-then-matmul (``MatMul8bitFp``: as fast as fp32 here, cosine 0.99959, the weights are
still stored in int8). This subclass uses that strategy for CPU inputs in eval mode as well; on
CUDA, and with ``int8_cpu_kernel="llm_int8"``, it is ``Linear8bitLt``'s forward, except that the
user's shared bias is never cast in place (see :mod:`patchkit_bnb.fourbit`). Importing this
module imports bitsandbytes: only :mod:`patchkit_bnb.quantize` does, lazily.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F

from .fourbit import call_keeping_bias


class PatchkitLinear8bitLt(bnb.nn.Linear8bitLt):
    """A ``bnb.nn.Linear8bitLt`` (same state dict, same PEFT dispatch) whose CPU forward dequantizes."""

    cpu_dequantize: bool = True  # class default; patchkit sets it per instance from the option

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize-then-matmul for CPU inputs when ``cpu_dequantize``; else bitsandbytes' forward."""
        weight = self.weight
        if not (self.cpu_dequantize and x.device.type == "cpu" and weight.dtype == torch.int8):
            return call_keeping_bias(self, bnb.nn.Linear8bitLt.forward, x, x.dtype)
        scb = getattr(weight, "SCB", None)
        if scb is None:  # bitsandbytes' own forward (e.g. a PEFT merge) may have moved it to the state
            scb = self.state.SCB
        if scb is None:
            # never quantized: bitsandbytes raises its own clear error
            return call_keeping_bias(self, bnb.nn.Linear8bitLt.forward, x, x.dtype)
        # int8 rows times their scales, produced in the input dtype in one pass (int8 * float -> float).
        dense = weight.data * (scb.float() * (1.0 / 127.0)).to(x.dtype).unsqueeze(1)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dense, bias)
