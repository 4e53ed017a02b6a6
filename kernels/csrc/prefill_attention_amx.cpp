// Causal attention of prefill chunks over a paged bf16 K/V cache, on AMX tiles: the prefill
// half of attention_cpu.cpp's work where the CPU has AMX (that kernel keeps the decode rows).
//
// A chunk of sequence b is its last `count` tokens of seq_lens[b]; its query i (position
// base + i, base = seq_len - count) sees keys [0, base + i]. Two phases, each over all threads:
//   1. each (sequence, KV head) of a chunk lays out its context's K and V as tiles, once
//      (amx_attention.h), read by every query head of its group and every block of queries;
//   2. each (sequence, query head, block of 16 queries) rounds its queries to bf16 and runs
//      attend_block, writing fp32 rows of out.
// Cache layout as attention_cpu.cpp: cache[num_blocks][block_size][num_kv_heads][head_dim].
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "amx_attention.h"
#include "paged_cache.h"

namespace {

using namespace pagoda::amx_attention;

struct Layout {  // one (sequence, KV head)'s K and V tiles, at these offsets of the buffers
  int seq, kv_head;
  size_t keys, values;
};

// phase 2's unit of work: blocks of 16 queries of one sequence and head, the one starting at
// query `first` of the chunk and up to kBlocksPerTask - 1 before it (a task per block spent
// a tenth of the time handing out tasks)
constexpr int kBlocksPerTask = 4;
struct Block {
  int seq, head, first;
};

// One block of `rows` (at most 16) queries at positions base, base + 1, ...: rounded to bf16
// (zero rows past `rows`), attended, written to out's rows (`a` and `o`: 16 x dim scratch)
void query_block(const float* q, int64_t q_stride, int rows, int base, int dim, float scale,
                 const uint32_t* kt, const uint32_t* vt, float* out, int64_t out_stride,
                 Scratch& scratch, uint16_t* a, float* o) {
  int lens[kRows];
  for (int i = 0; i < kRows; ++i) lens[i] = base + std::min(i, rows - 1) + 1;
  for (int i = 0; i < kRows; ++i)
    for (int d = 0; d < dim; d += 32) {
      const __m512 lo = i < rows ? _mm512_loadu_ps(q + i * q_stride + d) : _mm512_setzero_ps();
      const __m512 hi = i < rows ? _mm512_loadu_ps(q + i * q_stride + d + 16) : _mm512_setzero_ps();
      _mm512_storeu_si512(a + (size_t)i * dim + d, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  // a whole block straight into out; a partial one through o (its tiles have 16 rows)
  const bool whole = rows == kRows;
  attend_block(a, dim * 2, rows, lens, lens[kRows - 1], dim, scale, kt, vt, scratch,
               whole ? out : o, whole ? out_stride : dim);
  for (int i = 0; i < rows && !whole; ++i) std::copy_n(o + (size_t)i * dim, dim, out + i * out_stride);
}

}  // namespace

extern "C" {

// q: [T, num_heads * head_dim] fp32 rows (row stride q_stride); sequence b owns rows
// query_start[b] .. query_start[b + 1] - 1. out: [T, num_heads * head_dim] fp32, contiguous.
// Only chunks of more than one token and at most max_context tokens of context are written
// (decode rows and long contexts are the caller's). head_dim a multiple of 32; the caller
// holds the AMX tile permission.
void pagoda_prefill_attention_amx(const float* q, int64_t q_stride, const uint16_t* k_cache,
                                  const uint16_t* v_cache, const int32_t* block_tables,
                                  int64_t table_stride, const int32_t* query_start,
                                  const int32_t* seq_lens, float* out, int B, int num_heads,
                                  int num_kv_heads, int dim, int block_size, float scale,
                                  int max_context, int threads) {
  const int group = num_heads / num_kv_heads;
  const int64_t token_stride = (int64_t)num_kv_heads * dim, out_stride = (int64_t)num_heads * dim;
  std::vector<Layout> layouts;
  std::vector<Block> blocks;
  std::vector<int> first_layout(B, -1);
  size_t keys_total = 0, values_total = 0;
  for (int b = 0; b < B; ++b) {
    const int count = query_start[b + 1] - query_start[b], len = seq_lens[b];
    if (count <= 1 || len > max_context) continue;
    first_layout[b] = (int)layouts.size();
    for (int h = 0; h < num_kv_heads; ++h) {
      layouts.push_back({b, h, keys_total, values_total});
      keys_total += keys_size(len, dim);
      values_total += values_size(len, dim);
    }
    // the longest blocks (the chunk's last queries) first, so that the threads end together
    for (int first = (count - 1) / kRows * kRows; first >= 0; first -= kBlocksPerTask * kRows)
      for (int h = 0; h < num_heads; ++h) blocks.push_back({b, h, first});
  }
  if (blocks.empty()) return;
  static thread_local std::vector<uint32_t> kt, vt;  // grow to the largest step seen
  uint32_t* const keys = pagoda::aligned_scratch(kt, keys_total);
  uint32_t* const values = pagoda::aligned_scratch(vt, values_total);
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> rows;
#pragma omp for schedule(dynamic, 1)
    for (int n = 0; n < (int)layouts.size(); ++n) {
      const Layout& l = layouts[n];
      const int len = seq_lens[l.seq];
      pagoda::token_rows(block_tables + l.seq * table_stride, len, block_size, token_stride,
                         (int64_t)l.kv_head * dim, rows);
      lay_out_keys(k_cache, rows.data(), len, dim, keys + l.keys);
      lay_out_values(v_cache, rows.data(), len, dim, values + l.values);
    }  // (the loop's implied barrier: every layout is done before a block reads it)
    configure_tiles();
    Scratch scratch;
    std::vector<uint16_t> a_buffer;
    std::vector<float> o_buffer;
    uint16_t* const a = pagoda::aligned_scratch(a_buffer, (size_t)kRows * dim);
    float* const o = pagoda::aligned_scratch(o_buffer, (size_t)kRows * dim);
#pragma omp for schedule(dynamic, 1)
    for (int n = 0; n < (int)blocks.size(); ++n) {
      const Block& task = blocks[n];
      const int count = query_start[task.seq + 1] - query_start[task.seq];
      const Layout& l = layouts[first_layout[task.seq] + task.head / group];
      for (int first = task.first; first >= 0 && task.first - first < kBlocksPerTask * kRows;
           first -= kRows) {
        const int64_t row0 = query_start[task.seq] + first;
        query_block(q + row0 * q_stride + task.head * dim, q_stride, std::min(kRows, count - first),
                    seq_lens[task.seq] - count + first, dim, scale, keys + l.keys,
                    values + l.values, out + row0 * out_stride + task.head * dim, out_stride,
                    scratch, a, o);
      }
    }
    _tile_release();
  }
}

}  // extern "C"
