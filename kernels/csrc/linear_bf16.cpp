// bf16 y = x @ W^T (+ bias) for the few rows of a decode step, on CPUs with AVX512-BF16:
// fp32 (or bf16) x rounded to bf16 once per call, fp32 accumulation, fp32 y.
//
// Packed layout: W [N, K] (bf16, row-major) becomes panels of 32 output rows; a panel holds
// its ceil(K / 2) pairs of k one after another, each pair as 32 rows x 2 bf16 (two cache
// lines), zero-padded past N and K:
//
//   packed[p][q][j][t] = W[32 p + j][2 q + t]       q < ceil(K / 2), j < 32, t < 2
//
// which is what `vdpbf16ps` takes: one 64-byte load gives 16 rows' products with a broadcast
// pair of x, summed into 16 fp32 lanes. At a few rows the step is bound by reading W, so the
// kernel's job is to stream it at memory speed: each thread reads one contiguous run of
// panels, prefetching ahead of itself.
//
// Built with -mavx512f only (cpu_native.FLAGS); the target pragma enables the BF16 and BW
// instructions for this file alone, and the caller loads it only where the CPU has them.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma")
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <vector>

namespace {

constexpr int kPanel = 32;
constexpr int kMaxRows = 8;
// cache lines (16 KB) ahead of its loads that a thread prefetches: the best of 8 to 768 here
constexpr int kPrefetchLines = 256;

int pairs_of(int K) { return (K + 1) / 2; }

// Rows [0, R) of x (as bf16 pairs, `pairs` per row) against one panel.
template <int R>
void rows_times_panel(const uint32_t* x, int pairs, const __m512i* panel, const float* bias,
                      float* y, int64_t ldy, int cols) {
  const __mmask16 mask_lo = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
  const __mmask16 mask_hi = cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
  const __m512 bias_lo = bias ? _mm512_maskz_loadu_ps(mask_lo, bias) : _mm512_setzero_ps();
  const __m512 bias_hi = bias ? _mm512_maskz_loadu_ps(mask_hi, bias + 16) : _mm512_setzero_ps();
  __m512 lo[R], hi[R];
  for (int i = 0; i < R; ++i) {
    lo[i] = bias_lo;
    hi[i] = bias_hi;
  }
  for (int q = 0; q < pairs; ++q) {
    // ahead into the panels this thread reads next (past the buffer's end at the last: a
    // prefetch never faults), into L2 only, which measured faster than into L1
    _mm_prefetch((const char*)(panel + 2 * q + kPrefetchLines), _MM_HINT_T1);
    _mm_prefetch((const char*)(panel + 2 * q + kPrefetchLines + 1), _MM_HINT_T1);
    const __m512bh w_lo = (__m512bh)_mm512_load_si512(panel + 2 * q);
    const __m512bh w_hi = (__m512bh)_mm512_load_si512(panel + 2 * q + 1);
    for (int i = 0; i < R; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)x[i * pairs + q]);
      lo[i] = _mm512_dpbf16_ps(lo[i], a, w_lo);
      hi[i] = _mm512_dpbf16_ps(hi[i], a, w_hi);
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm512_mask_storeu_ps(y + i * ldy, mask_lo, lo[i]);
    _mm512_mask_storeu_ps(y + i * ldy + 16, mask_hi, hi[i]);
  }
}

using RowsFn = void (*)(const uint32_t*, int, const __m512i*, const float*, float*, int64_t,
                        int);

constexpr RowsFn kRowsFns[kMaxRows + 1] = {
    nullptr,
    rows_times_panel<1>,
    rows_times_panel<2>,
    rows_times_panel<3>,
    rows_times_panel<4>,
    rows_times_panel<5>,
    rows_times_panel<6>,
    rows_times_panel<7>,
    rows_times_panel<8>,
};

// x [M, K] (fp32, or bf16 when `x_bf16`) as bf16 pairs, zero past K, rounded to nearest
// even as torch's .bfloat16() does (but with denormals flushed to zero, as vcvtneps2bf16
// does: far below any activation's scale).
void to_pairs(const void* x, int64_t ldx, bool x_bf16, int M, int K, uint16_t* out) {
  const int width = 2 * pairs_of(K);
  for (int m = 0; m < M; ++m) {
    uint16_t* row = out + (int64_t)m * width;
    if (x_bf16) {
      const uint16_t* src = (const uint16_t*)x + m * ldx;
      for (int k = 0; k < K; ++k) row[k] = src[k];
    } else {
      const float* src = (const float*)x + m * ldx;
      for (int k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + k));
        _mm256_mask_storeu_epi16(row + k, mask, (__m256i)v);
      }
    }
    if (width > K) row[K] = 0;
  }
}

}  // namespace

extern "C" {

int64_t pagoda_bf16_packed_size(int N, int K) {  // in bf16 elements
  return (int64_t)((N + kPanel - 1) / kPanel) * pairs_of(K) * kPanel * 2;
}

// w: bf16 [N, K] row-major; packed: pagoda_bf16_packed_size(N, K) bf16, 64-byte aligned.
void pagoda_bf16_pack_weight(const uint16_t* w, uint16_t* packed, int N, int K) {
  const int panels = (N + kPanel - 1) / kPanel, pairs = pairs_of(K);
#pragma omp parallel for schedule(static)
  for (int p = 0; p < panels; ++p)
    for (int q = 0; q < pairs; ++q)
      for (int j = 0; j < kPanel; ++j)
        for (int t = 0; t < 2; ++t) {
          const int n = p * kPanel + j, k = 2 * q + t;
          packed[(((int64_t)p * pairs + q) * kPanel + j) * 2 + t] =
              n < N && k < K ? w[(int64_t)n * K + k] : 0;
        }
}

// x [M, K] with row stride ldx (fp32, or bf16 when x_bf16), y fp32 [M, N] with row stride
// ldy; bias fp32 [N] or null. Any M works; each panel is read from memory once per call and
// from cache by the row blocks after the first.
void pagoda_bf16_linear(const void* x, int64_t ldx, int x_bf16, const uint16_t* packed,
                        const float* bias, float* y, int64_t ldy, int M, int N, int K,
                        int threads) {
  const int panels = (N + kPanel - 1) / kPanel, pairs = pairs_of(K);
  static thread_local std::vector<uint32_t> scratch;  // grows to the largest M x K seen
  if (scratch.size() < (size_t)M * pairs) scratch.resize((size_t)M * pairs);
  to_pairs(x, ldx, x_bf16, M, K, (uint16_t*)scratch.data());
  const uint32_t* xp = scratch.data();
  const int64_t panel_vectors = (int64_t)pairs * 2;  // 64-byte vectors per panel
#pragma omp parallel num_threads(threads)
  {
    // a contiguous run of panels per thread, so that each streams one region of memory
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int p0 = (int)((int64_t)panels * t / T), p1 = (int)((int64_t)panels * (t + 1) / T);
    for (int p = p0; p < p1; ++p) {
      const __m512i* panel = (const __m512i*)packed + p * panel_vectors;
      const int cols = N - p * kPanel < kPanel ? N - p * kPanel : kPanel;
      for (int r0 = 0; r0 < M; r0 += kMaxRows) {
        const int rows = M - r0 < kMaxRows ? M - r0 : kMaxRows;
        kRowsFns[rows](xp + (int64_t)r0 * pairs, pairs, panel, bias ? bias + p * kPanel : nullptr,
                       y + r0 * ldy + p * kPanel, ldy, cols);
      }
    }
  }
}

}  // extern "C"
