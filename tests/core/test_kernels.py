"""The small-batch linear computes the same product as nn.Linear for every row count and shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from draftwise.core.kernels import SmallBatchLinear, use_small_batch_linear


@pytest.mark.parametrize("rows", [1, 2, 7, 16, 48, 49, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_same_product_as_linear(rows, bias):
    torch.manual_seed(rows)
    reference = nn.Linear(64, 96, bias=bias)
    fast = nn.Sequential(nn.Linear(64, 96, bias=bias))
    fast[0].load_state_dict(reference.state_dict())
    assert use_small_batch_linear(fast) == 1 and isinstance(fast[0], SmallBatchLinear)
    x = torch.randn(1, rows, 64)
    torch.testing.assert_close(fast(x), reference(x), atol=1e-5, rtol=1e-5)
    assert fast(x).shape == (1, rows, 96)


def test_only_cpu_fp32_plain_linears_switch():
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4), nn.Embedding(3, 4))
    assert use_small_batch_linear(model) == 1
    assert type(model[0]) is nn.Linear
