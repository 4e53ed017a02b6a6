// Attention of blocks of 16 queries on AMX tiles, in bf16 with fp32 sums: shared by the
// encoders' packed attention and the decoder's prefill attention. Per block:
//
//   S = Q K^T   tiles: A = 16 queries x 32 dims, B = 16 dim pairs x 16 keys
//   P = exp(S * scale - rowmax), zero past each row's last key, rounded to bf16
//   O = P V / rowsum   tiles: A = 16 queries x 32 keys of P, B = 16 key pairs x 16 dims of V
//
// B tiles want pairs of the summed index side by side in a dword, so K and V are first laid
// out as kt[key block of 16][dim chunk of 32][dim pair][key] and vt[key block of 32][dim chunk
// of 16][key pair][dim] (dwords). head_dim must be a multiple of 32. The includer compiles
// with the AMX and AVX512-BF16 targets on, and holds the tile permission.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "amx_tiles.h"
#include "scratch.h"
#include "vec_math.h"

namespace pagoda::amx_attention {

constexpr int kRows = 16;  // queries per block, keys per QK tile, dims per PV tile
constexpr int kKeys = 32;  // keys per PV tile (16 pairs)

// tiles 0-3 = C (16 x 16 fp32): four output blocks at once, so that consecutive tile products
// do not wait on one another's sums; 4 = A; 5-7 = B in turn. All 16 rows of 64 bytes.
inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kRows;
  }
  _tile_loadconfig(&config);
}

inline void zero_tiles(int n) {
  _tile_zero(0);
  if (n > 1) _tile_zero(1);
  if (n > 2) _tile_zero(2);
  if (n > 3) _tile_zero(3);
}

// C tile j += A (tile 4) . B tile at b + j * step (dwords), for j < n
inline void products(int n, const uint32_t* b, size_t step) {
  _tile_loadd(5, b, 64);
  _tile_dpbf16ps(0, 4, 5);
  if (n > 1) {
    _tile_loadd(6, b + step, 64);
    _tile_dpbf16ps(1, 4, 6);
  }
  if (n > 2) {
    _tile_loadd(7, b + 2 * step, 64);
    _tile_dpbf16ps(2, 4, 7);
  }
  if (n > 3) {
    _tile_loadd(5, b + 3 * step, 64);
    _tile_dpbf16ps(3, 4, 5);
  }
}

// C tile j to c + j * step (floats), row stride `stride` bytes, for j < n
inline void store_tiles(int n, float* c, int step, int stride) {
  _tile_stored(0, c, stride);
  if (n > 1) _tile_stored(1, c + step, stride);
  if (n > 2) _tile_stored(2, c + 2 * step, stride);
  if (n > 3) _tile_stored(3, c + 3 * step, stride);
}

inline size_t keys_size(int len, int dim) {  // dwords of kt
  return (size_t)(len + kRows - 1) / kRows * (dim / 32) * kRows * kRows;
}

inline size_t values_size(int len, int dim) {  // dwords of vt
  return (size_t)(len + kKeys - 1) / kKeys * (dim / kRows) * kRows * kRows;
}

// K of one head, key t's row at k + rows[t]: kt[kb][c][pair][key] = dims (2 pair, 2 pair + 1)
// of chunk c of key kb * 16 + key, zero past len; each tile row gathers one dim pair of 16 keys
inline void lay_out_keys(const uint16_t* k, const int64_t* rows, int len, int dim, uint32_t* kt) {
  const int chunks = dim / 32, blocks = (len + kRows - 1) / kRows;
  for (int kb = 0; kb < blocks; ++kb) {
    const int present = std::min(kRows, len - kb * kRows);
    alignas(64) int64_t bytes[kRows] = {};  // each key's row, in bytes from k
    for (int j = 0; j < present; ++j) bytes[j] = rows[kb * kRows + j] * 2;
    const __m512i lo = _mm512_load_si512(bytes), hi = _mm512_load_si512(bytes + 8);
    const __mmask8 valid_lo = present >= 8 ? 0xFF : (__mmask8)((1u << present) - 1);
    const __mmask8 valid_hi = present >= 16 ? 0xFF : present <= 8 ? 0 : (__mmask8)((1u << (present - 8)) - 1);
    for (int c = 0; c < chunks; ++c) {
      uint32_t* tile = kt + ((int64_t)kb * chunks + c) * kRows * kRows;
      for (int pair = 0; pair < kRows; ++pair) {
        const __m512i at = _mm512_set1_epi64((c * kRows + pair) * 4);
        const __m256i a = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), valid_lo,
                                                      _mm512_add_epi64(lo, at), k, 1);
        const __m256i b = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), valid_hi,
                                                      _mm512_add_epi64(hi, at), k, 1);
        _mm256_storeu_si256((__m256i*)(tile + pair * kRows), a);
        _mm256_storeu_si256((__m256i*)(tile + pair * kRows + 8), b);
      }
    }
  }
}

// V of one head, key t's row at v + rows[t]: vt[kb][c][pair][d] = (v[key 2 pair][d],
// v[key 2 pair + 1][d]) of the keys kb * 32 + ..., dims c * 16 + d; zero past len
inline void lay_out_values(const uint16_t* v, const int64_t* rows, int len, int dim, uint32_t* vt) {
  const int chunks = dim / kRows, blocks = (len + kKeys - 1) / kKeys;
  const auto widen = [&](int key, int c) {
    if (key >= len) return _mm512_setzero_si512();
    const __m256i row = _mm256_loadu_si256((const __m256i*)(v + rows[key] + c * kRows));
    return _mm512_cvtepu16_epi32(row);
  };
  for (int kb = 0; kb < blocks; ++kb)
    for (int c = 0; c < chunks; ++c) {
      uint32_t* tile = vt + ((int64_t)kb * chunks + c) * kRows * kRows;
      for (int pair = 0; pair < kRows; ++pair) {
        const int key = kb * kKeys + 2 * pair;
        const __m512i even = widen(key, c), odd = widen(key + 1, c);
        _mm512_storeu_si512(tile + pair * kRows, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
      }
    }
}

// One row of scores to bf16 probabilities in place of p (keys past len zero, up to width);
// returns the row's sum of the fp32 probabilities.
inline float softmax_row(const float* s, int len, int width, float scale, uint16_t* p) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? 0xFFFF : (__mmask16)((1u << (len - j)) - 1);
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, m, s + j));
  }
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top) * scale);
  const __m512 scales = _mm512_set1_ps(scale);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < width; j += 16) {
    const __mmask16 m = j >= len ? 0 : len - j >= 16 ? 0xFFFF : (__mmask16)((1u << (len - j)) - 1);
    const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + j), scales, shift);
    const __m512 e = _mm512_maskz_mov_ps(m, pagoda::exp_ps(x));
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256((__m256i*)(p + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return _mm512_reduce_add_ps(sum);
}

struct Scratch {  // handed out through aligned_scratch
  std::vector<uint16_t> q, p;  // a query block (zero rows past the end); P in bf16
  std::vector<float> s;        // scores
};

// One block of 16 queries (bf16 rows at a, a_stride bytes apart; the rows past `rows` any
// finite values) against keys laid out by lay_out_keys / lay_out_values: row i sees keys
// [0, lens[i]), all below len. o[i][d] (fp32, row stride o_stride floats) = row i's
// attention, i < rows; all 16 rows of o are written.
inline void attend_block(const uint16_t* a, int64_t a_stride, int rows, const int* lens, int len,
                         int dim, float scale, const uint32_t* kt, const uint32_t* vt,
                         Scratch& w, float* o, int64_t o_stride) {
  const int key_blocks = (len + kRows - 1) / kRows, width = (len + kKeys - 1) / kKeys * kKeys;
  const int qk_chunks = dim / 32, pv_chunks = dim / kRows;
  float* const s = aligned_scratch(w.s, (size_t)kRows * width);
  uint16_t* const p = aligned_scratch(w.p, (size_t)kRows * width);
  const size_t kt_step = (size_t)qk_chunks * kRows * kRows;  // one key block of kt
  for (int kb = 0; kb < key_blocks; kb += 4) {
    const int n = std::min(4, key_blocks - kb);
    zero_tiles(n);
    for (int c = 0; c < qk_chunks; ++c) {
      _tile_loadd(4, a + c * 32, a_stride);
      products(n, kt + kb * kt_step + (size_t)c * kRows * kRows, kt_step);
    }
    store_tiles(n, s + kb * kRows, kRows, width * 4);
  }
  float sums[kRows];
  for (int i = 0; i < rows; ++i)
    sums[i] = softmax_row(s + (size_t)i * width, lens[i], width, scale, p + (size_t)i * width);
  for (int c = 0; c < pv_chunks; c += 4) {
    const int n = std::min(4, pv_chunks - c);
    zero_tiles(n);
    for (int kb = 0; kb < width / kKeys; ++kb) {
      _tile_loadd(4, p + kb * kKeys, width * 2);
      products(n, vt + ((size_t)kb * pv_chunks + c) * kRows * kRows, kRows * kRows);
    }
    store_tiles(n, o + c * kRows, kRows, o_stride * 4);
  }
  for (int i = 0; i < rows; ++i) {
    const __m512 inverse = _mm512_set1_ps(1.0f / sums[i]);
    float* row = o + i * o_stride;
    for (int d = 0; d < dim; d += 16)
      _mm512_storeu_ps(row + d, _mm512_mul_ps(_mm512_loadu_ps(row + d), inverse));
  }
}

}  // namespace pagoda::amx_attention
