"""Faster CPU matmuls for the few-token forwards that tree verification and tree drafting are made of.

PyTorch's CPU `linear` (addmm) for 2 to ~48 activation rows runs 1.5-2.5x slower than the same product
computed as W @ x^T, which streams the weight matrix once (benchmarks/RESULTS.md, "small-batch linear").
One token (plain decoding) and long prefills keep the stock kernel, which is fastest there.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

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


# --- GGUF-grid matmul for AVX2 CPUs (csrc/grid_matmul.cpp) -------------------------------------------------------

_GRID_SOURCE = Path(__file__).resolve().parent / "csrc" / "grid_matmul.cpp"
_grid_module = None


def cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def grid_kernel():
    """The compiled grid-matmul extension, built once per machine (~1 min, cached under the draftwise cache),
    or None where it cannot be: no AVX2/FMA, no C++ compiler, or DRAFTWISE_GRID_KERNEL=0."""
    global _grid_module
    if _grid_module is None:
        _grid_module = False
        if os.environ.get("DRAFTWISE_GRID_KERNEL", "1") != "0" and cpu_has_avx2_fma():
            from torch.utils import cpp_extension

            from draftwise.models import cache_dir

            build = cache_dir() / "kernels" / f"torch-{torch.__version__}"
            build.mkdir(parents=True, exist_ok=True)
            if not any(build.glob("*.so")):
                print("[draftwise] building the AVX2 grid kernel (once per machine, ~1 min)", file=sys.stderr)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    _grid_module = cpp_extension.load(
                        "draftwise_grid_matmul",
                        [str(_GRID_SOURCE)],
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                        build_directory=str(build),
                    )
            except Exception as error:  # no compiler, no headers: the stock int4 kernel stays
                warnings.warn(
                    f"draftwise: grid kernel not built ({type(error).__name__}); using torch's int4 kernel",
                    stacklevel=2,
                )
    return _grid_module or None
