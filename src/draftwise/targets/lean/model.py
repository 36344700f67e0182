"""A compact forward for llama-architecture targets: what a decode step costs once framework overhead is gone.

A transformers bf16 step at a short context takes ~18 ms on this 2-core CPU, about 8 of them matmuls. This path
runs the same weights with about a dozen tensor ops per layer: fused QKV and gate/up projections, rotary tables
precomputed for every position, a preallocated KV cache written by position (so a tree's rejected nodes cost
nothing to drop), and `scaled_dot_product_attention` with the tree mask, grouped-query heads folded into the
query length so the cache is never repeated. On CPU in bf16, weights that lie on a GGUF 4-bit or 8-bit block
grid run through PyTorch's int4 kernel (`Int4Groups`): a step takes 6.4 ms on an AVX-512 BF16 EPYC. On a CPU
without bf16 units (AVX2), where bf16 is emulated and that kernel's cost grows with every few rows, the lean
engine computes in fp32 and runs the same grids through draftwise's own kernel (`GridLinear`), which gives each
row the same bits whatever the rows beside it. On a CPU with AVX-512 VNNI, `VnniLinear` multiplies int8-rounded
activations by the grid's codes in int32, as llama.cpp does, and a tree attention kernel replaces SDPA for
decode steps and trees; both give each row the same bits whatever rows or cache slots surround it, so trees
verify token for token. Same contract as `TargetModel`.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftwise.core.kernels import avx512_kernel, grid_kernel, small_batch_linear
from draftwise.core.tree import DraftTree
from draftwise.targets.hf import TargetOutput
from draftwise.targets.models import cpu_has_native_bf16

GROUP = 32  # GGUF block size along the input


def lean_supported(model) -> bool:
    """Plain llama: no attention or MLP bias, SiLU MLP (any rope type: the model's own rotary module is used)."""
    config = model.config
    return (
        getattr(config, "model_type", None) == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
    )


class Dense:
    """y = x W^T in the compute dtype; in fp32 on CPU, few-row products as W x^T (see kernels.py)."""

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
    GEMMs on AVX2 made a 1000-token prefill take 13 s against 2.4 s in fp32)."""

    GROUP = GROUP
    # rows up to which the int4 kernel beats the dense copy, by number of 4-bit products, measured on the default
    # model. Native bf16 (AVX-512 BF16): Q4_1 layers 1.8x faster than bf16 at 1 row and at 16, the Q8_0 LM head
    # 1.6x at 1 row, 1.2x at 4, slower from 8. AVX2: the LM head in int4 beats fp32 even at 64 rows (60 / 71 ms).
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
    codes feed an exact int32 dot product, so a tree of 8 rows costs ~3x one row (fp32 FMAs: ~5x, torch's int4
    kernel in bf16: ~2 decode steps for the whole model). Rows are quantized on their own and summed in a fixed
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
    what it proposes, never what verification accepts. For the default draft head on the lean engine a call drops
    from ~1.2 to ~0.5 ms (its 8192-token LM head dominates)."""
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


def _projection(weights: list[Tensor], dtype: torch.dtype, int4: bool):
    weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    kind = Int4Groups if dtype == torch.bfloat16 else grid_linear() if dtype == torch.float32 else None
    if int4 and kind is not None:
        packed = kind.exact(weight.detach())
        if packed is not None:
            return packed
    return Dense(weight.detach(), dtype)


class _Layer:
    __slots__ = ("norm1", "qkv", "o", "norm2", "gate_up", "down", "packed")

    def __init__(self, layer, dtype: torch.dtype, int4: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1 = layer.input_layernorm.weight.detach().to(dtype)
        self.qkv = _projection([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dtype, int4)
        self.o = _projection([attn.o_proj.weight], dtype, int4)
        self.norm2 = layer.post_attention_layernorm.weight.detach().to(dtype)
        self.gate_up = _projection([mlp.gate_proj.weight, mlp.up_proj.weight], dtype, int4)
        self.down = _projection([mlp.down_proj.weight], dtype, int4)
        # what csrc/avx512.cpp's decoder_layer takes, where every product runs on the VNNI kernel
        self.packed = None
        products = (self.qkv, self.o, self.gate_up, self.down)
        if all(isinstance(p, VnniLinear) for p in products):
            qkv, o, gate_up, down = ([p.codes, p.scale, p.low] for p in products)
            norm1, norm2 = self.norm1.float().contiguous(), self.norm2.float().contiguous()
            self.packed = ([norm1, *qkv, *o, norm2, *gate_up, *down], [p.nibbles for p in products])


HUGE_PAGE = 2 << 20


def in_huge_pages(tensors: list[Tensor]) -> tuple[list[Tensor], mmap.mmap | None]:
    """Copies of the CPU `tensors` laid out in one anonymous mapping that asks Linux for 2 MB pages (transparent
    huge pages, `madvise`), and the mapping. A decode step streams every weight: in 4 KB pages that is ~20,000
    page-table walks a step, and the round's Python work after it finds the TLB flushed too. Where the OS cannot
    be asked (no `MADV_HUGEPAGE`), or `DRAFTWISE_HUGE_PAGES=0`, the tensors come back as they are."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or os.environ.get("DRAFTWISE_HUGE_PAGES", "1") == "0" or not tensors:
        return tensors, None
    sizes = [-(-t.nbytes // 64) * 64 for t in tensors]  # 64-byte aligned, as the kernels' loads like
    arena = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(advice)
    address = ctypes.addressof(ctypes.c_char.from_buffer(arena))
    offset = -address % HUGE_PAGE  # the first 2 MB boundary: pages are only huge inside aligned 2 MB blocks
    copies = []
    for tensor, size in zip(tensors, sizes, strict=True):
        view = torch.frombuffer(arena, dtype=torch.uint8, count=tensor.nbytes, offset=offset)
        copies.append(view.view(tensor.dtype).view(tensor.shape).copy_(tensor))
        offset += size
    return copies, arena


def context_verify_cost(fits: list[tuple[int, float, float]], length: Callable[[], int]) -> Callable[[int], float]:
    """Seconds to verify N nodes at the context `length()`, from (context, step seconds, seconds per extra node)
    timed at a short and a long context: both grow linearly past the short one (never below it)."""
    (c0, step0, node0), (c1, step1, node1) = fits[0], fits[-1]
    span = c1 - c0
    step_growth = max(step1 - step0, 0.0) / span if span > 0 else 0.0
    node_growth = max(node1 - node0, 0.0) / span if span > 0 else 0.0

    def verify_cost(nodes: int) -> float:
        extra = max(length() - c0, 0)
        return step0 + step_growth * extra + (nodes - 1) * (node0 + node_growth * extra)

    return verify_cost


class LeanTarget:
    """A llama target with a static KV cache; same contract as `TargetModel` (see target.py)."""

    engine_name = "lean"
    max_leaves: int | None = None
    ATTENTION_ROWS = 64  # forwards up to this many tokens (decode steps, trees) use the attention kernel if any

    def __init__(
        self,
        model,
        feature_layers: tuple[int, ...] = (),
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        int4: bool = False,
    ):
        config = model.config
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.dtype = dtype or next(model.parameters()).dtype
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", 2048))
        self.feature_layers = tuple(feature_layers)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed = model.model.embed_tokens.weight.detach().to(self.dtype)
        self.norm = model.model.norm.weight.detach().to(self.dtype)
        self.lm_head = _projection([model.lm_head.weight], self.dtype, int4)
        self.layers = [_Layer(layer, self.dtype, int4) for layer in model.model.layers]
        self.cos, self.signed_sin = self._rotary_tables(model)
        shape = (len(self.layers), 2, self.kv_heads, self.max_length, self.head_dim)
        self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._length = 0
        # measured seconds to verify a tree of N nodes (root included), for drafters that size trees by cost
        self.verify_cost: Callable[[int], float] | None = None
        # with VNNI products, attention too runs each row on its own (csrc/avx512.cpp), so nodes match steps
        vnni = isinstance(self.layers[0].qkv, VnniLinear) and self.head_dim % 16 == 0 and self.head_dim <= 128
        # the fused layer's row loops run 16 hidden values, and 64 of the MLP's, at a time
        whole_layers = config.hidden_size % 16 == 0 and config.intermediate_size % 64 == 0
        self.attention = avx512_kernel().attention if vnni else None
        self.kernel = avx512_kernel() if vnni and whole_layers and all(layer.packed for layer in self.layers) else None
        self.arena = self._move_to_huge_pages() if self.kernel is not None else None
        if self.device.type == "cpu":
            self.calibrate()

    def _move_to_huge_pages(self) -> mmap.mmap | None:
        """What the fused layers stream each step (their packed weights, the LM head, the KV cache), copied into
        2 MB pages (`in_huge_pages`); returns the mapping that holds them."""
        head = self.lm_head
        head_parts = [head.codes, head.scale, head.low] if isinstance(head, VnniLinear) else []
        tensors = [t for layer in self.layers for t in layer.packed[0]] + head_parts + [self.kv]
        copies, arena = in_huge_pages(tensors)
        if arena is None:
            return None
        moved = iter(copies)
        for layer in self.layers:
            packed = [next(moved) for _ in layer.packed[0]]  # norm1, qkv x3, o x3, norm2, gate_up x3, down x3
            for product, first in zip((layer.qkv, layer.o, layer.gate_up, layer.down), (1, 4, 8, 11), strict=True):
                product.codes, product.scale, product.low = packed[first : first + 3]
            layer.packed = (packed, layer.packed[1])
        if head_parts:
            head.codes, head.scale, head.low = (next(moved) for _ in range(3))
        self.kv = next(moved)
        return arena

    def calibrate(self, short: int = 128, long: int = 1024) -> None:
        """Sets `verify_cost`: seconds to verify N nodes at the current context, from trees of 1 and 8 nodes timed at
        a short and a long context (~0.5 s for the default model) at load. With int4 weights a node costs ~9% of a
        step at 128 tokens, but its attention grows with the context (~3x that at 1,500), so tree sizes follow
        both."""

        def seconds(context: int, nodes: int) -> float:
            tokens = torch.arange(nodes, device=self.device)
            positions = torch.arange(context, context + nodes, device=self.device)[None]
            mask = torch.ones(nodes, context + nodes, dtype=torch.bool, device=self.device).tril(context)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                self.forward(tokens, positions, mask[None, None])
                times.append(time.perf_counter() - start)
                self.truncate(context)
            return min(times)

        fits = []  # (context, step seconds, seconds per extra node)
        for context in sorted({min(short, self.max_length - 8), min(long, self.max_length - 8)}):
            self.reset()
            self.prefill(torch.arange(context, device=self.device) % self.config.vocab_size)
            one, eight = seconds(context, 1), seconds(context, 8)
            fits.append((context, one, max(eight - one, 0.0) / 7))
        self.reset()
        self.verify_cost = context_verify_cost(fits, lambda: self._length)

    def _rotary_tables(self, model) -> tuple[Tensor, Tensor]:
        """cos/sin for every position from the model's own rotary module (any rope type it supports)."""
        positions = torch.arange(self.max_length, device=self.device)[None]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = model.model.rotary_emb(probe, positions)
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_low, sin_high]: one roll instead of slices, neg and cat
        signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        return cos[0].to(self.dtype), signed_sin.to(self.dtype)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype_name(self) -> str:
        name, qkv = str(self.dtype).removeprefix("torch."), self.layers[0].qkv
        if isinstance(qkv, VnniLinear):
            return f"{name}+w4a8"  # 4-bit weights, 8-bit activations in the products
        return f"{name}+int4" if isinstance(qkv, Int4Groups | GridLinear) else name

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        self._length = 0

    def _rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _run(self, token_ids: Tensor, positions: Tensor, mask: Tensor | None, logits_rows: slice | None):
        """Append `token_ids` (N,) at cache slots [length, length + N) with rotary `positions` (N,).
        `mask` (N, length + N) bool or None for causal-over-new-tokens. Returns (logits or None, features)."""
        n, start = token_ids.numel(), self._length
        end = start + n
        if end > self.max_length:
            raise ValueError(f"context of {end} tokens exceeds the model's {self.max_length}")
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        group = heads // kv_heads
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        cos_rows, sin_rows = self.cos[positions], self.signed_sin[positions]  # (N, D)
        cos, signed_sin = cos_rows[:, None], sin_rows[:, None]  # (N, 1, D), for the heads
        if n == 1:
            mask = None  # one token attends to everything cached
        attention = self.attention if n <= self.ATTENTION_ROWS else None  # prefills: SDPA, faster there
        visible = mask  # (N, end) or None (causal over the new tokens), for the attention kernel
        if attention is None and n > 1:
            if mask is None:  # causal over the new tokens (is_causal would see the folded rows)
                mask = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(start)
            # grouped heads are folded into the query length: row g * N + i is head (kv, g) at node i
            mask = mask.repeat(group, 1)
        features = {}
        x = self.embed[token_ids]  # (N, H)
        fused = self.kernel is not None and attention is not None  # decode steps and trees, on VNNI
        for index, layer in enumerate(self.layers):
            if index in self.feature_layers:
                features[index] = x
            if fused:
                x = self.kernel.decoder_layer(
                    x, *layer.packed, cos_rows, sin_rows, self.kv[index], start, visible, heads, self.eps, None
                )
                continue
            h = self._rms_norm(x, layer.norm1)
            qkv = layer.qkv(h)
            qk = qkv[:, : q_size + kv_size].view(n, heads + kv_heads, head_dim)
            qk = torch.addcmul(qk * cos, qk.roll(head_dim // 2, -1), signed_sin)  # rotary, q and k at once
            q, k = qk[:, :heads].transpose(0, 1), qk[:, heads:].transpose(0, 1)  # (heads, N, D)
            v = qkv[:, q_size + kv_size :].view(n, kv_heads, head_dim).transpose(0, 1)
            cache = self.kv[index]
            cache[0, :, start:end] = k
            cache[1, :, start:end] = v
            if attention is not None:
                attn = attention(qk[:, :heads], cache[0], cache[1], end, visible)
            else:
                q = q.reshape(1, kv_heads, group * n, head_dim)
                keys, values = cache[None, 0, :, :end], cache[None, 1, :, :end]
                attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
                attn = attn.reshape(heads, n, head_dim).transpose(0, 1).reshape(n, q_size)
            x = x + layer.o(attn)
            h = self._rms_norm(x, layer.norm2)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        x = self.kernel.rms_norm(x, self.norm, self.eps) if fused else self._rms_norm(x, self.norm)
        features[len(self.layers)] = x
        self._length = end
        logits = None if logits_rows is None else self.lm_head(x[logits_rows])
        stacked = torch.stack([features[i] for i in self.feature_layers], dim=1) if self.feature_layers else None
        return logits, stacked

    @torch.inference_mode()
    def prefill(self, token_ids: Tensor) -> Tensor | None:
        self.reset()
        if token_ids.numel() == 0:
            return None
        token_ids = token_ids.to(self.device)
        positions = torch.arange(token_ids.numel(), device=self.device)
        return self._run(token_ids, positions, None, None)[1]

    @torch.inference_mode()
    def forward(self, token_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None) -> TargetOutput:
        """Same arguments as `TargetModel.forward`: positions (1, N), bool mask (1, 1, N, cache + N); a mask of
        None is causal over the new tokens."""
        mask = attention_mask[0, 0].to(self.device) if attention_mask is not None else None
        logits, features = self._run(token_ids.to(self.device), position_ids[0].to(self.device), mask, slice(None))
        return TargetOutput(logits.float(), features)

    def forward_tree(self, tree: DraftTree) -> TargetOutput:
        past = self.length
        mask = tree.attention_mask(past) if tree.size > 1 else None  # a lone root attends to the whole cache
        return self.forward(tree.tokens, tree.position_ids(past), mask)

    def truncate(self, length: int) -> None:
        self._length = min(self._length, length)

    @torch.inference_mode()
    def commit(self, past_length: int, path: list[int]) -> None:
        n = len(path)
        if path != list(range(n)):
            slots = torch.tensor(path, device=self.device) + past_length
            self.kv[:, :, :, past_length : past_length + n] = self.kv[:, :, :, slots]
        self.truncate(past_length + n)
