"""An output head that skips all-zero input rows: the padded positions the packed decoder left.

``Linear(0) == bias`` exactly, so computing the head only on non-zero rows and writing the bias
(or zeros) elsewhere gives the same logits, without the dominant vocabulary-sized GEMM on padding.
Used only when the input does not require grad (its gradient at zero rows would differ).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def skip_zero_rows_forward(self: Any, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` computed only on rows of ``input`` that are not all zero."""
    if input.requires_grad and torch.is_grad_enabled():
        return nn.Linear.forward(self, input)
    flat = input.reshape(-1, input.shape[-1])
    rows = flat.ne(0).any(dim=-1).nonzero().squeeze(1)
    if rows.numel() == flat.shape[0]:
        return nn.Linear.forward(self, input)
    out = F.linear(flat.index_select(0, rows), self.weight, self.bias)
    full = out.new_empty(flat.shape[0], out.shape[-1])
    if self.bias is not None:
        full.copy_(self.bias.expand_as(full))
    else:
        full.zero_()
    full.index_copy_(0, rows, out)
    return full.view(*input.shape[:-1], out.shape[-1])


def plain_linear_head(root: Any) -> nn.Linear | None:
    """The model's output head when it is a plain ``nn.Linear`` (class forward, no instance override)."""
    get = getattr(root, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward or "forward" in head.__dict__:
        return None
    return head
