// fp32 y = x @ W^T (+ bias) on CPUs with AVX-512 or AVX2, W packed once after loading, in fp32
// or in bf16 (widened to fp32 as it loads: for CPUs without bf16 arithmetic, half the bytes).
//
// Packed layout: W [N, K] (row-major, as nn.Linear keeps it) becomes panels of 32 output
// columns; a panel holds its K rows of 32 values one after another, zero-padded past N:
//
//   packed[p][k][j] = W[32 p + j][k]        p < ceil(N / 32), k < K, j < 32
//
// A call streams each panel once from memory while up to 12 rows of x against it accumulate
// in 24 zmm registers (AVX2: 3 rows in 12 ymm). Each output is one fused multiply-add chain
// over k = 0 .. K-1 in order, whatever M is, so a row's result does not depend on the rows
// batched with it.
//
// Why not MKL: at the M of a decode step (1-64 rows) it reaches 40-55% of the FMA peak here,
// where this reaches 65-75% by overlapping the weight stream with the arithmetic (AVX2, on a
// 2-core EPYC: 149 against 87 GFLOP/s at 32 rows, level at 256).
#include <stdint.h>

#include <array>
#include <utility>
#include <vector>

#include "scratch.h"
#include "simd.h"

namespace {

using namespace pagoda::simd;

constexpr int kPanel = 32;
// rows of x per pass over a panel: two accumulators a row, beside the panel's row and x's
// broadcast (AVX-512: 24 of 32 registers; AVX2: 12 of 16)
constexpr int kMaxRows = kRegisters == 32 ? 12 : 3;

PAGODA_INLINE f32x16 load_weights(const float* p) { return load(p); }
PAGODA_INLINE f32x16 load_weights(const uint16_t* p) { return load_bf16_packed(p); }

// Rows [0, R) of x against one panel of W (fp32 or bf16). `prefetch` (or null) points into the
// next panel, whose k rows are `row_bytes` long: this call pulls one of them into L2 every
// `prefetch_every` steps, so that the row blocks of a panel between them fetch the whole next
// panel while they compute. `wide` (or null; bf16 panels only) receives the panel's rows
// widened to fp32 as they load, for the row blocks after this one.
template <int R, typename W>
void rows_times_panel(const float* x, int64_t ldx, const W* panel, const float* bias, float* y,
                      int64_t ldy, int K, int cols, const char* prefetch, int row_bytes,
                      int prefetch_every, float* wide) {
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
      const char* line = prefetch + (int64_t)group * row_bytes;
      _mm_prefetch(line, _MM_HINT_T1);
      if (row_bytes > 64) _mm_prefetch(line + 64, _MM_HINT_T1);
    }
    const int k1 = k0 + prefetch_every < K ? k0 + prefetch_every : K;
    for (int k = k0; k < k1; ++k) {
      const f32x16 w_lo = load_weights(panel + (int64_t)k * kPanel);
      const f32x16 w_hi = load_weights(panel + (int64_t)k * kPanel + 16);
      if constexpr (sizeof(W) == 2) {
        if (wide) {
          store(wide + (int64_t)k * kPanel, w_lo);
          store(wide + (int64_t)k * kPanel + 16, w_hi);
        }
      }
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

template <typename W>
using RowsFn = void (*)(const float*, int64_t, const W*, const float*, float*, int64_t, int, int,
                        const char*, int, int, float*);

// rows_fns<W>()[r] = rows_times_panel<r, W> for r = 1 .. kMaxRows
template <typename W, int... R>
constexpr std::array<RowsFn<W>, kMaxRows + 1> rows_fns(std::integer_sequence<int, R...>) {
  return {nullptr, rows_times_panel<R + 1, W>...};
}
template <typename W>
constexpr auto kRowsFns = rows_fns<W>(std::make_integer_sequence<int, kMaxRows>());

// A bf16 panel that feeds more than one row block is widened once, into an fp32 copy that stays
// in L2 (K x 32 floats: 72 KiB at K = 576): widened in every block instead, the conversion's
// vector work halved the FMA rate from 4 rows on (AVX2, 32 rows: 80 against 155 GFLOP/s). The
// first block writes the copy as it widens its own loads; a widening pass of its own before
// the blocks took the model's linears 1.25x the time at 8 rows, 1.13x at 16, 1.05x at 32
// (2-core Zen 3 EPYC, 8-10 alternated runs; level at 128 rows and at 1-3, which do not widen).
template <typename W>
void linear(const float* x, int64_t ldx, const W* packed, const float* bias, float* y,
            int64_t ldy, int M, int N, int K, int threads) {
  const int panels = (N + kPanel - 1) / kPanel;
  const int blocks = (M + kMaxRows - 1) / kMaxRows;
  const bool widen = sizeof(W) == 2 && blocks > 1;
#pragma omp parallel num_threads(threads)
  {
    // kept by each pool thread across calls, not allocated and zeroed in every call; aligned:
    // unaligned, the model's bf16 linears took 1.10-1.19x the time at 4-32 rows (AVX2, 2-core
    // Zen 3 EPYC, 25 alternated runs; 1.06-1.16x at a 48-byte offset)
    static thread_local std::vector<float> wide;
    float* const wide_panel = widen ? pagoda::aligned_scratch(wide, (size_t)K * kPanel) : nullptr;
#pragma omp for schedule(static)
    for (int p = 0; p < panels; ++p) {
      const W* panel = packed + (int64_t)p * K * kPanel;
      const int cols = N - p * kPanel < kPanel ? N - p * kPanel : kPanel;
      int r0 = 0;
      for (int b = 0; b < blocks; ++b) {
        // blocks of near-equal height: 32 rows run as 10 + 11 + 11, not 12 + 12 + 8
        const int r1 = (int)((int64_t)M * (b + 1) / blocks);
        const float* xb = x + r0 * ldx;
        const float* bias_p = bias ? bias + p * kPanel : nullptr;
        float* yb = y + r0 * ldy + p * kPanel;
        const int k0 = (int)((int64_t)K * b / blocks);
        const W* next = p + 1 < panels ? panel + ((int64_t)K + k0) * kPanel : nullptr;
        const char* prefetch = (const char*)next;
        constexpr int row_bytes = kPanel * sizeof(W);
        if (widen && b > 0)
          kRowsFns<float>[r1 - r0](xb, ldx, wide_panel, bias_p, yb, ldy, K, cols, prefetch,
                                   row_bytes, blocks, nullptr);
        else
          kRowsFns<W>[r1 - r0](xb, ldx, panel, bias_p, yb, ldy, K, cols, prefetch, row_bytes,
                               blocks, wide_panel);
        r0 = r1;
      }
    }
  }
}

template <typename W>
void pack_weight(const float* w, W* packed, int N, int K) {
  const int panels = (N + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static)
  for (int p = 0; p < panels; ++p)
    for (int k = 0; k < K; ++k) {
      alignas(64) float row[kPanel];
      for (int j = 0; j < kPanel; ++j) {
        const int n = p * kPanel + j;
        row[j] = n < N ? w[(int64_t)n * K + k] : 0.0f;
      }
      W* out = packed + ((int64_t)p * K + k) * kPanel;
      if constexpr (sizeof(W) == 4) {
        for (int j = 0; j < kPanel; ++j) out[j] = row[j];
      } else {
        alignas(64) uint16_t rounded[kPanel];
        store_bf16(rounded, load(row));
        store_bf16(rounded + kLanes, load(row + kLanes));
        for (int half = 0; half < kPanel; half += kLanes)
          for (int j = 0; j < kLanes; ++j) out[half + kBf16Slot[j]] = rounded[half + j];
      }
    }
}

}  // namespace

extern "C" {

// panels of N x K weights, in elements (fp32 or bf16 alike)
int64_t pagoda_packed_size(int N, int K) {
  return (int64_t)((N + kPanel - 1) / kPanel) * K * kPanel;
}

// w: fp32 [N, K] row-major; packed in fp32, or rounded to bf16 (ties to even)
void pagoda_pack_weight(const float* w, float* packed, int N, int K) {
  pack_weight(w, packed, N, K);
}
void pagoda_pack_weight_bf16(const float* w, uint16_t* packed, int N, int K) {
  pack_weight(w, packed, N, K);
}

// x [M, K] with row stride ldx, y [M, N] with row stride ldy; bias [N] or null.
void pagoda_linear(const float* x, int64_t ldx, const float* packed, const float* bias, float* y,
                   int64_t ldy, int M, int N, int K, int threads) {
  linear(x, ldx, packed, bias, y, ldy, M, N, K, threads);
}

// The same with bf16 weights, widened to fp32 as they load: half the bytes to stream, the
// same fp32 arithmetic (x is not rounded).
void pagoda_linear_bf16_weights(const float* x, int64_t ldx, const uint16_t* packed,
                                const float* bias, float* y, int64_t ldy, int M, int N, int K,
                                int threads) {
  linear(x, ldx, packed, bias, y, ldy, M, N, K, threads);
}

}  // extern "C"
