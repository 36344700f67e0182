"""The lean engine: the same numbers as transformers in fp32 (logits, features, the cache after a commit; greedy
losslessness for every drafter is in test_lossless), int4 weights only where they are exact, and speculative
decoding on 4-bit weights equal to its own plain decoding up to bf16 near-ties."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    OracleDrafter,
    RandomDrafter,
    run,
    tiny_eagle,
    tiny_llama,
)

from draftwise.core.drafter import NoDraft
from draftwise.core.errors import DraftwiseError
from draftwise.core.kernels import avx512_kernel, grid_kernel
from draftwise.core.tree import DraftTree
from draftwise.core.verify import NEAR_TIE_EPSILON, compare_greedy
from draftwise.drafters.eagle import EagleDrafter
from draftwise.engine import choose_engine
from draftwise.targets.hf import HFTarget
from draftwise.targets.lean.linears import GridLinear, Int4Groups, VnniLinear, gguf_grid, quantize_draft_linears
from draftwise.targets.lean.model import LeanTarget, lean_supported

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]


def test_lean_forward_matches_transformers_in_fp32(tiny_model):
    layers = (0, 1, 2)
    hf, lean = HFTarget(tiny_model, layers), LeanTarget(tiny_model, layers)
    torch.testing.assert_close(lean.prefill(torch.tensor(PROMPT)), hf.prefill(torch.tensor(PROMPT)))
    tree = DraftTree(torch.tensor([7, 11, 12, 13, 14, 15]), torch.tensor([-1, 0, 0, 1, 2, 2]), torch.zeros(6))
    ours, ref = lean.forward_tree(tree), hf.forward_tree(tree)
    torch.testing.assert_close(ours.logits, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.features, ref.features, atol=1e-5, rtol=1e-5)
    # after keeping the branch 0 -> 2 -> 5, both caches continue identically
    hf.commit(len(PROMPT), [0, 2, 5])
    lean.commit(len(PROMPT), [0, 2, 5])
    assert lean.length == hf.length == len(PROMPT) + 3
    step = DraftTree.root_only(9)
    torch.testing.assert_close(lean.forward_tree(step).logits, hf.forward_tree(step).logits, atol=1e-4, rtol=1e-4)


def test_lean_rejects_what_it_cannot_run():
    model = tiny_llama()
    assert lean_supported(model)
    model.config.mlp_bias = True
    assert not lean_supported(model)
    assert choose_engine("auto", "eagle") == "lean"
    with pytest.raises(DraftwiseError, match="hidden features"):
        choose_engine("llama", "eagle")
    with pytest.raises(DraftwiseError, match="unknown engine"):
        choose_engine("vllm", "ar")
    target = LeanTarget(tiny_llama(max_positions=16))
    with pytest.raises(ValueError, match="exceeds"):
        target.prefill(torch.arange(17))


def on_4bit_grid(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """`weight` snapped to a Q4_1-style grid: per group of 32, 16 levels from the group's min to its max."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = weight.shape
    codes = torch.randint(0, 16, (rows, cols // 32, 32), generator=generator).float()
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans its whole grid, as a quantizer's output does
    scale = weight.reshape(rows, cols // 32, 32).std(-1, keepdim=True).half().float() / 4
    low = (weight.reshape(rows, cols // 32, 32).mean(-1, keepdim=True) - 8 * scale).half().float()  # fp16, as a GGUF's
    return (codes * scale + low).reshape(rows, cols)


def quantized_llama(vocab: int = 96) -> torch.nn.Module:
    """A tiny llama whose decoder matrices lie on a 4-bit grid, as a dequantized Q4_1 GGUF's do."""
    model = tiny_llama(vocab, seed=5, layers=2)
    with torch.no_grad():
        for i, module in enumerate(model.model.layers.modules()):
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(on_4bit_grid(module.weight, seed=i))
    return model


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no int4 CPU kernel")
def test_int4_groups_only_where_exact_and_same_product():
    weight = on_4bit_grid(torch.randn(64, 128), seed=1)
    packed = Int4Groups.exact(weight)
    assert packed is not None
    assert Int4Groups.exact(torch.randn(64, 128)) is None  # off-grid weights stay dense
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(packed(x).float(), x.float() @ weight.t(), atol=0.1, rtol=0.02)
    big = torch.randn(40, 128, dtype=torch.bfloat16)  # a prefill: the dense copy
    assert packed(big).dtype == torch.bfloat16
    torch.testing.assert_close(packed(big).float(), big.float() @ weight.t(), atol=0.1, rtol=0.02)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no int4 CPU kernel")
@pytest.mark.parametrize("native", [True, False])
def test_int4_dense_copy_follows_the_cpu(monkeypatch, native):
    """Where bf16 is emulated (AVX2) the dense copy for prefills is fp32 and the Q8_0 LM head stays int4 longer."""
    monkeypatch.setattr("draftwise.targets.lean.linears.cpu_has_native_bf16", lambda: native)
    layer = Int4Groups.exact(on_4bit_grid(torch.randn(64, 128), seed=2))
    assert layer.dense.dtype == (torch.bfloat16 if native else torch.float32)
    assert layer.max_rows == Int4Groups.MAX_ROWS[native][1]


COMPUTES = {  # name: (dtype, the kernel it needs, or None for torch's int4 kernel)
    "bfloat16+int4": (torch.bfloat16, None),
    "float32+int4": (torch.float32, grid_kernel),
    "float32+w4a8": (torch.float32, avx512_kernel),
}


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no int4 CPU kernel")
@pytest.mark.parametrize("compute", list(COMPUTES))
def test_speculation_on_4bit_weights_equals_its_own_plain_decoding(compute, monkeypatch):
    """bf16 (torch's int4 kernel): up to near-ties. fp32 on the grid (the AVX2 kernel, or the AVX-512 one with int8
    activations and its own attention): token for token, because each row's product and attention have the same
    bits whatever the rows beside it and whatever cache slot a tree node sits in."""
    dtype, kernel = COMPUTES[compute]
    if kernel is not None and kernel() is None:
        pytest.skip(f"{compute} needs a kernel this CPU cannot run")
    if compute == "float32+int4":
        # the AVX2 kernel even where VNNI is
        monkeypatch.setattr("draftwise.targets.lean.linears.avx512_kernel", lambda: None)
    model = quantized_llama()

    def lean_int4(m, layers=()):
        return LeanTarget(m, layers, dtype=dtype, int4=True)

    target = lean_int4(model)
    assert target.compute.name == compute
    assert (target.attention is not None) == (target.kernel is not None) == (compute == "float32+w4a8")
    reference, plain = run(model, NoDraft(), PROMPT, 40, target_class=lean_int4)
    truth = reference + [0] * 20
    eagle = EagleDrafter(tiny_eagle(copy.deepcopy(model).to(dtype)).head.to(dtype), 8, 2, 8)
    drafters = [RandomDrafter(96, nodes=12), OracleDrafter(PROMPT, truth, 96, depth=6, width=3, error_rate=0.2), eagle]
    for drafter in drafters:
        out, _ = run(model, drafter, PROMPT, 40, target_class=lean_int4)
        if dtype == torch.float32:
            assert out == reference, f"{drafter.name} diverged from plain decoding on grid weights in {compute}"
        else:  # a tree forward may round a near-tie the other way (verify.compare_greedy), nothing else
            verdict = compare_greedy(reference, plain.margins, out, NEAR_TIE_EPSILON["bf16"])
            assert verdict != "mismatch", f"{drafter.name} diverged from plain decoding on int4 weights"


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no int4 CPU kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_draft_linears_on_the_nearest_4bit_grid_stay_close(dtype):
    if dtype == torch.float32 and grid_kernel() is None:
        pytest.skip("fp32 drafters use the grid kernel")
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 32, bias=True))
    head = head.to(dtype)
    x = torch.randn(5, 64, dtype=dtype)
    before = head(x).float()
    assert quantize_draft_linears(head) == 1  # the biased layer is left alone
    after = head(x).float()
    assert not torch.equal(before, after)  # lossy, as a drafter may be
    assert (after - before).norm() < 0.15 * before.norm()


def on_8bit_grid(weight: torch.Tensor) -> torch.Tensor:
    """`weight` snapped to a Q8_0-style grid: per group of 32, scale * q with q in -127..127."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 32, 32)
    scale = (groups.abs().amax(-1, keepdim=True) / 127).half().float()
    return (torch.round(groups / scale).clamp(-127, 127) * scale).reshape(rows, cols)


needs_grid_kernel = pytest.mark.skipif(grid_kernel() is None, reason="no AVX2 grid kernel on this machine")


@needs_grid_kernel
@pytest.mark.parametrize("grid", ["q4_1", "q8_0"])
def test_grid_kernel_is_exact_and_gives_each_row_the_same_bits(grid):
    torch.manual_seed(0)
    raw = torch.randn(96, 160)
    weight = on_4bit_grid(raw, seed=3) if grid == "q4_1" else on_8bit_grid(raw)
    assert (gguf_grid(weight).low is None) == (grid == "q8_0")
    layer = GridLinear.exact(weight)
    x = torch.randn(11, 160)
    y = layer(x)
    torch.testing.assert_close(y, (x.double() @ weight.double().t()).float(), atol=1e-5, rtol=1e-5)
    # a row's output does not depend on the rows beside it: what makes tree verification exact in fp32
    for rows in (slice(0, 1), slice(2, 5), slice(3, 11)):
        assert torch.equal(layer(x[rows]), y[rows])
    prefill = torch.randn(GridLinear.MAX_ROWS + 1, 160)  # dense fp32 copy
    torch.testing.assert_close(layer(prefill), prefill @ weight.t(), atol=1e-4, rtol=1e-4)
    assert GridLinear.exact(torch.randn(96, 160)) is None  # off the grid: stays dense


def test_without_the_grid_kernels_fp32_weights_stay_dense(monkeypatch):
    monkeypatch.setattr("draftwise.targets.lean.linears.grid_kernel", lambda: None)
    monkeypatch.setattr("draftwise.targets.lean.linears.avx512_kernel", lambda: None)
    target = LeanTarget(quantized_llama(), dtype=torch.float32, int4=True)
    assert target.compute.name == "float32"


needs_avx512_kernel = pytest.mark.skipif(avx512_kernel() is None, reason="no AVX-512 VNNI on this machine")


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the VNNI kernel sees it: per row and group of 32, round(x * 127 / max|x|) * max|x| / 127."""
    groups = x.reshape(x.shape[0], -1, 32)
    top = groups.abs().amax(-1, keepdim=True)
    return (torch.round(groups * (127 / top)) * (top / 127)).reshape(x.shape)


@needs_avx512_kernel
@pytest.mark.parametrize("grid", ["q4_1", "q8_0"])
@pytest.mark.parametrize("outputs", [96, 128])  # 96: the last outputs are not a whole block of 64
def test_vnni_kernel_is_the_int8_product_and_gives_each_row_the_same_bits(grid, outputs):
    torch.manual_seed(0)
    raw = torch.randn(outputs, 160)
    weight = on_4bit_grid(raw, seed=3) if grid == "q4_1" else on_8bit_grid(raw)
    layer = VnniLinear.exact(weight)
    x = torch.randn(19, 160)
    y = layer(x)
    expected = (int8_rows(x).double() @ weight.double().t()).float()
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)
    assert (y - x @ weight.t()).abs().max() < 0.05 * y.abs().max()  # int8 activations: close to fp32, not equal
    for rows in (slice(0, 1), slice(2, 5), slice(3, 12), slice(0, 19)):
        assert torch.equal(layer(x[rows]), y[rows])


@needs_avx512_kernel
def test_vnni_grids_keep_fp16_scales_and_refuse_what_fp16_cannot_hold():
    """Scales and mins are stored in fp16 (a GGUF's are): a grid whose min needs fp32 is not taken as exact."""
    weight = on_4bit_grid(torch.randn(64, 128), seed=2)
    layer = VnniLinear.exact(weight)
    assert layer is not None and layer.scale.dtype == layer.low.dtype == torch.float16
    grid = gguf_grid(weight)
    fp32_mins = grid.low[..., None] + 1e-6  # no longer fp16 values
    off_fp16 = (grid.codes.reshape(64, 4, 32) * grid.scale[..., None] + fp32_mins).reshape(64, 128)
    assert gguf_grid(off_fp16) is not None and VnniLinear.exact(off_fp16) is None


@needs_avx512_kernel
@pytest.mark.parametrize("head_dim", [16, 64])
def test_attention_kernel_matches_sdpa_and_ignores_slots_and_neighbours(head_dim):
    torch.manual_seed(0)
    attention = avx512_kernel().attention
    heads, kv_heads, n, length = 6, 2, 5, 45
    cache = torch.randn(2, kv_heads, 64, head_dim)
    q = torch.randn(n, heads, head_dim)
    visible = torch.rand(n, length) > 0.3
    visible[:, 0] = True
    out = attention(q, cache[0], cache[1], length, visible)
    keys, values = (cache[None, i, :, :length].repeat_interleave(heads // kv_heads, 1) for i in (0, 1))
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=visible)
    torch.testing.assert_close(out, ref[0].transpose(0, 1).reshape(n, -1), atol=2e-6, rtol=1e-5)
    for i in range(n):  # alone, and with its visible slots packed to the front (where an accepted node lands)
        assert torch.equal(attention(q[i : i + 1], cache[0], cache[1], length, visible[i : i + 1]), out[i : i + 1])
        seen = visible[i].nonzero().flatten()
        packed = cache[:, :, seen].contiguous()
        assert torch.equal(attention(q[i : i + 1], packed[0], packed[1], len(seen), None), out[i : i + 1])


@needs_avx512_kernel
def test_fused_decoder_layer_is_the_layer_and_gives_each_row_the_same_bits():
    """csrc/avx512.cpp's decoder_layer against the same layer in PyTorch ops on the same kernels, and each row
    alone against the rows together (cache slots included)."""
    torch.manual_seed(0)
    target = LeanTarget(quantized_llama(), dtype=torch.float32, int4=True)
    kernel, layer = target.kernel, target.layers[0]
    heads, kv_heads, dim, start, n = target.heads, target.kv_heads, target.head_dim, 7, 5
    x = torch.randn(n, target.config.hidden_size)
    cache = torch.zeros(2, kv_heads, 32, dim)
    cache[:, :, :start] = torch.randn(2, kv_heads, start, dim)
    reference_cache = cache.clone()
    positions = torch.arange(start, start + n)
    cos, sin = target.cos[positions].contiguous(), target.signed_sin[positions].contiguous()
    out = kernel.decoder_layer(x, *layer.packed, cos, sin, cache, start, None, heads, target.eps, None)

    norm = torch.nn.functional.rms_norm
    qkv = layer.qkv(norm(x, (x.shape[1],), layer.norm1, target.eps))
    qk = qkv[:, : (heads + kv_heads) * dim].view(n, heads + kv_heads, dim)
    qk = qk * cos[:, None] + qk.roll(dim // 2, -1) * sin[:, None]
    reference_cache[0, :, start : start + n] = qk[:, heads:].transpose(0, 1)
    reference_cache[1, :, start : start + n] = qkv[:, (heads + kv_heads) * dim :].view(n, kv_heads, dim).transpose(0, 1)
    mid = x + layer.o(kernel.attention(qk[:, :heads], reference_cache[0], reference_cache[1], start + n, None))
    gate, up = layer.gate_up(norm(mid, (x.shape[1],), layer.norm2, target.eps)).chunk(2, -1)
    expected = mid + layer.down(torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(cache, reference_cache, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # row i alone, after rows < i were written: bit for bit what it got among all n rows
    for i in range(n):
        alone = cache.clone()
        row = kernel.decoder_layer(
            x[i : i + 1], *layer.packed, cos[i : i + 1], sin[i : i + 1], alone, start + i, None, heads, target.eps, None
        )
        assert torch.equal(row, out[i : i + 1])


def test_verify_cost_grows_with_the_context_it_is_asked_at():
    """Timed at 128 and 1,024 tokens, the cost at 1,500 extrapolates both the step and the per-node cost."""
    from draftwise.targets.lean.model import context_verify_cost

    length = [0]
    cost = context_verify_cost([(128, 0.006, 0.0004), (1024, 0.008, 0.0012)], lambda: length[0])
    assert cost(1) == pytest.approx(0.006) and cost(8) == pytest.approx(0.006 + 7 * 0.0004)  # short: as timed
    length[0] = 1024
    assert cost(8) == pytest.approx(0.008 + 7 * 0.0012)
    length[0] = 1920  # one more span: every term grows by as much again
    assert cost(1) == pytest.approx(0.010) and cost(8) == pytest.approx(0.010 + 7 * 0.0020)
    flat = context_verify_cost([(128, 0.006, 0.0004), (1024, 0.005, 0.0003)], lambda: 5000)  # noise: never cheaper
    assert flat(4) == pytest.approx(0.006 + 3 * 0.0004)


def test_huge_page_copies_hold_the_same_tensors(monkeypatch):
    """`in_huge_pages` copies bytes, dtypes and shapes exactly, 64-byte aligned, into one mapping; switched off it
    hands the tensors back untouched."""
    import mmap

    from draftwise.targets.lean.memory import in_huge_pages

    tensors = [torch.randn(3, 5), torch.randint(0, 255, (7, 64), dtype=torch.uint8), torch.randn(9).half()]
    copies, arena = in_huge_pages(tensors)
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        assert arena is None and copies is tensors
        return
    assert arena is not None
    for tensor, moved in zip(tensors, copies, strict=True):
        assert moved.dtype == tensor.dtype and moved.shape == tensor.shape and torch.equal(moved, tensor)
        assert moved.data_ptr() % 64 == 0 and moved.data_ptr() != tensor.data_ptr()
    monkeypatch.setenv("DRAFTWISE_HUGE_PAGES", "0")
    assert in_huge_pages(tensors) == (tensors, None)
