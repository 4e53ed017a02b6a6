// bf16 y = x @ W^T (+ bias) on CPUs with AVX512-BF16 or AMX: fp32 (or bf16) x rounded to bf16
// once per call, fp32 accumulation, fp32 y.
//
// Packed layout: W [N, K] (bf16, row-major) becomes panels of 32 output rows; a panel holds
// its pairs of k one after another, each pair as 32 rows x 2 bf16 (two cache lines),
// zero-padded past N and K (pairs padded to a multiple of 16, a whole AMX tile row):
//
//   packed[p][q][j][t] = W[32 p + j][2 q + t]       q < pairs_of(K), j < 32, t < 2
//
// which is what both instruction sets take: one 64-byte line is 16 rows' products with a
// broadcast pair of x for `vdpbf16ps`, and 16 such lines (row stride 128 bytes) are an AMX B
// tile. At a decode step's few rows the matmul is bound by reading W, so the kernel's job is
// to stream it at memory speed: each thread reads one contiguous run of panels, prefetching
// ahead of itself (on AMX from 17 rows on: below, the hardware prefetcher does it better).
//
// Built with -mavx512f only (cpu_native.FLAGS); the target pragma enables the BF16, BW and
// AMX instructions for this file alone, and the caller uses them only where the CPU has them.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "amx_tiles.h"
#include "scratch.h"
#include "vec_math.h"

namespace {

constexpr int kPanel = 32;
constexpr int kMaxRows = 8;
// cache lines (16 KB) ahead of its loads that a thread prefetches: the best of 8 to 768 here
constexpr int kPrefetchLines = 256;

constexpr int kChunk = 16;  // pairs of k per AMX tile row
// from this many rows of x (more than one tile's), every thread converts its share: all 120
// matmuls of SmolLM2-135M on 2 cores, 2-3% less time at 24-32 rows and 6% at 48 than with
// one thread converting; up to 16 rows level either way
constexpr int kSplitRows = 17;

// pairs of k per panel, padded to whole AMX tiles (SmolLM2's K of 576 and 1536 need none)
int pairs_of(int K) { return ((K + 1) / 2 + kChunk - 1) / kChunk * kChunk; }

// Rows [0, R) of x (as bf16 pairs, `pairs` per row) against one panel, into y (fp32), or
// with `out` (bf16) silu(gate) * up of a gate_up panel as rows_times_panel_amx gives it. The
// sums may differ from the tiles' in the last bits: the tiles add a pair's products in an
// order of their own.
template <int R>
void rows_times_panel(const uint32_t* x, int pairs, const __m512i* panel, const float* bias,
                      float* y, uint16_t* out, int64_t ldy, int cols) {
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
    if (out) {
      const __m512 h = pagoda::silu_mul(lo[i], hi[i]);
      _mm256_storeu_si256((__m256i*)(out + i * ldy), (__m256i)_mm512_cvtneps_pbh(h));
      continue;
    }
    _mm512_mask_storeu_ps(y + i * ldy, mask_lo, lo[i]);
    _mm512_mask_storeu_ps(y + i * ldy + 16, mask_hi, hi[i]);
  }
}

using RowsFn = void (*)(const uint32_t*, int, const __m512i*, const float*, float*, uint16_t*,
                        int64_t, int);

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
    for (int k = K; k < width; ++k) row[k] = 0;
  }
}


// AMX: the same panels as tiles. Per 16 pairs of k, A = 16 rows of x (16 x 64 bytes), B =
// 16 pairs x 16 columns of the panel's low or high half (row stride 128 bytes), and the fp32
// tile C[m][j] += sum over the pairs of A[m][q] . B[q][j]. All eight tiles hold one pass of
// up to 32 rows: C for rows 0-15 and 16-31 times the two halves, two A, two B. One tile
// instruction does the work of 256 vdpbf16ps, so rows come almost free while W streams.
using pagoda::TileConfig;

constexpr int kTileRows = 16;
constexpr int kAmxRows = 2 * kTileRows;
// rows of x that the panels pass over before the next such block: 256 x 1536 bf16 (768 KB)
// stays in a core's L2 beside the panel
constexpr int kCachedRows = 256;
// tile rows of k (16 pairs each) per slice of a prefill's panels: 9 of K = 576 (two slices) and
// 8 of K = 1536 (six) measured best
constexpr int kSliceChunks = 9;
// row blocks (of kAmxRows) of a pass over the panels from which each panel's passes prefetch
// the next panel
constexpr int kSpreadBlocks = 5;

// x rows [m0, m1) as AMX A tiles, for rows of 16 x [16 pairs of k] read as one contiguous
// kilobyte each (a tile loaded from x's own rows, 16 strided lines, ran 10-20% slower):
//
//   tiles[b][c][i][q] = pair 16 c + q of row 16 b + i       (uint32 pairs, zero past K)
//
// Rows from M on (up to m1, the last tile's padding) are zeros. `tiles` is 64-byte aligned: a
// tile row across two cache lines costs two loads (a third more time at 512 rows).
void to_tiles(const void* x, int64_t ldx, bool x_bf16, int m0, int m1, int M, int K,
              uint32_t* tiles) {
  const int chunks = pairs_of(K) / kChunk;
  for (int m = m0; m < m1; ++m) {
    uint32_t* row = tiles + (int64_t)(m / kTileRows) * chunks * 256 + (m % kTileRows) * kChunk;
    for (int c = 0; c < chunks; ++c) {
      const int left = m < M ? K - 32 * c : 0;  // values of k left from this chunk on
      __m512i pairs;
      if (x_bf16) {
        const __mmask32 mask = left >= 32 ? ~0u : left <= 0 ? 0 : (__mmask32)((1u << left) - 1);
        pairs = _mm512_maskz_loadu_epi16(mask, (const uint16_t*)x + m * ldx + 32 * c);
      } else {
        const float* src = (const float*)x + m * ldx + 32 * c;
        const __mmask16 lo = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        const __mmask16 hi = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
        pairs = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + 16),
                                             _mm512_maskz_loadu_ps(lo, src));
      }
      _mm512_store_si512(row + (int64_t)c * 256, pairs);
    }
  }
}

// tiles: 0, 1 = C of rows 0-15 (low, high columns), 2, 3 = C of rows 16-31, 4, 5 = A of rows
// 0-15 and 16-31, 6, 7 = B (low, high). Fewer than 16 rows get tiles of that height (a tile
// instruction's time grows with its rows); more are padded with zero rows to whole tiles.
void configure_tiles(int M) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kTileRows;
  }
  if (M < kTileRows) config.rows[0] = config.rows[1] = config.rows[4] = (uint8_t)M;
  _tile_loadconfig(&config);
}

// The C tiles (rows 0-15 then 16-31 when `two`, low and high columns) to `at`, `stride`
// floats a row
void store_sums(float* at, int64_t stride, bool two) {
  _tile_stored(0, at, stride * 4);
  _tile_stored(1, at + 16, stride * 4);
  if (two) {
    _tile_stored(2, at + kTileRows * stride, stride * 4);
    _tile_stored(3, at + kTileRows * stride + 16, stride * 4);
  }
}

// The C tiles back from store_sums(sums, kPanel, two)
void load_sums(const float* sums, bool two) {
  _tile_loadd(0, sums, kPanel * 4);
  _tile_loadd(1, sums + 16, kPanel * 4);
  if (two) {
    _tile_loadd(2, sums + kTileRows * kPanel, kPanel * 4);
    _tile_loadd(3, sums + kTileRows * kPanel + 16, kPanel * 4);
  }
}

// Rows [0, rows) of x (tiles from to_tiles) against one panel, the tiles configured by
// configure_tiles (`tile_rows` to a tile, 16 or fewer); `c` holds kAmxRows x kPanel floats.
// `prefetch`: the first pass over the panel, which reads it from memory, prefetches ahead of
// itself; `next_lines` lines from `next` (the next panel's, or null) are prefetched spread over
// this call's tile rows of k. With `out` (bf16) for y, the panel's two halves are 16 gate and
// the same 16 up columns of an MLP, and `out` gets silu(gate) * up, rounded to bf16 as the
// next linear would round it: the fp32 gate_up never leaves the cache.
// Only pairs [q0, q1) of k are summed here: from q0 > 0 on top of the partial sums in `sums`
// (kAmxRows x kPanel floats), and up to q1 < pairs into them, the output left for the call
// with the last pairs.
void rows_times_panel_amx(const uint32_t* x, int pairs, const __m512i* panel, const float* bias,
                          float* y, uint16_t* out, int64_t ldy, int rows, int tile_rows,
                          int cols, bool prefetch, float* c, int q0, int q1, float* sums,
                          const char* next, int next_lines) {
  const int next_per_chunk = (next_lines * kChunk + (q1 - q0) - 1) / (q1 - q0);
  const bool two = rows > kTileRows;
  const uint32_t* x2 = x + (int64_t)kTileRows * pairs;  // the next 16 rows' tiles
  if (q0 == 0) {
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    load_sums(sums, two);  // the slices of k before this one
  }
  const char* lines = (const char*)panel;
  for (int q = q0; q < q1; q += kChunk) {
    const char* chunk = lines + (int64_t)q * 128;
    if (prefetch)
      for (int line = 0; line < 2 * kChunk; ++line)
        _mm_prefetch(chunk + (int64_t)(kPrefetchLines + line) * 64, _MM_HINT_T1);
    if (next) {
      const int first = (q - q0) / kChunk * next_per_chunk;
      for (int line = first; line < std::min(next_lines, first + next_per_chunk); ++line)
        _mm_prefetch(next + (int64_t)line * 64, _MM_HINT_T1);
    }
    _tile_loadd(6, chunk, 128);
    _tile_loadd(7, chunk + 64, 128);
    _tile_loadd(4, x + q * kTileRows, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, x2 + q * kTileRows, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  if (q1 < pairs) {
    store_sums(sums, kPanel, two);
    return;
  }
  // whole tiles, nothing to add: straight into y (at 512 rows 5-10% faster than through c)
  if (!out && !bias && cols == kPanel && (rows == kAmxRows || rows == tile_rows)) {
    store_sums(y, ldy, two);
    return;
  }
  store_sums(c, kPanel, two);
  if (out) {
    for (int i = 0; i < rows; ++i) {
      const __m512 h = pagoda::silu_mul(_mm512_load_ps(c + i * kPanel),
                                        _mm512_load_ps(c + i * kPanel + 16));
      _mm256_storeu_si256((__m256i*)(out + i * ldy), (__m256i)_mm512_cvtneps_pbh(h));
    }
    return;
  }
  const __mmask16 mask_lo = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
  const __mmask16 mask_hi = cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
  const __m512 bias_lo = bias ? _mm512_maskz_loadu_ps(mask_lo, bias) : _mm512_setzero_ps();
  const __m512 bias_hi = bias ? _mm512_maskz_loadu_ps(mask_hi, bias + 16) : _mm512_setzero_ps();
  for (int i = 0; i < rows; ++i) {
    const __m512 lo = _mm512_add_ps(_mm512_load_ps(c + i * kPanel), bias_lo);
    const __m512 hi = _mm512_add_ps(_mm512_load_ps(c + i * kPanel + 16), bias_hi);
    _mm512_mask_storeu_ps(y + i * ldy, mask_lo, lo);
    _mm512_mask_storeu_ps(y + i * ldy + 16, mask_hi, hi);
  }
}

// y (fp32) or out (bf16, silu_mul) = x @ W^T: see pagoda_bf16_linear and
// pagoda_bf16_linear_silu_mul
void linear(const void* x, int64_t ldx, int x_bf16, const uint16_t* packed, const float* bias,
            float* y, uint16_t* out, int64_t ldy, int M, int N, int K, int threads, int amx) {
  // one row (a lone sequence's decode step) streams W faster through vdpbf16ps: 7-9% less
  // time than the tiles at every SmolLM2-135M shape, lm_head included (2 cores)
  if (M == 1) amx = 0;
  const int panels = (N + kPanel - 1) / kPanel, pairs = pairs_of(K);
  // x as pairs (AMX: as tiles, padded with zero rows to whole tiles)
  static thread_local std::vector<uint32_t> scratch;
  const int whole = (M + kTileRows - 1) / kTileRows * kTileRows;
  // rows to convert: fewer than a tile's get tiles of their height, more are zero-padded
  const int padded = amx && M > kTileRows ? whole : M;
  uint32_t* xp = pagoda::aligned_scratch(scratch, (size_t)whole * pairs);
  const int elem = x_bf16 ? 2 : 4;
  // rows [m0, m1) of x into xp; m1 == M takes the padding along
  const auto convert = [&](int m0, int m1) {
    if (amx)
      to_tiles(x, ldx, x_bf16, m0, m1 == M ? padded : m1, M, K, xp);
    else
      to_pairs((const char*)x + m0 * ldx * elem, ldx, x_bf16, m1 - m0, K,
               (uint16_t*)(xp + (int64_t)m0 * pairs));
  };
  // a batch's rows are converted by all threads (512 x 1536 take 0.18 ms on one); a few
  // decode rows are not worth the barrier
  const bool split_rows = M >= kSplitRows;
  if (!split_rows) convert(0, M);
  const int64_t panel_vectors = (int64_t)pairs * 2;  // 64-byte vectors per panel
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    if (split_rows) {
      // shares of whole tiles of rows
      const int tiles = (M + kTileRows - 1) / kTileRows;
      convert(std::min(M, kTileRows * (int)((int64_t)tiles * t / T)),
              std::min(M, kTileRows * (int)((int64_t)tiles * (t + 1) / T)));
#pragma omp barrier
    }
    // a contiguous run of panels per thread, so that each streams one region of memory
    const int p0 = (int)((int64_t)panels * t / T), p1 = (int)((int64_t)panels * (t + 1) / T);
    if (amx) {
      // panel by panel, all row blocks of a panel while it is in cache, and at most
      // kCachedRows rows of x (which every panel reads) at a time
      // Past one pass of rows, k is taken in slices of at most kSliceChunks tile rows: the
      // slice of the panel stays in L1 while the row blocks' slices of x stream past it, their
      // partial sums kept in `sums`. (Whole, a panel and a row block of x, 36 KB each at K =
      // 576, do not both fit in L1, and every tile came from L2: 512 rows, one core, tiles
      // stored to L1, 1.69 TFLOP/s whole and 1.87 in two slices at K = 576, 1.45 and 1.73 in
      // six at K = 1536.)
      alignas(64) float c[kAmxRows * kPanel];
      static thread_local std::vector<float> sums_buffer;
      float* sums = pagoda::aligned_scratch(sums_buffer, (size_t)kCachedRows * kPanel);
      const int chunks = pairs / kChunk;
      const int slices = M > kAmxRows ? (chunks + kSliceChunks - 1) / kSliceChunks : 1;
      const int slice = (chunks + slices - 1) / slices * kChunk;  // pairs of k per slice
      configure_tiles(M);
      const int tile_rows = std::min(M, kTileRows);
      const int panel_lines = (int)panel_vectors;
      for (int s0 = 0; s0 < M; s0 += kCachedRows) {
        const int s1 = M - s0 < kCachedRows ? M : s0 + kCachedRows;
        const int blocks = (s1 - s0 + kAmxRows - 1) / kAmxRows;
        // From kSpreadBlocks row blocks on, the panel's passes (slices of k times row blocks)
        // outlast reading a panel from memory: each pass prefetches its share of the next
        // panel, which then arrives under this one's tile arithmetic (all 120 matmuls of
        // SmolLM2-135M, 2 cores: 12-16% less time at 192-320 rows, 5% at 512). With fewer,
        // the reads outlast the arithmetic (spreading measured 3-14% slower at 64-128 rows)
        // and the first pass prefetches ahead of itself: on 2 MiB pages 5-7% faster at 24-64
        // rows. Up to 16 rows the hardware prefetcher keeps up best alone (2-5% at 8-16).
        const bool spread = blocks >= kSpreadBlocks;
        const bool ahead = !spread && (blocks > 1 || M > kTileRows);
        const int passes = (pairs + slice - 1) / slice * blocks;
        for (int p = p0; p < p1; ++p) {
          const __m512i* panel = (const __m512i*)packed + p * panel_vectors;
          const char* next =
              spread && p + 1 < p1 ? (const char*)(panel + panel_vectors) : nullptr;
          const int cols = N - p * kPanel < kPanel ? N - p * kPanel : kPanel;
          int pass = 0;
          for (int q0 = 0; q0 < pairs; q0 += slice)
            for (int r0 = s0; r0 < s1; r0 += kAmxRows, ++pass) {
              const int l0 = panel_lines * pass / passes, l1 = panel_lines * (pass + 1) / passes;
              rows_times_panel_amx(xp + (int64_t)r0 * pairs, pairs, panel,
                                   bias ? bias + p * kPanel : nullptr,
                                   y ? y + r0 * ldy + p * kPanel : nullptr,
                                   out ? out + r0 * ldy + p * kPanel / 2 : nullptr, ldy,
                                   s1 - r0 < kAmxRows ? s1 - r0 : kAmxRows, tile_rows, cols,
                                   ahead && r0 == s0 && q0 == 0, c, q0,
                                   std::min(pairs, q0 + slice),
                                   sums + (r0 - s0) * kPanel,
                                   next ? next + (int64_t)l0 * 64 : nullptr, l1 - l0);
            }
        }
      }
      _tile_release();
    } else {
      for (int p = p0; p < p1; ++p) {
        const __m512i* panel = (const __m512i*)packed + p * panel_vectors;
        const int cols = N - p * kPanel < kPanel ? N - p * kPanel : kPanel;
        for (int r0 = 0; r0 < M; r0 += kMaxRows) {
          const int rows = M - r0 < kMaxRows ? M - r0 : kMaxRows;
          kRowsFns[rows](xp + (int64_t)r0 * pairs, pairs, panel,
                         bias ? bias + p * kPanel : nullptr,
                         y ? y + r0 * ldy + p * kPanel : nullptr,
                         out ? out + r0 * ldy + p * kPanel / 2 : nullptr, ldy, cols);
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// Asks Linux for the AMX tile state (once per process; oneDNN asks too); 1 if granted.
int pagoda_bf16_enable_amx() {
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

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
// ldy; bias fp32 [N] or null; `amx` picks the tiles over vdpbf16ps. Any M works: each panel
// is read from memory once per call (AMX: once per 256 rows) and from cache by the row blocks
// after the first.
void pagoda_bf16_linear(const void* x, int64_t ldx, int x_bf16, const uint16_t* packed,
                        const float* bias, float* y, int64_t ldy, int M, int N, int K,
                        int threads, int amx) {
  linear(x, ldx, x_bf16, packed, bias, y, nullptr, ldy, M, N, K, threads, amx);
}

// An MLP's gate_up linear with silu(gate) * up after it, on AMX: out bf16 [M, N / 2] (row
// stride ldo) from W packed with its gate and up rows interleaved 16 by 16 (gate 0-15, up
// 0-15, gate 16-31, ...), so that each panel holds 16 outputs' gate and up columns.
void pagoda_bf16_linear_silu_mul(const void* x, int64_t ldx, int x_bf16, const uint16_t* packed,
                                 uint16_t* out, int64_t ldo, int M, int N, int K, int threads) {
  linear(x, ldx, x_bf16, packed, nullptr, nullptr, out, ldo, M, N, K, threads, 1);
}

}  // extern "C"
