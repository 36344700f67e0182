"""Faster CPU matmuls for the few-token forwards that tree verification and tree drafting are made of.

PyTorch's CPU `linear` (addmm) for 2 to ~48 activation rows runs slower than the same product computed as
W @ x^T, which streams the weight matrix once (docs/results.md, "small-batch linear").
One token (plain decoding) and long prefills keep the stock kernel, which is fastest there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import cache_lock, publish_file, remove_leftovers
from draftwise.core.machine import cache_dir, cpu_has_avx2_fma, cpu_has_avx512_vnni

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


# --- GGUF-grid matmuls (csrc/): built on first use, once per machine --------------------------------------------

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_built: dict[str, object] = {}


AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vnni"]


def compile_flags(isa_flags: list[str]) -> list[str]:
    """The C++ flags every kernel builds with: no contracted FMAs, which would change the bits a row gets."""
    return ["-O3", "-ffp-contract=off", *isa_flags, "-fopenmp"]


def _import_extension(module_name: str, path: Path):
    """Load the compiled module `module_name` from the shared library at `path`."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_key(source: Path, cflags: list[str]) -> str:
    """What a built extension depends on, hashed: the C++ file `source`, every header beside it (the kernels
    include csrc/block_table.h), the flags, and the Python and torch versions."""
    headers = sorted(source.parent.glob("*.h"))
    parts = [source.read_text(), *(f"{h.name}\0{h.read_text()}" for h in headers), *cflags]
    parts += [torch.__version__, sys.version, sysconfig.get_platform()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_extension(module_name: str, source: Path, cflags: list[str], what: str):
    """The extension `module_name` compiled from the C++ file `source`, built once per machine and cached as
    <cache>/kernels/torch-<version>/<module_name>-<key>.so (`build_key`: a changed source or header builds afresh).

    One process builds at a time, under an OS-level lock that a killed build does not leave behind, in a build
    directory of its own (torch's own `lock` file there would make every later build wait forever were it left
    behind by a kill); the finished library is renamed into place, so the cache holds a whole one or none."""
    from torch.utils import cpp_extension  # pulls in setuptools: imported only when a kernel is built

    key = build_key(source, cflags)
    root = cache_dir() / "kernels" / f"torch-{torch.__version__}"
    library = root / f"{module_name}-{key}.so"
    if library.is_file():
        return _import_extension(module_name, library)
    root.mkdir(parents=True, exist_ok=True)
    with cache_lock(cache_dir() / "locks" / f"{module_name}.lock", f"building the {what}"):
        if library.is_file():  # built by another process while this one waited
            return _import_extension(module_name, library)
        remove_leftovers(root, f".build-{module_name}-*")  # what a killed build left
        print(f"[draftwise] building the {what} (once per machine, ~1 min)", file=sys.stderr, flush=True)
        build = Path(tempfile.mkdtemp(prefix=f".build-{module_name}-", dir=root))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                module = cpp_extension.load(
                    module_name,
                    [str(source)],
                    extra_cflags=cflags,
                    extra_include_paths=[str(source.parent)],  # the headers the key covers
                    build_directory=str(build),
                )
            publish_file(build / f"{module_name}.so", library)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return module


def _extension(name: str, what: str, flags: list[str], runs_here: bool, switch: str):
    """The compiled extension csrc/<name>.cpp, built once per machine (cached under the draftwise cache),
    or None where it cannot be: the CPU lacks the instructions, no C++ compiler, or the env `switch` is 0.
    A DraftwiseError (another process held the build lock too long) propagates."""
    if name not in _built:
        module = None
        if os.environ.get(switch, "1") != "0" and runs_here:
            try:
                module = build_extension(f"draftwise_{name}", _CSRC / f"{name}.cpp", compile_flags(flags), what)
            except DraftwiseError:
                raise
            except Exception as error:  # no compiler, no headers: the stock kernels stay
                warnings.warn(f"draftwise: {what} not built ({type(error).__name__}); using torch's", stacklevel=3)
        _built[name] = module
    return _built[name]


def grid_kernel():
    """fp32 activations x the GGUF's exact Q4_1 / Q8_0 values, for AVX2 CPUs (csrc/grid_matmul.cpp);
    DRAFTWISE_GRID_KERNEL=0 disables it."""
    flags = ["-mavx2", "-mfma"]
    return _extension("grid_matmul", "AVX2 grid kernel", flags, cpu_has_avx2_fma(), "DRAFTWISE_GRID_KERNEL")


def avx512_kernel():
    """For AVX-512 VNNI CPUs (csrc/avx512.cpp): `vnni_matmul`, int8 activations x the GGUF's Q4_1 / Q8_0 codes in
    int32, as llama.cpp computes them, and `attention`, which gives each query row the same bits whatever rows come
    with it; DRAFTWISE_AVX512_KERNEL=0 disables them."""
    return _extension("avx512", "AVX-512 kernels", AVX512_FLAGS, cpu_has_avx512_vnni(), "DRAFTWISE_AVX512_KERNEL")
