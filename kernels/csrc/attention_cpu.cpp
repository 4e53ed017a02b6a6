// Decode attention on AVX-512 CPUs: one query token per sequence against its paged K/V,
// read in place through the block table (no gathered copy of the context).
//
// Cache layout (K and V alike): cache[num_blocks][block_size][num_kv_heads][head_dim]; token t
// of sequence b sits in block block_tables[b][t / block_size] at offset t % block_size.
// One task per sequence: a token's K (then V) row of all KV heads is one contiguous run, read
// once for every query head of the group that shares it (GQA).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include <vector>

#include "vec_math.h"

namespace {

constexpr int kLanes = 16;

__mmask16 tail_mask(int remaining) {
  return remaining >= kLanes ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1);
}

const float* token_row(const float* cache, const int32_t* table, int t, int block_size,
                       int64_t token_stride) {
  return cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * token_stride;
}

// scores[head][t] = q[head] . k[t] * scale; returns nothing, leaves the row maxima in top.
template <int C>  // C = head_dim / 16
void scores_of(const float* q, const float* k_cache, const int32_t* table, int len,
               int num_heads, int group, int block_size, int64_t token_stride, float scale,
               float* scores, float* top) {
  for (int head = 0; head < num_heads; ++head) top[head] = -INFINITY;
  for (int t = 0; t < len; ++t) {
    const float* k = token_row(k_cache, table, t, block_size, token_stride);
    for (int h = 0; h < num_heads / group; ++h) {
      __m512 kr[C];
      for (int c = 0; c < C; ++c) kr[c] = _mm512_loadu_ps(k + (h * C + c) * kLanes);
      for (int g = 0; g < group; ++g) {
        const int head = h * group + g;
        const float* qh = q + head * C * kLanes;
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(qh), kr[0]);
        for (int c = 1; c < C; ++c) s = _mm512_fmadd_ps(_mm512_loadu_ps(qh + c * kLanes), kr[c], s);
        const float score = _mm512_reduce_add_ps(s) * scale;
        scores[(size_t)head * len + t] = score;
        top[head] = score > top[head] ? score : top[head];
      }
    }
  }
}

// scores[head][:] <- softmax(scores[head][:])
void softmax_rows(float* scores, const float* top, int num_heads, int len) {
  for (int head = 0; head < num_heads; ++head) {
    float* row = scores + (size_t)head * len;
    const __m512 shift = _mm512_set1_ps(top[head]);
    __m512 sums = _mm512_setzero_ps();
    for (int t = 0; t < len; t += kLanes) {
      const __mmask16 m = tail_mask(len - t);
      const __m512 p = pagoda::exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + t), shift));
      _mm512_mask_storeu_ps(row + t, m, p);
      sums = _mm512_mask_add_ps(sums, m, sums, p);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sums));
    for (int t = 0; t < len; t += kLanes) {
      const __mmask16 m = tail_mask(len - t);
      _mm512_mask_storeu_ps(row + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + t), inv));
    }
  }
}

// out[head] = sum_t p[head][t] v[t]; each head's accumulator stays in registers.
template <int C>
void weighted_values(const float* probs, const float* v_cache, const int32_t* table, int len,
                     int num_heads, int group, int block_size, int64_t token_stride, float* out) {
  for (int head = 0; head < num_heads; ++head) {
    const int h = head / group;
    const float* p = probs + (size_t)head * len;
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (int t = 0; t < len; ++t) {
      const float* v = token_row(v_cache, table, t, block_size, token_stride) + h * C * kLanes;
      const __m512 pt = _mm512_set1_ps(p[t]);
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(v + c * kLanes), acc[c]);
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + (head * C + c) * kLanes, acc[c]);
  }
}

template <int C>
void decode(const float* q, int64_t q_stride, const int64_t* rows, const float* k_cache,
            const float* v_cache, const int32_t* block_tables, int64_t table_stride,
            const int32_t* seq_lens, float* out, int B, int num_heads, int num_kv_heads,
            int block_size, float scale, int threads) {
  const int group = num_heads / num_kv_heads;
  const int64_t token_stride = (int64_t)num_kv_heads * C * kLanes;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores, top(num_heads);
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < B; ++b) {
      const int len = seq_lens[b];
      const int32_t* table = block_tables + (int64_t)b * table_stride;
      scores.resize((size_t)num_heads * len);
      scores_of<C>(q + (rows ? rows[b] : b) * q_stride, k_cache, table, len, num_heads, group,
                   block_size, token_stride, scale, scores.data(), top.data());
      softmax_rows(scores.data(), top.data(), num_heads, len);
      weighted_values<C>(scores.data(), v_cache, table, len, num_heads, group, block_size,
                         token_stride, out + (int64_t)b * num_heads * C * kLanes);
    }
  }
}

}  // namespace

extern "C" {

// q: row rows[i] (or i when rows is null) of a [T, num_heads * head_dim] buffer with row
// stride q_stride; out: [B, num_heads * head_dim] contiguous. head_dim 32, 64 or 128 (the
// caller checks; returns without writing otherwise).
void pagoda_paged_decode(const float* q, int64_t q_stride, const int64_t* rows,
                         const float* k_cache, const float* v_cache, const int32_t* block_tables,
                         int64_t table_stride, const int32_t* seq_lens, float* out, int B,
                         int num_heads, int num_kv_heads, int head_dim, int block_size,
                         float scale, int threads) {
  switch (head_dim) {
    case 32:
      return decode<2>(q, q_stride, rows, k_cache, v_cache, block_tables, table_stride, seq_lens,
                       out, B, num_heads, num_kv_heads, block_size, scale, threads);
    case 64:
      return decode<4>(q, q_stride, rows, k_cache, v_cache, block_tables, table_stride, seq_lens,
                       out, B, num_heads, num_kv_heads, block_size, scale, threads);
    case 128:
      return decode<8>(q, q_stride, rows, k_cache, v_cache, block_tables, table_stride, seq_lens,
                       out, B, num_heads, num_kv_heads, block_size, scale, threads);
  }
}

}  // extern "C"
