// Decode attention on AVX-512 CPUs: one query token per sequence against its paged K/V,
// read in place through the block table (no gathered copy of the context).
//
// Cache layout (K and V alike): cache[num_blocks][block_size][num_kv_heads][head_dim]; token t
// of sequence b sits in block block_tables[b][t / block_size] at offset t % block_size.
// The query heads that share a KV head (GQA) are done together, so each K/V row is read once.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include <vector>

#include "vec_math.h"

namespace {

constexpr int kLanes = 16;

float dot(const float* a, const float* b, int d) {
  __m512 s = _mm512_setzero_ps();
  for (int i = 0; i < d; i += kLanes) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s);
  return _mm512_reduce_add_ps(s);
}

#ifndef AHEAD
#define AHEAD 4
#endif
constexpr int kAhead = AHEAD;

void prefetch_token(const float* cache, const int32_t* table, int t, int len, int block_size,
                    int64_t token_stride) {
  if (t >= len) return;
  const int64_t slot = (int64_t)table[t / block_size] * block_size + t % block_size;
  const char* row = (const char*)(cache + slot * token_stride);
  for (int64_t byte = 0; byte < token_stride * 4; byte += 64) _mm_prefetch(row + byte, _MM_HINT_T0);
}

}  // namespace

extern "C" {

// q: row rows[i] (or i when rows is null) of a [T, num_heads * head_dim] buffer with row
// stride q_stride; out: [B, num_heads * head_dim] contiguous. head_dim a multiple of 16 and at
// most 256 (the caller checks). One task per sequence: a token's K (then V) row of all KV heads
// is one contiguous run, read once from memory for every query head.
void pagoda_paged_decode(const float* q, int64_t q_stride, const int64_t* rows,
                         const float* k_cache, const float* v_cache, const int32_t* block_tables,
                         int64_t table_stride, const int32_t* seq_lens, float* out, int B,
                         int num_heads, int num_kv_heads, int head_dim, int block_size,
                         float scale, int threads) {
  const int group = num_heads / num_kv_heads;
  const int chunks = head_dim / kLanes;
  const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores, top(num_heads), acc((size_t)num_heads * head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < B; ++b) {
      const int len = seq_lens[b];
      const int32_t* table = block_tables + (int64_t)b * table_stride;
      const float* qb = q + (rows ? rows[b] : b) * q_stride;
      scores.resize((size_t)num_heads * len);
      for (int head = 0; head < num_heads; ++head) top[head] = -INFINITY;
      for (int t = 0; t < len; ++t) {
        const int64_t slot = (int64_t)table[t / block_size] * block_size + t % block_size;
        const float* k = k_cache + slot * token_stride;
        prefetch_token(k_cache, table, t + kAhead, len, block_size, token_stride);
        for (int head = 0; head < num_heads; ++head) {
          const float s = dot(qb + head * head_dim, k + (head / group) * head_dim, head_dim) * scale;
          scores[(size_t)head * len + t] = s;
          top[head] = s > top[head] ? s : top[head];
        }
      }
      for (int head = 0; head < num_heads; ++head) {
        float* sh = scores.data() + (size_t)head * len;
        const __m512 shift = _mm512_set1_ps(top[head]);
        __m512 sums = _mm512_setzero_ps();
        for (int t = 0; t < len; t += kLanes) {
          const __mmask16 m = len - t >= kLanes ? 0xFFFF : (__mmask16)((1u << (len - t)) - 1);
          const __m512 p = pagoda::exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sh + t), shift));
          _mm512_mask_storeu_ps(sh + t, m, p);
          sums = _mm512_mask_add_ps(sums, m, sums, p);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sums));
        for (int t = 0; t < len; t += kLanes) {
          const __mmask16 m = len - t >= kLanes ? 0xFFFF : (__mmask16)((1u << (len - t)) - 1);
          _mm512_mask_storeu_ps(sh + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sh + t), inv));
        }
      }
      for (size_t i = 0; i < acc.size(); ++i) acc[i] = 0.0f;
      for (int t = 0; t < len; ++t) {
        const int64_t slot = (int64_t)table[t / block_size] * block_size + t % block_size;
        const float* v = v_cache + slot * token_stride;
        prefetch_token(v_cache, table, t + kAhead, len, block_size, token_stride);
        for (int head = 0; head < num_heads; ++head) {
          const __m512 p = _mm512_set1_ps(scores[(size_t)head * len + t]);
          const float* vh = v + (head / group) * head_dim;
          float* ah = acc.data() + (size_t)head * head_dim;
          for (int c = 0; c < chunks; ++c)
            _mm512_storeu_ps(ah + c * kLanes, _mm512_fmadd_ps(p, _mm512_loadu_ps(vh + c * kLanes),
                                                              _mm512_loadu_ps(ah + c * kLanes)));
        }
      }
      float* o = out + (int64_t)b * num_heads * head_dim;
      for (size_t i = 0; i < acc.size(); ++i) o[i] = acc[i];
    }
  }
}

}  // extern "C"
