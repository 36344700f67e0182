"""An EAGLE-3-style draft head: target features + next-token embedding -> one decoder layer -> next token.

The head reads the target's hidden states at a few layers (fused by `fc`; one layer = EAGLE-1 style, no fc),
pairs the feature at position t with the embedding of token t+1, and predicts token t+2 over a reduced draft
vocabulary (`draft_to_target` maps draft ids back to target ids). Its own output hidden state stands in for
the target's feature when it drafts further ahead. The token embedding is the target's, shared and frozen,
so it is not stored with the head.

The config flags below the sizes are the published variants (docs/draft-heads.md, "Formats"), each exactly as
its reference computes it: `fuse_embedding` is EAGLE-1 (fc over [embedding, feature] on every call, no pre-norms,
no final norm: arXiv 2401.15077), `norm_before_residual` makes the normed feature the residual (vLLM and
speculators' EAGLE-3), `norm_before_fc` / `fc_norm` norm the fused features, and `norm_output` feeds the normed
output to the next call (vLLM's "EAGLE 3.1").

Pair index t sits at rotary position t in training and inference alike.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import atomic_directory
from draftwise.targets.lean.linears import VnniLinear

# (frontier width, pairs in the head's cache before, seconds) of one draft-head call
StepHook = Callable[[int, int, float], None]
# rotary base and Llama 3 scaling (DraftHeadConfig.rope_llama3) or None
Rope = tuple[float, tuple[float, float, float, int] | None]


# the variant flags' values in draftwise's own layout, EAGLE-3 as SafeAILab's cnets.py computes it
EAGLE3_FLAGS = {
    "fuse_embedding": False,
    "fc_bias": False,
    "qkv_bias": False,
    "final_norm": True,
    "norm_before_residual": False,
    "norm_before_fc": False,
    "fc_norm": False,
    "norm_output": False,
}


@dataclass
class DraftHeadConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    draft_vocab_size: int
    target_vocab_size: int
    feature_layers: tuple[int, ...]
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    fuse_embedding: bool = False
    fc_bias: bool = False
    qkv_bias: bool = False
    final_norm: bool = True
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    # Llama 3's rotary scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_llama3: tuple[float, float, float, int] | None = None

    @property
    def rope(self) -> Rope:
        return (self.rope_theta, self.rope_llama3)

    @property
    def is_eagle3(self) -> bool:
        """The layout draftwise trains and csrc/avx512.cpp's decoder_layer computes."""
        return all(getattr(self, flag) == value for flag, value in EAGLE3_FLAGS.items())

    @classmethod
    def from_target(cls, config, feature_layers: tuple[int, ...], draft_vocab_size: int) -> DraftHeadConfig:
        heads = config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", heads),
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=config.intermediate_size,
            draft_vocab_size=draft_vocab_size,
            target_vocab_size=config.vocab_size,
            feature_layers=tuple(feature_layers),
            rope_theta=float(getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta")),
            rms_norm_eps=config.rms_norm_eps,
        )


def _inverse_frequencies(rope: Rope, half: int, device: str) -> Tensor:
    theta, llama3 = rope
    inv_freq = 1.0 / theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half)
    if llama3 is None:
        return inv_freq
    # Llama 3.1's scaling, as transformers' _compute_llama3_parameters: long wavelengths slowed by `factor`,
    # short ones kept, the band between interpolated
    factor, low, high, original = llama3
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, smoothed, scaled)


@functools.cache
def _rotary_table(rope: Rope, dim: int, length: int, dtype: torch.dtype, device: str) -> tuple[Tensor, Tensor]:
    """cos and signed sin (length, dim) of every position: computed once, not on every draft call (where the
    angles' cos and sin took a quarter of a call)."""
    half = dim // 2
    inv_freq = _inverse_frequencies(rope, half, device)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    # rotate_half(x) * sin == roll(x, half) * [-sin_low, sin_high]
    return cos.to(dtype), torch.cat([-sin[:, :half], sin[:, half:]], -1).to(dtype)


def rotary_rows(positions: Tensor, dim: int, rope: Rope, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """cos and signed sin (N, dim) at integer `positions` (N,), from a cached table."""
    top = int(positions.max()) + 1 if positions.numel() else 1
    cos, signed_sin = _rotary_table(rope, dim, 1 << (top - 1).bit_length(), dtype, str(device))
    return cos[positions], signed_sin[positions]


def rotate(x: Tensor, positions: Tensor, rope: Rope) -> Tensor:
    """Llama rotary embedding of x (..., N, D) at integer `positions` (N,)."""
    cos, signed_sin = rotary_rows(positions, x.shape[-1], rope, x.dtype, x.device)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class KVCache:
    """Preallocated keys and values, as one (2, kv_heads, capacity, head_dim) tensor (the layout csrc/avx512.cpp's
    decoder_layer writes into); rolling back is setting `length`."""

    def __init__(self, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device):
        self.data = torch.zeros(2, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.length = 0

    @property
    def keys(self) -> Tensor:
        return self.data[0]

    @property
    def values(self) -> Tensor:
        return self.data[1]

    def reserve(self, n: int) -> None:
        """Room for `n` more pairs."""
        if self.length + n > self.data.shape[2]:
            _, heads, capacity, dim = self.data.shape
            extra = self.data.new_zeros(2, heads, max(self.length + n - capacity, capacity), dim)
            self.data = torch.cat([self.data, extra], 2)

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        n = keys.shape[1]
        self.reserve(n)
        self.data[0, :, self.length : self.length + n] = keys
        self.data[1, :, self.length : self.length + n] = values
        self.length += n
        return self.keys[:, : self.length], self.values[:, : self.length]


class DraftHead(nn.Module):
    def __init__(self, config: DraftHeadConfig):
        super().__init__()
        self.config = c = config
        h, fused = c.hidden_size, len(c.feature_layers) * c.hidden_size
        if c.fuse_embedding:  # EAGLE-1: fc reads [embedding, feature] on every call
            if len(c.feature_layers) != 1:
                raise DraftwiseError("an EAGLE-1 head (fuse_embedding) reads exactly one feature layer")
            self.fc = nn.Linear(2 * h, h, bias=c.fc_bias)
        else:
            self.fc = nn.Linear(fused, h, bias=c.fc_bias) if len(c.feature_layers) > 1 else None
            self.embed_norm = nn.RMSNorm(h, eps=c.rms_norm_eps)
            self.hidden_norm = nn.RMSNorm(h, eps=c.rms_norm_eps)
        if c.norm_before_fc:  # one norm over the concatenated features
            self.input_norm = nn.RMSNorm(fused, eps=c.rms_norm_eps)
        if c.fc_norm:  # one norm per feature layer
            self.fc_norms = nn.ModuleList(nn.RMSNorm(h, eps=c.rms_norm_eps) for _ in c.feature_layers)
        width = h if c.fuse_embedding else 2 * h
        self.q_proj = nn.Linear(width, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(width, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(width, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, h, bias=False)
        self.post_attention_norm = nn.RMSNorm(h, eps=c.rms_norm_eps)
        self.gate_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, h, bias=False)
        self.final_norm = nn.RMSNorm(h, eps=c.rms_norm_eps) if c.final_norm else nn.Identity()
        self.lm_head = nn.Linear(h, c.draft_vocab_size, bias=False)
        self.register_buffer("draft_to_target", torch.arange(c.draft_vocab_size), persistent=True)
        self.embed: Tensor | None = None  # the target's token embedding (V, H), attached, never trained
        self.own_embedding: Tensor | None = None  # a published head's own copy (heads.formats), attached instead
        self.kernel = None  # csrc/avx512.cpp (its attention and rms_norm) where the lean target runs on it
        self.packed: tuple[list[Tensor], list[bool]] | None = None  # see pack_layer
        self.on_step: StepHook | None = None  # called after every `step` when set (`draftwise profile` times them)

    def attach_embedding(self, weight: Tensor) -> DraftHead:
        self.embed = weight.detach()
        return self

    def fuse(self, features: Tensor) -> Tensor:
        """Target features (..., F, H) -> the head's hidden input (..., H)."""
        c = self.config
        if c.fuse_embedding or self.fc is None:  # EAGLE-1's fc runs in every call, with the embedding
            return features.flatten(-2).to(self.lm_head.weight.dtype)
        features = features.to(self.fc.weight.dtype)
        if c.fc_norm:
            features = torch.stack([norm(features[..., i, :]) for i, norm in enumerate(self.fc_norms)], -2)
        flat = features.flatten(-2)
        return self.fc(self.input_norm(flat) if c.norm_before_fc else flat)

    def _on_kernel(self, x: Tensor) -> bool:
        return self.kernel is not None and x.dtype == torch.float32 and not torch.is_grad_enabled()

    def _norm(self, norm: nn.RMSNorm, x: Tensor) -> Tensor:
        """The kernel's norm where there is one (a torch rms_norm is a noticeable share of a draft call)."""
        if self._on_kernel(x) and x.dim() == 2 and x.shape[-1] % 16 == 0:
            return self.kernel.rms_norm(x, norm.weight, norm.eps)
        return norm(x)

    def attention_input(self, hidden: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """What q, k and v read: [norm(embedding of token t+1), norm(feature at t)] (N, 2H); and the residual the
        attention's output adds to (N, H): the feature itself (EAGLE-3), or its norm (norm_before_residual)."""
        emb = self.embed[token_ids].to(hidden.dtype)
        if self.config.fuse_embedding:  # EAGLE-1 (cnets1.py): layer 0 has no input norm
            x = self.fc(torch.cat([emb, hidden], dim=-1))
            return x, x
        normed = self._norm(self.hidden_norm, hidden)
        residual = normed if self.config.norm_before_residual else hidden
        return torch.cat([self._norm(self.embed_norm, emb), normed], dim=-1), residual

    def project(self, hidden: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Queries (heads, N, D), keys and values (kv_heads, N, D) before rotary, for N pairs; and the residual."""
        c = self.config
        x, residual = self.attention_input(hidden, token_ids)
        n = x.shape[0]
        q = self.q_proj(x).view(n, c.num_heads, c.head_dim).transpose(0, 1)
        k = self.k_proj(x).view(n, c.num_kv_heads, c.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(n, c.num_kv_heads, c.head_dim).transpose(0, 1)
        return q, k, v, residual

    def finish(self, residual: Tensor, attended: Tensor) -> tuple[Tensor, Tensor]:
        """Residual and MLP. attended (heads, N, D) -> (normed output for the LM head (N, H), output hidden)."""
        n = attended.shape[1]
        h = residual + self.o_proj(attended.transpose(0, 1).reshape(n, -1))
        x = self._norm(self.post_attention_norm, h)
        h = h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        normed = self._norm(self.final_norm, h) if self.config.final_norm else h
        return normed, (normed if self.config.norm_output else h)

    def _expand_kv(self, t: Tensor) -> Tensor:
        return t.repeat_interleave(self.config.num_heads // self.config.num_kv_heads, dim=0)

    def pack_layer(self) -> None:
        """Where every linear runs on the VNNI kernel (`quantize_draft_linears` next to a w4a8 target), the decoder
        layer's weights as csrc/avx512.cpp's decoder_layer takes them: a call is then one C++ layer instead of ~30
        PyTorch ops, whose glue was a large share of the call."""
        products = [
            [self.q_proj, self.k_proj, self.v_proj],
            [self.o_proj],
            [self.gate_proj, self.up_proj],
            [self.down_proj],
        ]
        grids = [[getattr(linear, "int4", None) for linear in group] for group in products]
        if (
            self.kernel is None
            or not self.config.is_eagle3
            or not all(isinstance(g, VnniLinear) and g.nibbles == group[0].nibbles for group in grids for g in group)
        ):
            return
        packed = []
        for group in grids:  # concatenated along the outputs: one product, each row's grid unchanged
            packed += [torch.cat([getattr(g, part) for g in group]).contiguous() for part in ("codes", "scale", "low")]
        # norm1 is unused: the call gets the attention input ready-made
        unused, norm2 = (m.weight.detach().float().contiguous() for m in (self.hidden_norm, self.post_attention_norm))
        weights = [unused, *packed[:6], norm2, *packed[6:]]
        self.packed = (weights, [group[0].nibbles for group in grids])

    def step(
        self,
        hidden: Tensor,
        token_ids: Tensor,
        positions: Tensor,
        cache: KVCache,
        mask: Tensor,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Inference: N pairs appended to `cache`; `mask` (N, cache.length + N) bool, True = attend. `last_only`:
        logits of the last pair alone (a catch-up over many pairs needs no more, and the LM head is most of it)."""
        if self.on_step is not None:  # a timing hook: the same call, timed
            width, context, start = hidden.shape[0], cache.length, time.perf_counter()
            out = self._step(hidden, token_ids, positions, cache, mask, last_only)
            self.on_step(width, context, time.perf_counter() - start)
            return out
        return self._step(hidden, token_ids, positions, cache, mask, last_only)

    def _step(
        self, hidden: Tensor, token_ids: Tensor, positions: Tensor, cache: KVCache, mask: Tensor, last_only: bool
    ) -> tuple[Tensor, Tensor]:
        if self.packed is not None and self._on_kernel(hidden):
            return self._kernel_step(hidden, token_ids, positions, cache, mask, last_only)
        q, k, v, residual = self.project(hidden, token_ids)
        rope = self.config.rope
        keys, values = cache.append(rotate(k, positions, rope), v)
        heads, n, dim = q.shape
        kv_heads = keys.shape[0]
        group = heads // kv_heads
        q = rotate(q, positions, rope)
        if self._on_kernel(q):
            attended = self.kernel.attention(q.transpose(0, 1), keys, values, keys.shape[1], mask)
            attended = attended.view(n, heads, dim).transpose(0, 1)
        else:
            # grouped query heads folded into the query length (row g * N + i is head (kv, g) at pair i), so the
            # cache is attended where it lies instead of being copied once per query head every call
            folded = q.reshape(1, kv_heads, group * n, dim)
            attended = F.scaled_dot_product_attention(folded, keys[None], values[None], attn_mask=mask.repeat(group, 1))
        normed, hidden = self.finish(residual, attended.reshape(heads, n, dim))
        return self.lm_head(normed[-1:] if last_only else normed), hidden

    def _kernel_step(
        self, hidden: Tensor, token_ids: Tensor, positions: Tensor, cache: KVCache, mask: Tensor, last_only: bool
    ) -> tuple[Tensor, Tensor]:
        """`step` as one decoder_layer call: the same layer on the same quantized weights."""
        c, n = self.config, hidden.shape[0]
        cos, signed_sin = rotary_rows(positions, c.head_dim, c.rope, hidden.dtype, hidden.device)
        cache.reserve(n)
        out = self.kernel.decoder_layer(
            hidden.contiguous(),
            *self.packed,
            cos.contiguous(),
            signed_sin.contiguous(),
            cache.data,
            cache.length,
            mask,
            c.num_heads,
            c.rms_norm_eps,
            self.attention_input(hidden, token_ids)[0],
        )
        cache.length += n
        return self.lm_head(self._norm(self.final_norm, out[-1:] if last_only else out)), out

    def unroll(self, features: Tensor, token_ids: Tensor, steps: int) -> list[Tensor]:
        """Training-time test (EAGLE-3): draft logits of `steps` unrolled predictions for one sequence.

        features (T, F, H) and token_ids (T,). Step k's query at pair t reads token t+k+1 and predicts token
        t+k+2; it attends causally to the step-0 keys (the real context) and to its own keys of steps 1..k at
        the same pair (its drafted ancestors), exactly what tree drafting sees. Returns, per step, the normed
        outputs (T-2-k, H) that `lm_head` turns into logits (training applies it only where a label counts)."""
        c = self.config
        n = token_ids.numel() - 2
        scale = c.head_dim**-0.5
        hidden = self.fuse(features[:n])
        q, k, v, residual = self.project(hidden, token_ids[1 : n + 1])
        positions = torch.arange(n, device=token_ids.device)
        k0 = self._expand_kv(rotate(k, positions, c.rope))
        v0 = self._expand_kv(v)
        causal = torch.ones(n, n, dtype=torch.bool, device=token_ids.device).tril()
        attended = F.scaled_dot_product_attention(rotate(q, positions, c.rope), k0, v0, attn_mask=causal)
        normed, hidden = self.finish(residual, attended)
        out, diag_keys, diag_values = [normed], [], []
        for step in range(1, steps):
            m = n - step
            if m <= 0:
                break
            hidden = hidden[:m]
            q, k, v, residual = self.project(hidden, token_ids[step + 1 : step + 1 + m])
            positions = torch.arange(step, step + m, device=token_ids.device)
            q = rotate(q, positions, c.rope)
            diag_keys = [d[:, :m] for d in diag_keys] + [self._expand_kv(rotate(k, positions, c.rope))]
            diag_values = [d[:, :m] for d in diag_values] + [self._expand_kv(v)]
            context_scores = (q @ k0[:, :m].transpose(1, 2)) * scale  # (heads, m, m): pairs j <= t
            context_scores = context_scores.masked_fill(~causal[:m, :m], float("-inf"))
            own_scores = torch.stack([(q * d).sum(-1) for d in diag_keys], dim=-1) * scale  # (heads, m, step)
            weights = torch.cat([context_scores, own_scores], dim=-1).softmax(-1)
            attended = weights[..., :m] @ v0[:, :m] + (weights[..., m:, None] * torch.stack(diag_values, dim=2)).sum(2)
            normed, hidden = self.finish(residual, attended)
            out.append(normed)
        return out

    def save(self, directory: Path, card: str | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        """Write the head as a whole: a reader finds the old head or the new one, never a mix."""
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        with atomic_directory(directory) as staging:
            save_file(tensors, str(staging / "head.safetensors"))
            (staging / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            if card is not None:
                (staging / "README.md").write_text(card)

    @classmethod
    def load(cls, directory: Path, dtype: torch.dtype = torch.float32, device="cpu") -> DraftHead:
        directory = Path(directory)
        if not (directory / "head.safetensors").exists() or not (directory / "config.json").exists():
            raise DraftwiseError(f"no draft head in {directory} (needs head.safetensors and config.json)")
        raw = json.loads((directory / "config.json").read_text())
        raw["feature_layers"] = tuple(raw["feature_layers"])
        if raw.get("rope_llama3") is not None:
            raw["rope_llama3"] = tuple(raw["rope_llama3"])
        # built in the target's dtype, not loaded into fp32: bf16 halves a head call on CPUs with bf16 units
        head = cls(DraftHeadConfig(**raw)).to(dtype)
        state = load_file(str(directory / "head.safetensors"))
        head.load_state_dict(state)
        return head.to(device).eval()


def init_from_target(head: DraftHead, target_model, layer: int | None = None) -> DraftHead:
    """Start from the target's last decoder layer and its (tied) LM head rows for the draft vocabulary:
    a far better starting point than random for a small training budget."""
    layers = target_model.model.layers
    if layer is None:  # the layer the highest fused feature enters
        layer = min(head.config.feature_layers[-1], len(layers) - 1)
    source = layers[layer]
    h = head.config.hidden_size
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            weight = getattr(source.self_attn, name).weight
            getattr(head, name).weight.zero_()
            getattr(head, name).weight[:, h:] = weight  # the hidden half; the token half learns from zero
        head.o_proj.weight.copy_(source.self_attn.o_proj.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(head, name).weight.copy_(getattr(source.mlp, name).weight)
        head.hidden_norm.weight.copy_(source.input_layernorm.weight)
        head.post_attention_norm.weight.copy_(source.post_attention_layernorm.weight)
        head.final_norm.weight.copy_(target_model.model.norm.weight)
        head.lm_head.weight.copy_(target_model.lm_head.weight[head.draft_to_target])
        if head.fc is not None:  # start by passing the highest fused layer through
            head.fc.weight.zero_()
            head.fc.weight[:, -h:] = torch.eye(h)
    return head
