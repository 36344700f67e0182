"""A compact forward for llama-architecture targets: what a decode step costs once framework overhead is gone.

This path runs a transformers llama's weights with about a dozen tensor ops per layer: fused QKV and gate/up
projections (linears.py), rotary tables precomputed for every position, a preallocated KV cache written by
position (so a tree's rejected nodes cost nothing to drop), and `scaled_dot_product_attention` with the tree
mask, grouped-query heads folded into the query length so the cache is never repeated. On a CPU with AVX-512 VNNI,
a tree attention kernel replaces SDPA for decode steps and trees, and a fused decoder layer (csrc/avx512.cpp)
replaces the layer's ops; both give each row the same bits whatever rows or cache slots surround it. What each
step costs here against transformers: docs/results.md.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from draftwise.core.kernels import avx512_kernel
from draftwise.core.target import ComputeMode, TargetBase, TargetOutput
from draftwise.core.tree import DraftTree
from draftwise.targets.lean.linears import GridLinear, Int4Groups, VnniLinear, projection
from draftwise.targets.lean.memory import in_huge_pages

LEAN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # model_type values whose tensors _Layer maps


def lean_supported(model) -> bool:
    """Llama-like decoders: Llama, Mistral (sliding window), Qwen2/2.5 (q/k/v biases), Qwen3 (per-head q/k norms);
    SiLU MLP without bias (any rope type: the model's own rotary module is used)."""
    config = model.config
    return (
        getattr(config, "model_type", None) in LEAN_FAMILIES
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
    )


def sliding_windows(config) -> list[int | None]:
    """Each layer's attention window (None = full): Mistral windows every layer, Qwen2/3 the layers that
    `layer_types` marks sliding."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return [None] * config.num_hidden_layers
    if layer_types is None:
        return [window if config.model_type == "mistral" else None] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def _bias(*linears) -> Tensor | None:
    """The linears' biases concatenated, or None where they have none (Qwen2 has q/k/v biases, Llama may)."""
    biases = [linear.bias for linear in linears]
    if all(b is None for b in biases):
        return None
    weight = linears[0].weight
    parts = [
        b if b is not None else torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device)
        for b, linear in zip(biases, linears, strict=True)
    ]
    return torch.cat(parts)


class _Layer:
    __slots__ = ("norm1", "qkv", "qkv_bias", "qk_norm", "o", "o_bias", "norm2", "gate_up", "down", "window", "packed")

    def __init__(self, layer, dtype: torch.dtype, int4: bool, heads: int, kv_heads: int, window: int | None) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1 = layer.input_layernorm.weight.detach().to(dtype)
        self.qkv = projection([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dtype, int4)
        qkv_bias = _bias(attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv_bias = None if qkv_bias is None else qkv_bias.detach().to(dtype)
        # Qwen3 RMS-normalises each head's q and k before rotary: one (heads + kv_heads, D) weight for both
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.qk_norm = None
        if q_norm is not None and k_norm is not None:
            weights = [q_norm.weight.detach()] * heads + [k_norm.weight.detach()] * kv_heads
            self.qk_norm = torch.stack(weights).to(dtype)
        self.o = projection([attn.o_proj.weight], dtype, int4)
        self.o_bias = None if attn.o_proj.bias is None else attn.o_proj.bias.detach().to(dtype)
        self.window = window
        self.norm2 = layer.post_attention_layernorm.weight.detach().to(dtype)
        self.gate_up = projection([mlp.gate_proj.weight, mlp.up_proj.weight], dtype, int4)
        self.down = projection([mlp.down_proj.weight], dtype, int4)
        # what csrc/avx512.cpp's decoder_layer takes, where every product runs on the VNNI kernel
        self.packed = None
        products = (self.qkv, self.o, self.gate_up, self.down)
        plain = self.qkv_bias is None and self.qk_norm is None and self.o_bias is None and window is None
        if plain and all(isinstance(p, VnniLinear) for p in products):
            qkv, o, gate_up, down = ([p.codes, p.scale, p.low] for p in products)
            norm1, norm2 = self.norm1.float().contiguous(), self.norm2.float().contiguous()
            self.packed = ([norm1, *qkv, *o, norm2, *gate_up, *down], [p.nibbles for p in products])


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


class LeanTarget(TargetBase):
    """A llama target with a static KV cache (draftwise.core.target.Target)."""

    backend = "lean"
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
        self.lm_head = projection([model.lm_head.weight], self.dtype, int4)
        windows = sliding_windows(config)
        self.layers = [
            _Layer(layer, self.dtype, int4, self.heads, self.kv_heads, window)
            for layer, window in zip(model.model.layers, windows, strict=True)
        ]
        # a window only matters once the context can outgrow it; then the windowed layers mask by position
        self.windowed = any(w is not None and w < self.max_length for w in windows)
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
        self.native_kernels = avx512_kernel() if vnni else None  # a draft head beside this target runs on them too
        self.attention = self.native_kernels.attention if vnni and not self.windowed else None
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
        a short and a long context at load. With int4 weights a node costs a small share of a step at a short
        context, but its attention grows with the context, so tree sizes follow both."""

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
    def compute(self) -> ComputeMode:
        dense, qkv = ComputeMode.dense(self.dtype), self.layers[0].qkv
        if isinstance(qkv, VnniLinear):
            return ComputeMode(dense.activations, "w4a8")  # 4-bit weights, 8-bit activations in the products
        return ComputeMode(dense.activations, "int4") if isinstance(qkv, Int4Groups | GridLinear) else dense

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
        masks = {None: (mask, visible)}  # window -> (SDPA mask, kernel mask)
        if self.windowed:
            masks = self._window_masks(positions, start, visible, group)
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
            mask, visible = masks.get(layer.window, masks[None])
            h = self._rms_norm(x, layer.norm1)
            qkv = layer.qkv(h)
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            qk = qkv[:, : q_size + kv_size].view(n, heads + kv_heads, head_dim)
            if layer.qk_norm is not None:
                qk = F.rms_norm(qk, (head_dim,), None, self.eps) * layer.qk_norm
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
            o = layer.o(attn)
            x = x + (o if layer.o_bias is None else o + layer.o_bias)
            h = self._rms_norm(x, layer.norm2)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        x = self.kernel.rms_norm(x, self.norm, self.eps) if fused else self._rms_norm(x, self.norm)
        features[len(self.layers)] = x
        self._length = end
        logits = None if logits_rows is None else self.lm_head(x[logits_rows])
        stacked = torch.stack([features[i] for i in self.feature_layers], dim=1) if self.feature_layers else None
        return logits, stacked

    def _window_masks(self, positions: Tensor, start: int, visible: Tensor | None, group: int) -> dict:
        """(SDPA mask, kernel mask) for full attention (key None) and for each sliding window: a key is seen only
        where its position is within `window` of the query's (transformers' `kv_idx > q_idx - window`). Cached
        slots before `start` hold positions 0..start-1 (commit compacts them); new slots hold `positions`."""
        n = positions.numel()
        end = start + n
        if visible is None:
            visible = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(start)
        key_positions = torch.cat([torch.arange(start, device=self.device), positions])
        masks = {None: (visible.repeat(group, 1), visible)}
        for window in {layer.window for layer in self.layers if layer.window is not None}:
            seen = visible & (key_positions[None, :] > positions[:, None] - window)
            masks[window] = (seen.repeat(group, 1), seen)
        return masks

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
        """Same arguments as `HFTarget.forward`: positions (1, N), bool mask (1, 1, N, cache + N); a mask of
        None is causal over the new tokens."""
        mask = attention_mask[0, 0].to(self.device) if attention_mask is not None else None
        logits, features = self._run(token_ids.to(self.device), position_ids[0].to(self.device), mask, slice(None))
        return TargetOutput(logits.float(), features)

    def _forward_tree(self, tree: DraftTree) -> TargetOutput:
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
