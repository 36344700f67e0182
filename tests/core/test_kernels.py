"""The small-batch linear computes the same product as nn.Linear for every row count and shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from draftwise.core.kernels import _CSRC, SmallBatchLinear, build_key, use_small_batch_linear


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


def test_build_key_covers_the_headers_beside_the_source(tmp_path):
    """A kernel built from csrc/*.cpp includes csrc/block_table.h: changing the header must rebuild it."""
    source = tmp_path / "k.cpp"
    source.write_text('#include "k.h"\n')
    bare = build_key(source, ["-O3"])
    (tmp_path / "k.h").write_text("const int a = 1;\n")
    with_header = build_key(source, ["-O3"])
    (tmp_path / "k.h").write_text("const int a = 2;\n")
    assert len({bare, with_header, build_key(source, ["-O3"]), build_key(source, ["-O2"])}) == 4
    assert (_CSRC / "block_table.h").is_file()  # the header the real kernels' key covers
