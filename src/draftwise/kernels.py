"""Faster CPU matmuls for the few-token forwards that tree verification and tree drafting are made of.

PyTorch's CPU `linear` (addmm) for 2 to ~48 activation rows runs 1.5-2.5x slower than the same product
computed as W @ x^T, which streams the weight matrix once (benchmarks/RESULTS.md, "small-batch linear").
One token (plain decoding) and long prefills keep the stock kernel, which is fastest there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SMALL_BATCH = range(2, 49)


def small_batch_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T (+ bias), as W x^T for 2-48 rows."""
    rows = x.numel() // x.shape[-1]
    if rows not in SMALL_BATCH:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, -1).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class SmallBatchLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return small_batch_linear(x, self.weight, self.bias)


def use_small_batch_linear(model: nn.Module) -> int:
    """Switch every plain nn.Linear of `model` on CPU in fp32 to SmallBatchLinear (same weights, in place).
    Returns how many were switched; other devices and dtypes are left alone (not measured there)."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = SmallBatchLinear
            switched += 1
    return switched
