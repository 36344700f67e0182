"""The lean target's linear layers, and a drafter's: one class per way a weight is stored and multiplied.

`Dense` is the plain product. Weights that lie on a GGUF 4-bit or 8-bit block grid keep that grid: in bf16 they
run through PyTorch's int4 kernel (`Int4Groups`); in fp32 on an AVX2 CPU, through draftwise's own kernel
(`GridLinear`), which gives each row the same bits whatever the rows beside it; on a CPU with AVX-512 VNNI,
`VnniLinear` multiplies int8-rounded activations by the grid's codes in int32, as llama.cpp does, again the same
bits for each row whatever surrounds it, so trees verify token for token. `quantize_draft_linears` puts a
drafter's linears on the nearest such grid (lossy, which a drafter may be).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftwise.core.kernels import avx512_kernel, grid_kernel, small_batch_linear
from draftwise.core.machine import cpu_has_native_bf16

GROUP = 32  # GGUF block size along the input


class Dense:
    """y = x W^T in the compute dtype; in fp32 on CPU, few-row products as W x^T (see core/kernels.py)."""

    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        self.weight = weight.to(dtype).contiguous()
        fp32_cpu = dtype == torch.float32 and weight.device.type == "cpu"
        self.linear = small_batch_linear if fp32_cpu else F.linear

    def __call__(self, x: Tensor) -> Tensor:
        return self.linear(x, self.weight)


class Grid(NamedTuple):
    """A weight on a GGUF block grid, groups of 32 along the input: w = scale * code + low (Q4_1, codes 0..15)
    or w = scale * code (Q8_0, codes -127..127, low None). codes (rows, cols), scale and low (rows, cols / 32)."""

    codes: Tensor
    scale: Tensor
    low: Tensor | None

    def flat(self) -> Grid:
        """From `_nearest_q4_1`'s grouped shapes (rows, groups, 32 | 1) to the documented ones."""
        rows = self.codes.shape[0]
        low = None if self.low is None else self.low[..., 0]
        return Grid(self.codes.reshape(rows, -1), self.scale[..., 0], low)


def _nearest_q4_1(weight: Tensor) -> tuple[Tensor, Grid]:
    """(weight in groups of 32, its nearest Q4_1-style grid: 16 levels from each group's min to its max)."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    codes = torch.round((groups - low) / scale.clamp_min(1e-30)).clamp(0, 15)
    return groups, Grid(codes, scale, low)


def gguf_grid(weight: Tensor) -> Grid | None:
    """The Q4_1 or Q8_0 grid an fp32 CPU `weight` lies on exactly (checked per group, with the GGUF's own
    dequantization: an fp32 multiply, then an add), else None."""
    if weight.shape[1] % GROUP or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    groups, nearest = _nearest_q4_1(weight)
    codes, scale, low = nearest
    if torch.equal(codes * scale + low, groups):
        return nearest.flat()
    scale = groups.abs().amax(-1, keepdim=True) / 127
    codes = torch.round(groups / scale.clamp_min(1e-30))
    if not torch.equal(codes * scale, groups):
        return None
    return Grid(codes, scale, None).flat()


class Int4Groups:
    """y = x W^T with W held as 4-bit codes in groups of 32 along the input, run by PyTorch's int4 CPU kernel,
    which computes (q - 8) * scale + zero per group. Built only where the weights already lie on such a grid,
    so it is the same model in fewer bytes:
    - a GGUF Q4_1 tensor (W = scale * q + min, q in 0..15): one 4-bit product, a quarter of bf16's bytes;
    - a GGUF Q8_0 tensor (W = scale * q, q in -127..127): q = 16 * high + low, two 4-bit products.
    The kernel beats a dense matmul only for a few rows (decode steps and draft trees); bigger batches,
    prefills above all, use a dense copy: bf16 where the CPU multiplies bf16 natively, else fp32 (emulated bf16
    GEMMs on AVX2 made long prefills several times slower than fp32)."""

    GROUP = GROUP
    # rows up to which the int4 kernel beats the dense copy, by native bf16 and number of 4-bit products (Q4_1
    # layers: one, the Q8_0 LM head: two), measured on the default model (docs/results.md)
    MAX_ROWS = {True: {1: 16, 2: 4}, False: {1: 16, 2: 64}}

    def __init__(self, weight: Tensor, parts: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        """`parts`: (codes 0..15, scale, zero) per 4-bit product, codes (rows, cols), scale and zero (rows, groups)."""
        self.parts = [
            (
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1),
                torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous(),
            )
            for codes, scale, zero in parts
        ]
        native = cpu_has_native_bf16()
        self.max_rows = self.MAX_ROWS[native][len(parts)]
        self.dense = weight.to(torch.bfloat16 if native else torch.float32).contiguous()

    @classmethod
    def nearest(cls, weight: Tensor) -> Int4Groups:
        """The nearest Q4_1-style grid: lossy, for drafters."""
        codes, scale, low = _nearest_q4_1(weight)[1].flat()
        return cls(weight.float(), [(codes, scale, low + 8 * scale)])

    @classmethod
    def exact(cls, weight: Tensor) -> Int4Groups | None:
        """Int4Groups of an fp32 CPU `weight` on a Q4_1 or Q8_0 grid (checked exactly, per group), else None."""
        grid = gguf_grid(weight)
        if grid is None:
            return None
        if grid.low is not None:
            return cls(weight, [(grid.codes, grid.scale, grid.low + 8 * grid.scale)])
        low_codes = torch.remainder(grid.codes, 16)
        high_codes = (grid.codes - low_codes) / 16 + 8
        zeros = torch.zeros_like(grid.scale)
        return cls(weight, [(high_codes, 16 * grid.scale, zeros), (low_codes, grid.scale, 8 * grid.scale)])

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.max_rows:
            return F.linear(x.to(self.dense.dtype), self.dense).to(x.dtype)
        out = None
        for packed, scales_and_zeros in self.parts:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.GROUP, scales_and_zeros)
            out = part if out is None else out + part
        return out


class GridLinear:
    """y = x W^T in fp32 with W kept on its GGUF grid (Q4_1 or Q8_0), run by draftwise's AVX2 kernel
    (csrc/grid_matmul.cpp) for up to `MAX_ROWS` rows: decode steps and every verification tree. The kernel gives
    each row the same bits whatever the rows beside it, so a tree node's logits equal a lone step's. Prefills
    use a dense fp32 copy (MKL's GEMM is faster there, and a prompt is never verified)."""

    MAX_ROWS = 64
    OUTPUT_BLOCK = 32  # the kernel's outputs come in blocks of 4 tiles of 8

    def __init__(self, weight: Tensor, grid: Grid) -> None:
        rows, cols = grid.codes.shape
        tiles = rows // 8
        by_tile = grid.codes.to(torch.int64).reshape(tiles, 8, cols).transpose(1, 2)  # (tiles, cols, 8)
        if grid.low is None:
            self.codes = by_tile.to(torch.int8).contiguous()
        else:  # 8 nibbles to an int32 word, nibble i for output 8t + i
            words = (by_tile << (4 * torch.arange(8))).sum(-1)
            self.codes = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
        self.scale = _by_tile(grid.scale, 8)
        self.low = None if grid.low is None else _by_tile(grid.low, 8)
        self.dense = weight.float().contiguous()
        self.matmul = self.kernel().grid_matmul

    @staticmethod
    def kernel():
        return grid_kernel()

    @classmethod
    def fits(cls, weight: Tensor) -> bool:
        """The kernel builds here and takes this shape (outputs in whole blocks, inputs in groups of 32)."""
        return weight.shape[0] % cls.OUTPUT_BLOCK == 0 and weight.shape[1] % GROUP == 0 and cls.kernel() is not None

    @classmethod
    def nearest(cls, weight: Tensor) -> GridLinear:
        """The nearest Q4_1-style grid: lossy, for drafters."""
        return cls(weight, _nearest_q4_1(weight)[1].flat())

    @classmethod
    def exact(cls, weight: Tensor) -> GridLinear | None:
        """One of `weight` where it lies on a grid this kernel stores exactly and the kernel fits it, else None."""
        grid = cls.stored_grid(weight) if cls.fits(weight) else None
        return None if grid is None else cls(weight, grid)

    @classmethod
    def stored_grid(cls, weight: Tensor) -> Grid | None:
        """The GGUF grid `weight` lies on, if this kernel's storage holds it exactly."""
        return gguf_grid(weight)

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.MAX_ROWS:
            return F.linear(x, self.dense)
        return self.matmul(x, self.codes, self.scale, self.low)


def _by_tile(values: Tensor, tile: int) -> Tensor:
    """Per-group values (rows, groups) as (tiles, groups, tile): one vector load per tile and group."""
    rows = values.shape[0]
    return values.float().reshape(rows // tile, tile, -1).transpose(1, 2).contiguous()


class VnniLinear(GridLinear):
    """y = x W^T with W on its GGUF grid and x quantized per row and group of 32 to int8, as llama.cpp computes a
    Q4_1 / Q8_0 product, run by draftwise's AVX-512 VNNI kernel (csrc/avx512.cpp) for every row count: the
    codes feed an exact int32 dot product, so a tree of 8 rows costs fewer single-row steps than with fp32 FMAs or
    torch's int4 kernel (docs/results.md). Rows are quantized on their own and summed in a fixed
    order, so a tree node's logits equal a lone step's bit for bit, and prefills compute the same model."""

    OUTPUT_BLOCK = 16  # one tile: a partial block of 4 tiles runs tile by tile

    def __init__(self, weight: Tensor, grid: Grid) -> None:
        rows, cols = grid.codes.shape
        tiles = rows // 16
        codes = grid.codes.to(torch.int64)
        if grid.low is None:  # bytes 4j + i of chunk c: code + 128 of output 16t + j at input 4c + i
            chunks = (codes + 128).reshape(tiles, 16, cols // 4, 4)
        else:  # low nibble: input 8c + i, high nibble: input 8c + 4 + i
            by_eight = codes.reshape(tiles, 16, cols // 8, 8)
            chunks = by_eight[..., :4] | (by_eight[..., 4:] << 4)
        self.codes = chunks.permute(0, 2, 1, 3).reshape(tiles, -1, 64).to(torch.uint8).contiguous()
        self.nibbles = grid.low is not None
        # fp16, as the GGUF stores them: fp32 copies made them a third of a layer's bytes
        self.scale = _by_tile(grid.scale, 16).half()
        self.low = _by_tile(grid.low if self.nibbles else torch.zeros_like(grid.scale), 16).half()
        self.matmul = self.kernel().vnni_matmul

    @staticmethod
    def kernel():
        return avx512_kernel()

    @classmethod
    def stored_grid(cls, weight: Tensor) -> Grid | None:
        """The GGUF grid, where its scales and mins are fp16 values too (a GGUF's are): this kernel stores fp16."""
        grid = gguf_grid(weight)
        if grid is None:
            return None
        rows, cols = grid.codes.shape
        scale, low = grid.scale.half().float(), None if grid.low is None else grid.low.half().float()
        snapped = grid.codes.reshape(rows, -1, GROUP) * scale[..., None]
        if low is not None:
            snapped = snapped + low[..., None]
        return Grid(grid.codes, scale, low) if torch.equal(snapped.reshape(rows, cols), weight) else None

    def __call__(self, x: Tensor) -> Tensor:
        return self.matmul(x.float(), self.codes, self.scale, self.low, self.nibbles)


def grid_linear() -> type[GridLinear] | None:
    """The fp32 grid product this CPU runs: VNNI (int8 activations) where it builds, else the AVX2 one, else None."""
    for kind in (VnniLinear, GridLinear):
        if kind.kernel() is not None:
            return kind
    return None


class Int4Linear(nn.Linear):
    """An nn.Linear that runs its `int4` copy (set by `quantize_draft_linears`)."""

    int4: Int4Groups | GridLinear

    def forward(self, x: Tensor) -> Tensor:
        return self.int4(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)


def quantize_draft_linears(module: nn.Module) -> int:
    """Run every bias-free bf16 or fp32 CPU nn.Linear of a *drafter* on the nearest 4-bit grid, in place (fp32
    ones only where the grid kernel runs); returns how many. Lossy, which a drafter may be: its weights change
    what it proposes, never what verification accepts. For the default draft head on the lean engine a call costs
    about half as much (its 8192-token LM head dominates; docs/results.md)."""
    switched = 0
    for linear in module.modules():
        weight = linear.weight if type(linear) is nn.Linear else None
        if weight is None or linear.bias is not None or weight.device.type != "cpu" or weight.shape[1] % GROUP:
            continue
        if weight.dtype == torch.bfloat16:
            linear.int4 = Int4Groups.nearest(weight.detach())
        elif weight.dtype == torch.float32 and (kind := grid_linear()) is not None and kind.fits(weight):
            linear.int4 = kind.nearest(weight.detach())
        else:
            continue
        linear.__class__ = Int4Linear
        switched += 1
    return switched


def projection(weights: list[Tensor], dtype: torch.dtype, int4: bool):
    weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    kind = Int4Groups if dtype == torch.bfloat16 else grid_linear() if dtype == torch.float32 else None
    if int4 and kind is not None:
        packed = kind.exact(weight.detach())
        if packed is not None:
            return packed
    return Dense(weight.detach(), dtype)
