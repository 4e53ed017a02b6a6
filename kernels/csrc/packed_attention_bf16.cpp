// Bidirectional attention over packed sequences in bf16 on AMX tiles, for encoders (embedding
// models): the batch is one run of tokens, sequence s owning tokens [cu[s], cu[s+1]), and each
// token attends to every token of its own sequence and to nothing else. No padding and no mask:
// a batch of 64 short texts costs the sum of their squared lengths, not rows x width squared.
//
// One task per (sequence, query head): its head's K and V laid out as tiles, then its blocks
// of 16 queries (amx_attention.h). q, k, v are bf16 rows with a token stride (head h at
// h * head_dim); out is bf16 [tokens][heads][head_dim]. head_dim must be a multiple of 32.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "amx_attention.h"

namespace {

using namespace pagoda::amx_attention;

// Per thread: the head's K and V laid out as B tiles, its rows, the blocks' scratch and output
// (the tiles' buffers handed out through aligned_scratch)
struct HeadScratch {
  std::vector<uint32_t> kt, vt;
  std::vector<int64_t> rows;
  std::vector<float> o;
  Scratch block;
};

void attend_head(const uint16_t* q, int64_t q_stride, const uint16_t* k, int64_t k_stride,
                 const uint16_t* v, int64_t v_stride, uint16_t* out, int64_t out_stride, int len,
                 int dim, float scale, HeadScratch& w) {
  uint32_t* const kt = pagoda::aligned_scratch(w.kt, keys_size(len, dim));
  uint32_t* const vt = pagoda::aligned_scratch(w.vt, values_size(len, dim));
  float* const o = pagoda::aligned_scratch(w.o, (size_t)kRows * dim);
  w.rows.resize(len);
  for (int t = 0; t < len; ++t) w.rows[t] = t * k_stride;
  lay_out_keys(k, w.rows.data(), len, dim, kt);
  for (int t = 0; t < len; ++t) w.rows[t] = t * v_stride;
  lay_out_values(v, w.rows.data(), len, dim, vt);
  int lens[kRows];
  std::fill(lens, lens + kRows, len);  // no mask: every query sees the whole sequence
  for (int i0 = 0; i0 < len; i0 += kRows) {
    const int rows = std::min(kRows, len - i0);
    const uint16_t* a = q + i0 * q_stride;
    int64_t a_stride = q_stride * 2;
    if (rows < kRows) {  // the last block: copy, so that no tile reads past the tokens
      uint16_t* const block = pagoda::aligned_scratch(w.block.q, (size_t)kRows * dim);
      std::fill_n(block, (size_t)kRows * dim, 0);
      for (int i = 0; i < rows; ++i) memcpy(block + (size_t)i * dim, a + i * q_stride, dim * 2);
      a = block;
      a_stride = dim * 2;
    }
    attend_block(a, a_stride, rows, lens, len, dim, scale, kt, vt, w.block, o, dim);
    for (int i = 0; i < rows; ++i)
      for (int d = 0; d < dim; d += 16) {
        const __m512 x = _mm512_loadu_ps(o + (size_t)i * dim + d);
        _mm256_storeu_si256((__m256i*)(out + (i0 + i) * out_stride + d), (__m256i)_mm512_cvtneps_pbh(x));
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
    HeadScratch scratch;
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
