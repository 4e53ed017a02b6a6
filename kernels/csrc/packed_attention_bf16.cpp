// Bidirectional attention over packed sequences in bf16 on AMX tiles, for encoders (embedding
// models): the batch is one run of tokens, sequence s owning tokens [cu[s], cu[s+1]), and each
// token attends to every token of its own sequence and to nothing else. No padding and no mask:
// a batch of 64 short texts costs the sum of their squared lengths, not rows x width squared.
//
// One task per (sequence, query head); per block of 16 queries, with fp32 sums throughout:
//
//   S = Q K^T   tiles: A = 16 queries x 32 dims (q as given), B = 16 dim pairs x 16 keys
//   P = exp(S * scale - rowmax), zero past the sequence's end, rounded to bf16
//   O = P V / rowsum   tiles: A = 16 queries x 32 keys of P, B = 16 key pairs x 16 dims of V
//
// B tiles want pairs of the summed index side by side in a dword, so each task first lays out
// its head's K as kt[key block][dim chunk][dim pair][key] and V as vt[key block of 32][dim
// chunk of 16][key pair][dim] (dwords). q, k, v are bf16 rows with a token stride (head h at
// h * head_dim); out is bf16 [tokens][heads][head_dim]. head_dim must be a multiple of 32.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "amx_tiles.h"
#include "vec_math.h"

namespace {

constexpr int kRows = 16;  // queries per block, keys per QK tile, dims per PV tile
constexpr int kKeys = 32;  // keys per PV tile (16 pairs)

using pagoda::TileConfig;

// tiles 0-3 = C (16 x 16 fp32): four output blocks at once, so that consecutive tile products
// do not wait on one another's sums; 4 = A; 5-7 = B in turn. All 16 rows of 64 bytes.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kRows;
  }
  _tile_loadconfig(&config);
}

void zero_tiles(int n) {
  _tile_zero(0);
  if (n > 1) _tile_zero(1);
  if (n > 2) _tile_zero(2);
  if (n > 3) _tile_zero(3);
}

// C tile j += A (tile 4) . B tile at b + j * step (dwords), for j < n
void products(int n, const uint32_t* b, size_t step) {
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
void store_tiles(int n, float* c, int step, int stride) {
  _tile_stored(0, c, stride);
  if (n > 1) _tile_stored(1, c + step, stride);
  if (n > 2) _tile_stored(2, c + 2 * step, stride);
  if (n > 3) _tile_stored(3, c + 3 * step, stride);
}

struct Scratch {
  std::vector<uint32_t> kt, vt;  // the head's K and V as B tiles
  std::vector<uint16_t> q, p;    // a partial query block (zero rows past the end); P in bf16
  std::vector<float> s, o;       // scores, then unnormalized outputs
};

// K of one head: kt[kb][c][pair][key] = dims (2 pair, 2 pair + 1) of key kb * 16 + key, zero
// past len; each tile row gathers one dim pair of 16 keys
void lay_out_keys(const uint16_t* k, int64_t stride, int len, int dim, uint32_t* kt) {
  const int chunks = dim / 32, blocks = (len + kRows - 1) / kRows;
  const __m512i keys = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                                                           4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)(stride / 2)));
  for (int kb = 0; kb < blocks; ++kb) {
    const int present = std::min(kRows, len - kb * kRows);
    const __mmask16 valid = present >= kRows ? 0xFFFF : (__mmask16)((1u << present) - 1);
    const int* base = (const int*)(k + kb * kRows * stride);
    for (int c = 0; c < chunks; ++c) {
      uint32_t* tile = kt + ((int64_t)kb * chunks + c) * kRows * kRows;
      for (int pair = 0; pair < kRows; ++pair) {
        const __m512i index = _mm512_add_epi32(keys, _mm512_set1_epi32(c * kRows + pair));
        const __m512i row =
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, index, base, 4);
        _mm512_storeu_si512(tile + pair * kRows, row);
      }
    }
  }
}

// V of one head: vt[kb][c][pair][d] = (v[key 2 pair][d], v[key 2 pair + 1][d]) of the keys
// kb * 32 + ..., dims c * 16 + d; zero past len
void lay_out_values(const uint16_t* v, int64_t stride, int len, int dim, uint32_t* vt) {
  const int chunks = dim / kRows, blocks = (len + kKeys - 1) / kKeys;
  const auto widen = [&](int key, int c) {
    if (key >= len) return _mm512_setzero_si512();
    const __m256i row = _mm256_loadu_si256((const __m256i*)(v + key * stride + c * kRows));
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
float softmax_row(const float* s, int len, int width, float scale, uint16_t* p) {
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

void attend_head(const uint16_t* q, int64_t q_stride, const uint16_t* k, int64_t k_stride,
                 const uint16_t* v, int64_t v_stride, uint16_t* out, int64_t out_stride, int len,
                 int dim, float scale, Scratch& w) {
  const int key_blocks = (len + kRows - 1) / kRows, width = (len + kKeys - 1) / kKeys * kKeys;
  const int qk_chunks = dim / 32, pv_chunks = dim / kRows;
  w.kt.resize((size_t)key_blocks * qk_chunks * kRows * kRows);
  w.vt.resize((size_t)(width / kKeys) * pv_chunks * kRows * kRows);
  w.s.resize((size_t)kRows * width);
  w.p.resize((size_t)kRows * width);
  w.o.resize((size_t)kRows * dim);
  w.q.resize((size_t)kRows * dim);
  lay_out_keys(k, k_stride, len, dim, w.kt.data());
  lay_out_values(v, v_stride, len, dim, w.vt.data());
  float sums[kRows];
  for (int i0 = 0; i0 < len; i0 += kRows) {
    const int rows = std::min(kRows, len - i0);
    const uint16_t* a = q + i0 * q_stride;
    int64_t a_stride = q_stride * 2;
    if (rows < kRows) {  // the last block: copy, so that no tile reads past the tokens
      std::fill(w.q.begin(), w.q.end(), 0);
      for (int i = 0; i < rows; ++i) memcpy(&w.q[(size_t)i * dim], a + i * q_stride, dim * 2);
      a = w.q.data();
      a_stride = dim * 2;
    }
    const size_t kt_step = (size_t)qk_chunks * kRows * kRows;  // one key block of kt
    for (int kb = 0; kb < key_blocks; kb += 4) {
      const int n = std::min(4, key_blocks - kb);
      zero_tiles(n);
      for (int c = 0; c < qk_chunks; ++c) {
        _tile_loadd(4, a + c * 32, a_stride);
        products(n, &w.kt[kb * kt_step + (size_t)c * kRows * kRows], kt_step);
      }
      store_tiles(n, &w.s[kb * kRows], kRows, width * 4);
    }
    for (int i = 0; i < rows; ++i)
      sums[i] = softmax_row(&w.s[(size_t)i * width], len, width, scale, &w.p[(size_t)i * width]);
    for (int c = 0; c < pv_chunks; c += 4) {
      const int n = std::min(4, pv_chunks - c);
      zero_tiles(n);
      for (int kb = 0; kb < width / kKeys; ++kb) {
        _tile_loadd(4, &w.p[kb * kKeys], width * 2);
        products(n, &w.vt[((size_t)kb * pv_chunks + c) * kRows * kRows], kRows * kRows);
      }
      store_tiles(n, &w.o[c * kRows], kRows, dim * 4);
    }
    for (int i = 0; i < rows; ++i) {
      const __m512 inverse = _mm512_set1_ps(1.0f / sums[i]);
      for (int d = 0; d < dim; d += 16) {
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(&w.o[(size_t)i * dim + d]), inverse);
        const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(x);
        _mm256_storeu_si256((__m256i*)(out + (i0 + i) * out_stride + d), rounded);
      }
    }
  }
}

}  // namespace

extern "C" {

// q [tokens][heads][dim] at token stride q_stride (elements), k and v [tokens][kv_heads][dim]
// at theirs; out [tokens][heads][dim] contiguous. Query head h reads KV head h / (heads /
// kv_heads). The caller has the AMX tile permission (pagoda_bf16_enable_amx).
void pagoda_packed_attention_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* k,
                                  int64_t k_stride, const uint16_t* v, int64_t v_stride,
                                  uint16_t* out, const int32_t* cu_seqlens, int num_seqs,
                                  int heads, int kv_heads, int dim, float scale, int threads) {
  const int group = heads / kv_heads;
  const int64_t tasks = (int64_t)num_seqs * heads, out_stride = (int64_t)heads * dim;
#pragma omp parallel num_threads(threads)
  {
    configure_tiles();
    Scratch scratch;
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int s = (int)(task / heads), h = (int)(task % heads), kvh = h / group;
      const int start = cu_seqlens[s], len = cu_seqlens[s + 1] - start;
      if (len <= 0) continue;
      attend_head(q + start * q_stride + h * dim, q_stride, k + start * k_stride + kvh * dim,
                  k_stride, v + start * v_stride + kvh * dim, v_stride,
                  out + start * out_stride + h * dim, out_stride, len, dim, scale, scratch);
    }
    _tile_release();
  }
}

}  // extern "C"
