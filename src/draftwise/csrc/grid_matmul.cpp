// y = x W^T for W stored on a GGUF block grid (Q4_1: w = scale * q + low, q in 0..15; Q8_0: w = scale * q,
// q in -127..127), groups of 32 along the input, with fp32 activations, for CPUs with AVX2 and FMA.
//
// Why: PyTorch's int4 CPU kernel re-dequantizes the weights for every few activation rows, so on AVX2 a tree of
// 8 rows costs ~2.7 decode steps. Here each 8-output tile dequantizes one weight column per input index and
// feeds it to up to 8 rows at once, so extra rows cost only their FMAs. Every row's sum runs over the input in
// the same order whatever the number of rows, so a tree forward gives each node bit for bit the output a lone
// decode step would: the weights are dequantized exactly as the GGUF defines them (fp32 multiply, then add).
//
// Layout (8-output tiles t, input index k, group g = k / 32):
//   codes, Q4_1: int32 [tiles, K], nibble i of word (t, k) is q[8t + i, k]
//   codes, Q8_0: int8  [tiles, K, 8]
//   scale, low:  fp32  [tiles, G, 8]   (low absent for Q8_0)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t kGroup = 32;

// Rows activation rows times Tiles 8-output tiles: Rows * Tiles independent accumulators, so a lone decode row
// still keeps four FMA chains in flight. Each output's sum runs over k in order whatever the blocking.
template <int Rows, int Tiles, bool Nibbles>
inline void block_product(const float* x, int64_t K, const char* codes, int64_t code_stride, const float* scale,
                          const float* low, int64_t scale_stride, float* y, int64_t ldy) {
  __m256 acc[Rows][Tiles];
  for (int r = 0; r < Rows; ++r)
    for (int t = 0; t < Tiles; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i nibble = _mm256_set1_epi32(15);
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m256 s[Tiles], lo[Tiles];
    for (int t = 0; t < Tiles; ++t) {
      s[t] = _mm256_loadu_ps(scale + t * scale_stride + g * 8);
      lo[t] = Nibbles ? _mm256_loadu_ps(low + t * scale_stride + g * 8) : _mm256_setzero_ps();
    }
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) {
      __m256 w[Tiles];
      for (int t = 0; t < Tiles; ++t) {
        __m256i q;
        if constexpr (Nibbles) {
          const int32_t word = reinterpret_cast<const int32_t*>(codes + t * code_stride)[k];
          q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), nibble);
        } else {
          const auto* bytes = reinterpret_cast<const __m128i*>(codes + t * code_stride + k * 8);
          q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(bytes));
        }
        w[t] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), s[t]), lo[t]);  // the GGUF's dequantization
      }
      for (int r = 0; r < Rows; ++r) {
        const __m256 xr = _mm256_broadcast_ss(x + r * K + k);
        for (int t = 0; t < Tiles; ++t) acc[r][t] = _mm256_fmadd_ps(xr, w[t], acc[r][t]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int t = 0; t < Tiles; ++t) _mm256_storeu_ps(y + r * ldy + t * 8, acc[r][t]);
}

using BlockFn = void (*)(const float*, int64_t, const char*, int64_t, const float*, const float*, int64_t, float*,
                         int64_t);

#include "block_table.h"  // kBlocks, kTiles
constexpr int kRows = 8;

}  // namespace

torch::Tensor grid_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, c10::optional<torch::Tensor> low) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x: fp32 (rows, K)");
  const bool nibbles = codes.scalar_type() == torch::kInt32;
  TORCH_CHECK(nibbles == low.has_value(), "Q4_1 codes (int32) need `low`; Q8_0 codes (int8) take none");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), tiles = codes.size(0);
  TORCH_CHECK(K % kGroup == 0 && tiles % 4 == 0 && codes.size(1) == K && scale.size(0) == tiles && scale.size(1) == K / kGroup,
              "shapes of x, codes and scale disagree");
  auto y = torch::empty({M, tiles * 8}, x.options());
  const float* xs = x.data_ptr<float>();
  const float* ss = scale.data_ptr<float>();
  const float* ls = nibbles ? low->data_ptr<float>() : nullptr;
  float* ys = y.data_ptr<float>();
  const int64_t G = K / kGroup;
  const int64_t code_bytes = nibbles ? K * 4 : K * 8;
  const auto* cs = static_cast<const char*>(codes.data_ptr());
  // blocks of 4 tiles (32 outputs) are the parallel unit; a block of rows uses the tile width that suits it
  at::parallel_for(0, tiles / 4, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < M; r += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, M - r));
      const int width = kTiles[rows];
      const BlockFn block = nibbles ? kBlocks<true>[rows] : kBlocks<false>[rows];
      for (int64_t t = begin * 4; t < end * 4; t += width)
        block(xs + r * K, K, cs + t * code_bytes, code_bytes, ss + t * G * 8, ls ? ls + t * G * 8 : nullptr, G * 8,
              ys + r * tiles * 8 + t * 8, tiles * 8);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("grid_matmul", &grid_matmul, "x W^T on a GGUF Q4_1 / Q8_0 grid"); }
