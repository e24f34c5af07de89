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

from patchkit.paths import LOG_ATTR


def _runs(valid: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of every run of consecutive True rows (one host sync)."""
    edge = valid.new_zeros(1, dtype=torch.int8)
    step = torch.diff(valid.to(torch.int8), prepend=edge, append=edge)
    starts, ends = (step == 1).nonzero().squeeze(1), (step == -1).nonzero().squeeze(1)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _fill(rows: torch.Tensor, bias: torch.Tensor | None) -> None:
    if rows.shape[0]:
        rows.copy_(bias.expand_as(rows)) if bias is not None else rows.zero_()


def skip_zero_rows_forward(self: Any, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` computed only on rows of ``input`` that are not all zero.

    Each run of non-zero rows (a sequence, once the packed decoder re-padded) is one GEMM written
    straight into its rows of the output; only the gaps get the bias. Ragged masks with short
    runs gather the rows into one GEMM instead.
    """
    log = self.__dict__.get(LOG_ATTR)
    if log is not None and log.last != "packed":  # the decoder ran its original path: no zero rows
        return nn.Linear.forward(self, input)
    if (input.requires_grad and torch.is_grad_enabled()) or torch.is_autocast_enabled(input.device.type):
        return nn.Linear.forward(self, input)
    flat = input.reshape(-1, input.shape[-1])
    n = flat.shape[0]
    valid = flat.ne(0).any(dim=-1)
    runs = _runs(valid)
    if runs == [(0, n)] or self.weight.dtype != input.dtype:
        return nn.Linear.forward(self, input)
    out = flat.new_empty(n, self.out_features)
    if runs and sum(b - a for a, b in runs) < 32 * len(runs):  # short runs: one gathered GEMM beats many tiny ones
        rows = valid.nonzero().squeeze(1)
        _fill(out, self.bias)
        out.index_copy_(0, rows, _gathered_linear(flat, rows, self.weight, self.bias))
        return out.view(*input.shape[:-1], self.out_features)
    done = 0
    for a, b in runs:
        _fill(out[done:a], self.bias)
        if self.bias is not None:
            torch.addmm(self.bias, flat[a:b], self.weight.t(), out=out[a:b])
        else:
            torch.mm(flat[a:b], self.weight.t(), out=out[a:b])
        done = b
    _fill(out[done:], self.bias)
    return out.view(*input.shape[:-1], self.out_features)


# The CPU GEMM takes a slow kernel for a few small row counts (vocabulary-sized head, 2 threads:
# 11 rows 31.9 ms, 12 rows 17.8 ms, 16 rows 21.6 ms; 3 and 7 rows as slow as 11): below 16 rows
# the gather is rounded up to a multiple of 4 with a repeated row, whose result is dropped.
_ROUND_ROWS_BELOW = 16


def _gathered_linear(
    flat: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear`` of the ``rows`` of ``flat``, with the row count rounded up on the CPU (see above)."""
    count = rows.shape[0]
    if flat.device.type == "cpu" and 0 < count < _ROUND_ROWS_BELOW and count % 4:
        rows = torch.cat([rows, rows[-1:].expand(4 - count % 4)])
    return F.linear(flat.index_select(0, rows), weight, bias)[:count]


def plain_linear_head(root: Any) -> nn.Linear | None:
    """The model's output head when it is a plain ``nn.Linear`` (class forward, no instance override)."""
    get = getattr(root, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward or "forward" in head.__dict__:
        return None
    return head
