// fp32 y = x @ W^T (+ bias) on CPUs with AVX-512 or AVX2, W packed once after loading.
//
// Packed layout: W [N, K] (row-major, as nn.Linear keeps it) becomes panels of 32 output
// columns; a panel holds its K rows of 32 floats one after another, zero-padded past N:
//
//   packed[p][k][j] = W[32 p + j][k]        p < ceil(N / 32), k < K, j < 32
//
// A call streams each panel once from memory while up to 12 rows of x against it accumulate
// in 24 zmm registers (AVX2: 3 rows in 12 ymm). Each output is one fused multiply-add chain over k = 0 .. K-1 in
// order, whatever M is, so a row's result does not depend on the rows batched with it.
//
// Why not MKL: at the M of a decode step (1-64 rows) it reaches 40-55% of the FMA peak here,
// where this reaches 65-75% by overlapping the weight stream with the arithmetic.
#include <stdint.h>

#include <array>
#include <utility>

#include "simd.h"

namespace {

using namespace pagoda::simd;

constexpr int kPanel = 32;
// rows of x per pass over a panel: two accumulators a row, beside the panel's row and x's
// broadcast (AVX-512: 24 of 32 registers; AVX2: 12 of 16)
constexpr int kMaxRows = kRegisters == 32 ? 12 : 3;

// Rows [0, R) of x against one panel. `prefetch` (or null) points into the next panel: this
// call pulls one of its k rows into L2 every `prefetch_every` steps, so that the row blocks of
// a panel between them fetch the whole next panel while they compute.
template <int R>
void rows_times_panel(const float* x, int64_t ldx, const float* panel, const float* bias,
                      float* y, int64_t ldy, int K, int cols, const float* prefetch,
                      int prefetch_every) {
  const mask16 mask_lo = tail_mask(cols);
  const mask16 mask_hi = cols <= 16 ? 0 : (mask16)((1u << (cols - 16)) - 1);
  const f32x16 bias_lo = bias ? load(mask_lo, bias) : zero();
  const f32x16 bias_hi = bias ? load(mask_hi, bias + 16) : zero();
  f32x16 lo[R], hi[R];
  for (int i = 0; i < R; ++i) {
    lo[i] = bias_lo;
    hi[i] = bias_hi;
  }
  // k runs in groups of prefetch_every steps, one prefetched line pair per group: no division
  // or branch in the FMA loop
  for (int k0 = 0, group = 0; k0 < K; k0 += prefetch_every, ++group) {
    if (prefetch) {
      const float* line = prefetch + (int64_t)group * kPanel;
      _mm_prefetch((const char*)line, _MM_HINT_T1);
      _mm_prefetch((const char*)(line + 16), _MM_HINT_T1);
    }
    const int k1 = k0 + prefetch_every < K ? k0 + prefetch_every : K;
    for (int k = k0; k < k1; ++k) {
      const f32x16 w_lo = load(panel + (int64_t)k * kPanel);
      const f32x16 w_hi = load(panel + (int64_t)k * kPanel + 16);
      for (int i = 0; i < R; ++i) {
        const f32x16 a = set1(x[i * ldx + k]);
        lo[i] = fmadd(a, w_lo, lo[i]);
        hi[i] = fmadd(a, w_hi, hi[i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    store(y + i * ldy, mask_lo, lo[i]);
    store(y + i * ldy + 16, mask_hi, hi[i]);
  }
}

using RowsFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int,
                        int, const float*, int);

// kRowsFns[r] = rows_times_panel<r> for r = 1 .. kMaxRows
template <int... R>
constexpr std::array<RowsFn, kMaxRows + 1> rows_fns(std::integer_sequence<int, R...>) {
  return {nullptr, rows_times_panel<R + 1>...};
}
constexpr auto kRowsFns = rows_fns(std::make_integer_sequence<int, kMaxRows>());

}  // namespace

extern "C" {

int64_t pagoda_packed_size(int N, int K) {
  return (int64_t)((N + kPanel - 1) / kPanel) * K * kPanel;
}

void pagoda_pack_weight(const float* w, float* packed, int N, int K) {
  const int panels = (N + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static)
  for (int p = 0; p < panels; ++p)
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < kPanel; ++j) {
        const int n = p * kPanel + j;
        packed[((int64_t)p * K + k) * kPanel + j] = n < N ? w[(int64_t)n * K + k] : 0.0f;
      }
}

// x [M, K] with row stride ldx, y [M, N] with row stride ldy; bias [N] or null.
void pagoda_linear(const float* x, int64_t ldx, const float* packed, const float* bias, float* y,
                   int64_t ldy, int M, int N, int K, int threads) {
  const int panels = (N + kPanel - 1) / kPanel;
  const int blocks = (M + kMaxRows - 1) / kMaxRows;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int p = 0; p < panels; ++p) {
    const float* panel = packed + (int64_t)p * K * kPanel;
    const int cols = N - p * kPanel < kPanel ? N - p * kPanel : kPanel;
    int r0 = 0;
    for (int b = 0; b < blocks; ++b) {
      // blocks of near-equal height: 32 rows run as 10 + 11 + 11, not 12 + 12 + 8
      const int r1 = (int)((int64_t)M * (b + 1) / blocks);
      const int k0 = (int)((int64_t)K * b / blocks);
      const float* prefetch = p + 1 < panels ? panel + ((int64_t)K + k0) * kPanel : nullptr;
      kRowsFns[r1 - r0](x + r0 * ldx, ldx, panel, bias ? bias + p * kPanel : nullptr,
                        y + r0 * ldy + p * kPanel, ldy, K, cols, prefetch, blocks);
      r0 = r1;
    }
  }
}

}  // extern "C"
