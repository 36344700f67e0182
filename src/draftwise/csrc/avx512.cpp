// Kernels for the lean engine's fp32 path on AVX-512 CPUs. First, y = x W^T for W on a GGUF block grid (Q4_1 or Q8_0, groups of 32 along the input), for CPUs with AVX-512 VNNI,
// the way llama.cpp computes it: each activation row is quantized per group of 32 to int8 (scale = max|x| / 127),
// each group's dot product runs exactly in int32 (vpdpbusd: 64 multiply-adds an instruction, 4x fp32 FMAs), and
// the group's sum is scaled in fp32.
//
// Why: on a 2-core CPU a tree of 8 nodes cost ~2 decode steps with PyTorch's int4 kernel (it re-dequantizes the
// weights every few rows) and ~5x a one-row product with fp32 FMAs. Here the weights are never dequantized: the
// codes feed the integer dot product as they are, and each extra row costs its int8 multiply-adds only.
// Every row is quantized on its own and its sums run in the same order whatever the rows beside it, so a tree
// node gets bit for bit the output a lone decode step would.
//
// Per row r, output o, group g (x ~ dx[r, g] * qx[r, k], qx in -127..127):
//   y[r, o] = sum_g  d[o, g] * dx[r, g] * sum_k q[o, k] qx[r, k]  +  low[o, g] * (dx[r, g] * sum_k qx[r, k])
// Q4_1: q = the code (0..15), low = the GGUF's min. Q8_0: low = 0, and q is stored as code + 128 (1..255:
// vpdpbusd takes unsigned weights), the offset 128 * sum_k qx[r, k] taken off again in int32.
//
// Layout (16-output tiles t, 64-byte chunks c; byte 4j + i of a chunk belongs to output 16t + j):
//   Q4_1 codes: uint8 [tiles, K / 8, 64], chunk c holds inputs 8c + i (low nibble) and 8c + 4 + i (high nibble)
//   Q8_0 codes: uint8 [tiles, K / 4, 64], chunk c holds inputs 4c + i
//   scale, low: fp16 [tiles, G, 16] (the GGUF stores them in fp16: 2 bytes a group each, where fp32 made them a
//   third of a Q4_1 layer's bytes, and a decode step streams every byte)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int kRows = 8;  // rows per block; more rows run as further blocks over the same (cached) tiles
// each load also prefetches the same bytes of the tile this many tiles on (the next block of 64 outputs): a lone
// row's product streams the weights from DRAM, and the hardware prefetcher alone reached half its bandwidth. Into
// L2 (T1), not L1: 4 tiles on is 18-48 KB ahead, more than a 32 KB L1 keeps (T0 made a whole forward 10-15% slower)
constexpr int kAhead = 4;

// 16 fp16 values as fp32 (exact)
inline __m512 half16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// Rows x Tiles accumulators; the op sequence per (row, output) is the same in every instantiation.
template <int Rows, int Tiles, bool Nibbles>
inline void block_product(const int8_t* qx, const float* dx, const float* sx, const int32_t* qsum, int64_t K, const uint8_t* codes,
                          int64_t code_stride, const uint16_t* scale, const uint16_t* low, int64_t scale_stride, float* y,
                          int64_t ldy) {
  const int64_t G = K / kGroup;
  __m512 sum[Rows][Tiles];
  for (int r = 0; r < Rows; ++r)
    for (int t = 0; t < Tiles; ++t) sum[r][t] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(15);
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[Rows][Tiles];
    for (int r = 0; r < Rows; ++r)
      for (int t = 0; t < Tiles; ++t) acc[r][t] = _mm512_setzero_si512();
    if constexpr (Nibbles) {
      for (int64_t c = g * 4; c < g * 4 + 4; ++c) {  // 8 inputs a chunk
        __m512i lo[Tiles], hi[Tiles];
        for (int t = 0; t < Tiles; ++t) {
          _mm_prefetch(reinterpret_cast<const char*>(codes + (t + kAhead) * code_stride + c * 64), _MM_HINT_T1);
          const __m512i w = _mm512_loadu_si512(codes + t * code_stride + c * 64);
          lo[t] = _mm512_and_si512(w, nibble);
          hi[t] = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
        }
        for (int r = 0; r < Rows; ++r) {
          const int32_t* xr = reinterpret_cast<const int32_t*>(qx + r * K + c * 8);
          const __m512i xa = _mm512_set1_epi32(xr[0]), xb = _mm512_set1_epi32(xr[1]);
          for (int t = 0; t < Tiles; ++t) {
            acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], lo[t], xa);
            acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], hi[t], xb);
          }
        }
      }
    } else {
      for (int64_t c = g * 8; c < g * 8 + 8; ++c) {  // 4 inputs a chunk
        __m512i w[Tiles];
        for (int t = 0; t < Tiles; ++t) {
          _mm_prefetch(reinterpret_cast<const char*>(codes + (t + kAhead) * code_stride + c * 64), _MM_HINT_T1);
          w[t] = _mm512_loadu_si512(codes + t * code_stride + c * 64);
        }
        for (int r = 0; r < Rows; ++r) {
          const __m512i xa = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(qx + r * K + c * 4)[0]);
          for (int t = 0; t < Tiles; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], w[t], xa);
        }
      }
      for (int r = 0; r < Rows; ++r) {
        const __m512i offset = _mm512_set1_epi32(128 * qsum[r * G + g]);
        for (int t = 0; t < Tiles; ++t) acc[r][t] = _mm512_sub_epi32(acc[r][t], offset);
      }
    }
    for (int t = 0; t < Tiles; ++t) {
      _mm_prefetch(reinterpret_cast<const char*>(scale + (t + kAhead) * scale_stride + g * 16), _MM_HINT_T1);
      if constexpr (Nibbles) _mm_prefetch(reinterpret_cast<const char*>(low + (t + kAhead) * scale_stride + g * 16), _MM_HINT_T1);
      const __m512 d = half16(scale + t * scale_stride + g * 16);
      for (int r = 0; r < Rows; ++r) {
        const __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][t]), d);
        sum[r][t] = _mm512_fmadd_ps(part, _mm512_set1_ps(dx[r * G + g]), sum[r][t]);
        if constexpr (Nibbles)
          sum[r][t] = _mm512_fmadd_ps(half16(low + t * scale_stride + g * 16), _mm512_set1_ps(sx[r * G + g]), sum[r][t]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int t = 0; t < Tiles; ++t) _mm512_storeu_ps(y + r * ldy + t * 16, sum[r][t]);
}

using BlockFn = void (*)(const int8_t*, const float*, const float*, const int32_t*, int64_t, const uint8_t*, int64_t,
                         const uint16_t*, const uint16_t*, int64_t, float*, int64_t);

#include "block_table.h"  // kBlocks, kTiles
// one tile at a time, for the last tiles of a weight whose outputs are not a multiple of 64
template <bool Nibbles>
constexpr BlockFn kSingles[9] = {
    nullptr,
    block_product<1, 1, Nibbles>, block_product<2, 1, Nibbles>, block_product<3, 1, Nibbles>,
    block_product<4, 1, Nibbles>, block_product<5, 1, Nibbles>, block_product<6, 1, Nibbles>,
    block_product<7, 1, Nibbles>, block_product<8, 1, Nibbles>,
};

// Row r, group g: qx = round(x * 127 / max|x|), dx = max|x| / 127, qsum = sum(qx), sx = dx * qsum. The same
// IEEE operations as a scalar loop (max is exact, one product and one round-to-nearest-even per value), 32 lanes
// at a time: a scalar loop took ~2 ns a value, a fifth of a tree node's cost in a layer.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* qx, float* dx, float* sx, int32_t* qsum) {
  const int64_t G = K / kGroup;
  for (int64_t i = 0; i < M * G; ++i) {
    const __m512 a = _mm512_loadu_ps(x + i * kGroup), b = _mm512_loadu_ps(x + i * kGroup + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m512 scale = _mm512_set1_ps(inv);
    const __m512i qa = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i qb = _mm512_cvt_roundps_epi32(_mm512_mul_ps(b, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qx + i * kGroup), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qx + i * kGroup + 16), _mm512_cvtsepi32_epi8(qb));
    const int total = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    dx[i] = d;
    qsum[i] = total;
    sx[i] = d * static_cast<float>(total);
  }
}

}  // namespace

torch::Tensor vnni_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor low, bool nibbles) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x: fp32 (rows, K)");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 3 && codes.size(2) == 64, "codes: uint8 (tiles, chunks, 64)");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), tiles = codes.size(0), G = K / kGroup;
  TORCH_CHECK(K % kGroup == 0 && tiles > 0 && codes.size(1) == (nibbles ? K / 8 : K / 4) &&
                  scale.sizes() == low.sizes() && scale.size(0) == tiles && scale.size(1) == G && scale.size(2) == 16,
              "shapes of x, codes, scale and low disagree");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && low.scalar_type() == torch::kHalf && scale.is_contiguous() &&
                  low.is_contiguous(), "scale and low: contiguous fp16");
  auto qx = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto dx = torch::empty({M, G}, x.options());
  auto sx = torch::empty({M, G}, x.options());
  auto qsum = torch::empty({M, G}, x.options().dtype(torch::kInt32));
  quantize_rows(x.data_ptr<float>(), M, K, qx.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>(),
                qsum.data_ptr<int32_t>());
  const int32_t* qs_sum = qsum.data_ptr<int32_t>();
  auto y = torch::empty({M, tiles * 16}, x.options());
  const int8_t* qs = qx.data_ptr<int8_t>();
  const float *ds = dx.data_ptr<float>(), *ss = sx.data_ptr<float>();
  const auto* scales = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const auto* lows = reinterpret_cast<const uint16_t*>(low.data_ptr<at::Half>());
  const auto* cs = codes.data_ptr<uint8_t>();
  const int64_t code_stride = codes.size(1) * 64, scale_stride = G * 16, ldy = tiles * 16;
  float* ys = y.data_ptr<float>();
  // the parallel unit: 4 tiles (64 outputs) for one or two rows, whose products stream the weights and want long
  // runs of them, else 2 tiles, so that the 36 tiles of a 576-output weight split evenly between two threads;
  // within a unit, each tile width runs every row block while its codes are in cache
  const int64_t unit = M <= 2 ? 4 : 2;
  at::parallel_for(0, (tiles + unit - 1) / unit, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * unit, last = std::min<int64_t>(first + unit, tiles);
      for (int64_t r = 0; r < M; r += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, M - r));
        const bool whole = last - first == unit && kTiles[rows] <= unit;
        const int width = whole ? kTiles[rows] : 1;
        const BlockFn fn = whole ? (nibbles ? kBlocks<true>[rows] : kBlocks<false>[rows])
                                 : (nibbles ? kSingles<true>[rows] : kSingles<false>[rows]);
        for (int64_t t = first; t < last; t += width)
          fn(qs + r * K, ds + r * G, ss + r * G, qs_sum + r * G, K, cs + t * code_stride, code_stride, scales + t * scale_stride,
             lows + t * scale_stride, scale_stride, ys + r * ldy + t * 16, ldy);
      }
    }
  });
  return y;
}

// --- attention --------------------------------------------------------------------------------------------
// Why: PyTorch's CPU flash attention gives a query row different bits depending on how many rows come with it,
// and in fp32 it costs ~130 us a layer for one token at a 300-token context. Here each (head, query row) runs
// its own fixed sequence: scores against every key it may see, in slot order, a softmax whose sums run over the
// slots in the same order, and the weighted sum of values, skipping the slots it may not see. A tree node's
// output is then bit for bit a lone decode step's, given the same keys and values in the same slots. The pairs
// that share a KV head are interleaved block by block, so a tree reads each block of keys and values once.

namespace {

// e^x for x <= 0, 2^(x log2 e) split into an integer and a fraction in [-1/2, 1/2], whose power of 2 is a degree-7
// Taylor polynomial (relative error < 1e-8 before rounding).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, whole), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, whole);
}

// The slots a query row may see, 16 at a time: keep[b] has bit jj set for slot 16 b + jj.
void visible_blocks(const bool* seen, int64_t length, int64_t last, __mmask16* keep) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j0 = 0, b = 0; j0 < length; j0 += 16, ++b) {
    const __m512i slot = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j0)), lane);
    __mmask16 bits = _mm512_cmplt_epi32_mask(slot, _mm512_set1_epi32(static_cast<int32_t>(length)));
    if (!seen) {
      bits &= _mm512_cmple_epi32_mask(slot, _mm512_set1_epi32(static_cast<int32_t>(last)));
    } else if (j0 + 16 <= length) {  // 16 bools (0 or 1) to 16 bits
      const __m128i flags = _mm_loadu_si128(reinterpret_cast<const __m128i*>(seen + j0));
      bits &= static_cast<__mmask16>(_mm_movemask_epi8(_mm_cmpgt_epi8(flags, _mm_setzero_si128())));
    } else {
      __mmask16 tail = 0;
      for (int jj = 0; j0 + jj < length; ++jj) tail |= static_cast<__mmask16>(seen[j0 + jj]) << jj;
      bits &= tail;
    }
    keep[b] = bits;
  }
}

// The scores of one (query row, head) against 16 slots from j0: 16 dot-product vectors, summed lane-pairwise in
// 4 rounds (each slot's sum in the same order wherever it falls), slots it may not see set to -inf.
template <int Vectors>
inline __m512 block_scores(const float* q, const float* kh, int64_t j0, int64_t length, __mmask16 keep) {
  constexpr int64_t D = Vectors * 16;
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512 part[16];
  for (int jj = 0; jj < 16; ++jj) {
    const int64_t j = std::min(j0 + jj, length - 1);  // past the end: any real slot, masked below
    part[jj] = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kh + j * D));
    for (int c = 1; c < Vectors; ++c)
      part[jj] = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), _mm512_loadu_ps(kh + j * D + 16 * c), part[jj]);
  }
  for (int width = 16; width > 1; width /= 2)
    for (int m = 0; m < width / 2; ++m)
      part[m] = _mm512_add_ps(_mm512_permutex2var_ps(part[2 * m], evens, part[2 * m + 1]),
                              _mm512_permutex2var_ps(part[2 * m], odds, part[2 * m + 1]));
  return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, part[0]);
}

// Every (query row, head) pair that reads one KV head, together: each block of keys, then of values, is loaded
// once and used by all of them while it sits in L1. Each pair still runs its own fixed sequence of operations
// (scores, softmax, weighted values, all in slot order), so its output does not depend on the other pairs.
template <int Vectors>
void attend_kv_head(const float* qs, int64_t q_stride, const int64_t* pairs, int64_t count, const float* kh,
                    const float* vh, int64_t length, const __mmask16* keep, int64_t blocks, float scale, float* work,
                    float* os, int64_t o_stride) {
  constexpr int64_t D = Vectors * 16, kValueBlock = 32;
  const int64_t padded = blocks * 16;
  float* scaled = work;                // (count, D): each pair's query times the scale
  float* scores = scaled + count * D;  // (count, padded)
  float* acc = scores + count * padded;  // (count, D)
  std::vector<float> tops(count * 16, -INFINITY), total(count, 0.f);
  for (int64_t p = 0; p < count; ++p) {
    const int64_t row = pairs[2 * p], head = pairs[2 * p + 1];
    for (int c = 0; c < Vectors; ++c)
      _mm512_storeu_ps(scaled + p * D + 16 * c,
                       _mm512_mul_ps(_mm512_loadu_ps(qs + row * q_stride + head * D + 16 * c), _mm512_set1_ps(scale)));
  }
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t p = 0; p < count; ++p) {
      const __m512 s = block_scores<Vectors>(scaled + p * D, kh, 16 * b, length, keep[pairs[2 * p] * blocks + b]);
      _mm512_storeu_ps(scores + p * padded + 16 * b, s);
      _mm512_storeu_ps(&tops[16 * p], _mm512_max_ps(_mm512_loadu_ps(&tops[16 * p]), s));
    }
  // weights e^(s - peak) in place, 16 slots at a time; unseen slots give exactly 0
  for (int64_t p = 0; p < count; ++p) {
    float* w = scores + p * padded;
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_loadu_ps(&tops[16 * p])));
    for (int64_t j = 0; j < padded; j += 16) {
      const __m512 s = _mm512_loadu_ps(w + j);
      const __mmask16 seen = _mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      _mm512_storeu_ps(w + j, _mm512_maskz_mov_ps(seen, exp_ps(_mm512_sub_ps(s, top))));
    }
    for (int c = 0; c < Vectors; ++c) _mm512_storeu_ps(acc + p * D + 16 * c, _mm512_setzero_ps());
  }
  // the weighted sum of values over the seen slots in slot order, so that where a slot sits (a tree node's slot
  // is not the one it takes once accepted) never changes the result
  for (int64_t j0 = 0; j0 < length; j0 += kValueBlock) {
    const int64_t j1 = std::min(j0 + kValueBlock, length);
    for (int64_t p = 0; p < count; ++p) {
      const float* w = scores + p * padded;
      __m512 a[Vectors];
      for (int c = 0; c < Vectors; ++c) a[c] = _mm512_loadu_ps(acc + p * D + 16 * c);
      float sum = total[p];  // the weights' sum, in slot order too
      for (int64_t j = j0; j < j1; ++j) {
        if (w[j] == 0.f) continue;  // unseen (or weightless: adding 0 * v would change nothing)
        sum += w[j];
        const __m512 wj = _mm512_set1_ps(w[j]);
        for (int c = 0; c < Vectors; ++c) a[c] = _mm512_fmadd_ps(wj, _mm512_loadu_ps(vh + j * D + 16 * c), a[c]);
      }
      for (int c = 0; c < Vectors; ++c) _mm512_storeu_ps(acc + p * D + 16 * c, a[c]);
      total[p] = sum;
    }
  }
  for (int64_t p = 0; p < count; ++p) {
    const __m512 inv = _mm512_set1_ps(1.f / total[p]);
    float* out = os + pairs[2 * p] * o_stride + pairs[2 * p + 1] * D;
    for (int c = 0; c < Vectors; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(acc + p * D + 16 * c), inv));
  }
}

}  // namespace

// q (n, heads, D) fp32, D a multiple of 16 up to 128; k, v (kv_heads, slots, D) views of the cache, the first `length` slots
// filled; visible (n, length) bool, or None: row i sees slots [0, length - n + i]. Returns (n, heads * D).
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t length,
                        c10::optional<torch::Tensor> visible) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.size(2) % 16 == 0 && q.size(2) <= 128,
              "q: fp32 (n, heads, D), D a multiple of 16 up to 128");
  q = q.contiguous();
  const int64_t n = q.size(0), heads = q.size(1), D = q.size(2), kv_heads = k.size(0);
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == D && v.stride(1) == D && k.size(1) >= length &&
                  heads % kv_heads == 0 && length >= n, "k, v: (kv_heads, slots, D) with rows contiguous");
  torch::Tensor mask;
  if (visible) {
    mask = visible->to(torch::kBool).contiguous();
    TORCH_CHECK(mask.size(0) == n && mask.size(1) == length, "visible: (n, length)");
  }
  const bool* seen = visible ? mask.data_ptr<bool>() : nullptr;
  const int64_t blocks = (length + 15) / 16;
  std::vector<__mmask16> keep(n * blocks);
  for (int64_t i = 0; i < n; ++i) visible_blocks(seen ? seen + i * length : nullptr, length, length - n + i, &keep[i * blocks]);
  auto out = torch::empty({n, heads * D}, q.options());
  const float *qs = q.data_ptr<float>(), *ks = k.data_ptr<float>(), *vs = v.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const int64_t group = heads / kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  constexpr decltype(&attend_kv_head<1>) by_vectors[9] = {nullptr,           attend_kv_head<1>, attend_kv_head<2>,
                                                          attend_kv_head<3>, attend_kv_head<4>, attend_kv_head<5>,
                                                          attend_kv_head<6>, attend_kv_head<7>, attend_kv_head<8>};
  const auto attend = by_vectors[D / 16];
  // each thread takes a run of heads and, KV head by KV head, every row of them at once
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> pairs;
    std::vector<float> work;
    for (int64_t g = begin / group; g * group < end; ++g) {
      pairs.clear();
      for (int64_t i = 0; i < n; ++i)
        for (int64_t h = std::max(begin, g * group); h < std::min(end, (g + 1) * group); ++h) pairs.insert(pairs.end(), {i, h});
      const int64_t count = static_cast<int64_t>(pairs.size()) / 2;
      work.resize(count * (2 * D + blocks * 16));
      attend(qs, heads * D, pairs.data(), count, ks + g * k.stride(0), vs + g * v.stride(0), length, keep.data(), blocks,
             scale, work.data(), os, heads * D);
    }
  });
  return out;
}

// --- one decoder layer ------------------------------------------------------------------------------------
// Why: a decode step of the default model ran ~20 PyTorch ops a layer (norms, rotary, cache writes, the MLP's
// gate), each a few microseconds of dispatch on a 2-core CPU: about a third of a step. Here a whole llama layer
// is one call: the products and attention above, and the small ops as plain loops over each row, every row on its
// own and in a fixed order, so a tree node still gets bit for bit what a lone step gets.

namespace {

// y = x / sqrt(mean(x^2) + eps) * w for one row of H values (H a multiple of 16), sums in 16 lanes then a fixed tree
void norm_row(const float* x, const float* w, int64_t H, float eps, float* y) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t j = 0; j < H; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(H) + eps);
  const __m512 r = _mm512_set1_ps(inv);
  for (int64_t j = 0; j < H; j += 16)
    _mm512_storeu_ps(y + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), r), _mm512_loadu_ps(w + j)));
}

torch::Tensor norm_rows(const torch::Tensor& x, const torch::Tensor& w, float eps) {
  const int64_t n = x.size(0), H = x.size(1);
  auto y = torch::empty_like(x);
  for (int64_t i = 0; i < n; ++i) norm_row(x.data_ptr<float>() + i * H, w.data_ptr<float>(), H, eps, y.data_ptr<float>() + i * H);
  return y;
}

// silu(gate) * up, gate and up the two halves of each row of gu (n, 2I), I a multiple of 64
torch::Tensor silu_mul(const torch::Tensor& gu) {
  const int64_t n = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({n, I}, gu.options());
  const __m512 one = _mm512_set1_ps(1.f);
  const float* gs = gu.data_ptr<float>();
  float* os = out.data_ptr<float>();
  // 64 values a task: each one's result depends on it alone, so how rows are split never matters
  at::parallel_for(0, n * I / 64, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task * 64 / I, j0 = task * 64 % I;
      for (int64_t j = j0; j < j0 + 64; j += 16) {
        const __m512 x = _mm512_loadu_ps(gs + i * 2 * I + j);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));  // e^-|x|, never overflows
        const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
        const __m512 sigmoid = _mm512_div_ps(_mm512_mask_mov_ps(e, positive, one), _mm512_add_ps(one, e));
        _mm512_storeu_ps(os + i * I + j, _mm512_mul_ps(_mm512_mul_ps(x, sigmoid), _mm512_loadu_ps(gs + i * 2 * I + I + j)));
      }
    }
  });
  return out;
}

// rotary x (D values) with this position's cos and signed sin: x * cos + roll(x, D / 2) * signed_sin
inline void rotate_row(const float* x, const float* cos, const float* sin, int64_t D, float* y) {
  const int64_t half = D / 2;  // two plain loops (no index wrap), which the compiler vectorizes
  for (int64_t d = 0; d < half; ++d) y[d] = x[d] * cos[d] + x[d + half] * sin[d];
  for (int64_t d = half; d < D; ++d) y[d] = x[d] * cos[d] + x[d - half] * sin[d];
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) % 16 == 0 &&
                  weight.scalar_type() == torch::kFloat32 && weight.numel() == x.size(1),
              "rms_norm: fp32 x (n, H), H a multiple of 16, and weight (H)");
  return norm_rows(x.contiguous(), weight.contiguous(), static_cast<float>(eps));
}

// x (n, H) -> the layer's output (n, H). w: norm1, qkv (codes, scale, low), o (3), norm2, gate_up (3), down (3);
// nibbles: per product, Q4_1 or Q8_0. cos, sin (n, D): rotary rows of the n positions. cache (2, kv_heads, slots,
// D): this layer's keys and values; the n new ones are written at slots [start, start + n). visible as `attention`.
// attn_input: what the q/k/v product reads instead of norm1(x), where the layer's attention input is not its
// residual stream (an EAGLE draft head reads [norm(embedding), norm(feature)] and adds to the feature; norm1 unused).
torch::Tensor decoder_layer(torch::Tensor x, std::vector<torch::Tensor> w, std::vector<bool> nibbles, torch::Tensor cos,
                            torch::Tensor sin, torch::Tensor cache, int64_t start, c10::optional<torch::Tensor> visible,
                            int64_t heads, double eps, c10::optional<torch::Tensor> attn_input) {
  TORCH_CHECK(w.size() == 14 && nibbles.size() == 4, "decoder_layer: 14 weights and 4 nibble flags");
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == 2 && cache.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "decoder_layer: cache (2, kv_heads, slots, D) contiguous");
  x = x.contiguous();
  const int64_t n = x.size(0), kv_heads = cache.size(1), slots = cache.size(2), D = cache.size(3);
  TORCH_CHECK(start + n <= slots && cos.size(0) == n && cos.size(1) == D, "decoder_layer: positions or cache too short");
  const float e = static_cast<float>(eps);
  const auto qkv = vnni_matmul(attn_input ? *attn_input : norm_rows(x, w[0], e), w[1], w[2], w[3], nibbles[0]);
  const int64_t width = qkv.size(1);
  TORCH_CHECK(width == (heads + 2 * kv_heads) * D, "decoder_layer: qkv width disagrees with the heads");
  auto q = torch::empty({n, heads, D}, x.options());
  float *qs = q.data_ptr<float>(), *keys = cache.data_ptr<float>(), *values = keys + kv_heads * slots * D;
  for (int64_t i = 0; i < n; ++i) {
    const float* row = qkv.data_ptr<float>() + i * width;
    const float *c = cos.data_ptr<float>() + i * D, *s = sin.data_ptr<float>() + i * D;
    for (int64_t h = 0; h < heads; ++h) rotate_row(row + h * D, c, s, D, qs + (i * heads + h) * D);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t slot = (h * slots + start + i) * D;
      rotate_row(row + (heads + h) * D, c, s, D, keys + slot);
      std::copy(row + (heads + kv_heads + h) * D, row + (heads + kv_heads + h + 1) * D, values + slot);
    }
  }
  const auto attended = attention(q, cache[0], cache[1], start + n, visible);
  const auto mid = x + vnni_matmul(attended, w[4], w[5], w[6], nibbles[1]);
  const auto gate_up = vnni_matmul(norm_rows(mid, w[7], e), w[8], w[9], w[10], nibbles[2]);
  return mid + vnni_matmul(silu_mul(gate_up), w[11], w[12], w[13], nibbles[3]);
}

// Each row's largest value, its first index, and the second largest (the largest again when it occurs twice):
// what greedy acceptance and the near-tie margins need of the target's logits. torch's argmax and topk(2) took
// ~120 us each on 3 rows of 49,152, a twentieth of a decode step.
std::tuple<torch::Tensor, torch::Tensor> top_two(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) >= 2, "top_two: fp32 (rows, >= 2 values)");
  x = x.contiguous();
  const int64_t n = x.size(0), V = x.size(1), whole = V / 16 * 16;
  auto values = torch::empty({n, 2}, x.options());
  auto index = torch::empty({n}, x.options().dtype(torch::kLong));
  float* top = values.data_ptr<float>();
  int64_t* first_at = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const float* row = x.data_ptr<float>() + i * V;
    float best = -INFINITY, second = -INFINITY;
    int64_t at = 0;
    if (whole > 0) {  // per lane: its largest, the first index of it, its second largest
      __m512 m1 = _mm512_set1_ps(-INFINITY), m2 = m1;
      __m512i idx = _mm512_setzero_si512(), lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (int64_t j = 0; j < whole; j += 16) {
        const __m512 v = _mm512_loadu_ps(row + j);
        m2 = _mm512_max_ps(m2, _mm512_min_ps(v, m1));
        idx = _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(v, m1, _CMP_GT_OQ), lane);
        m1 = _mm512_max_ps(m1, v);
        lane = _mm512_add_epi32(lane, _mm512_set1_epi32(16));
      }
      alignas(64) float first[16], next[16];
      alignas(64) int32_t where[16];
      _mm512_store_ps(first, m1), _mm512_store_ps(next, m2), _mm512_store_si512(where, idx);
      int owner = 0;
      for (int l = 1; l < 16; ++l)
        if (first[l] > first[owner] || (first[l] == first[owner] && where[l] < where[owner])) owner = l;
      best = first[owner], at = where[owner], second = next[owner];
      for (int l = 0; l < 16; ++l)
        if (l != owner) second = std::fmax(second, first[l]);
    }
    for (int64_t j = whole; j < V; ++j) {
      if (row[j] > best) second = best, best = row[j], at = j;
      else second = std::fmax(second, row[j]);
    }
    top[2 * i] = best, top[2 * i + 1] = second, first_at[i] = at;
  }
  return {values, index};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("top_two", &top_two, "each row's largest value, its first index, and the second largest");
  m.def("vnni_matmul", &vnni_matmul, "x W^T on a GGUF Q4_1 / Q8_0 grid, int8 activations, AVX-512 VNNI");
  m.def("attention", &attention, "tree attention over a KV cache, each query row on its own");
  m.def("rms_norm", &rms_norm, "RMS norm of each row on its own");
  m.def("decoder_layer", &decoder_layer, "a whole llama decoder layer on the VNNI products, each row on its own");
}
