// Paged attention on AVX-512 or AVX2 CPUs (simd.h) over a flat batch of decode tokens and
// prefill chunks, reading K/V in place through the block tables (no gathered copy of the
// context).
//
// Cache layout (K and V alike): cache[num_blocks][block_size][num_kv_heads][head_dim]; token t
// of sequence b sits in block block_tables[b][t / block_size] at offset t % block_size.
// The cache holds fp32 or bf16 (the upper half of an fp32, widened on load); q, out and all
// arithmetic are fp32.
// Decode: one task per sequence, so a token's K (then V) row of all KV heads is one contiguous
// run, read once for every query head of the group that shares it (GQA).
#include <immintrin.h>  // _mm_prefetch
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "paged_cache.h"
#include "scratch.h"
#include "simd.h"
#include "vec_math.h"

namespace {

using namespace pagoda::simd;

inline f32x16 load16(const float* p) { return load(p); }
inline f32x16 load16(const uint16_t* p) { return load_bf16(p); }
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  const uint32_t bits = (uint32_t)x << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// n floats to bf16, rounding to nearest even (as torch's .bfloat16())
void to_bf16(const float* x, uint16_t* out, int n) {
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) store_bf16(out + i, load(x + i));
  for (; i < n; ++i) {
    uint32_t b;
    memcpy(&b, x + i, sizeof b);
    out[i] = (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
  }
}

// Cache rows of tokens this far ahead are requested before they are needed: a sequence's
// blocks are scattered, so the hardware prefetcher loses the stream at every block boundary.
constexpr int kAhead = 16;

template <typename T>
void prefetch(const T* start, int64_t count) {
  for (int64_t i = 0; i < count; i += 64 / sizeof(T))
    _mm_prefetch((const char*)(start + i), _MM_HINT_T0);
}

// scores[head][t] = q[head] . k[t] * scale for the query heads of KV heads [kv0, kv1);
// returns nothing, leaves the row maxima in top.
// The V rows are requested with the K rows: the context's rows come from L3 or memory (a
// step's weights pass through the caches between two layers' attention), and the values pass
// then finds them in L1 or L2.
template <int C, typename T>  // C = head_dim / 16
void scores_of(const float* q, const T* k_cache, const T* v_cache, const int64_t* rows, int len,
               int kv0, int kv1, int group, float scale, float* scores, float* top) {
  const int64_t first = (int64_t)kv0 * C * kLanes, count = (int64_t)(kv1 - kv0) * C * kLanes;
  for (int head = kv0 * group; head < kv1 * group; ++head) top[head] = -INFINITY;
  for (int t = 0; t < len && t < kAhead; ++t) {
    prefetch(k_cache + rows[t] + first, count);
    prefetch(v_cache + rows[t] + first, count);
  }
  for (int t = 0; t < len; ++t) {
    const T* k = k_cache + rows[t];
    if (t + kAhead < len) {
      prefetch(k_cache + rows[t + kAhead] + first, count);
      prefetch(v_cache + rows[t + kAhead] + first, count);
    }
    for (int h = kv0; h < kv1; ++h) {
      f32x16 kr[C];
      for (int c = 0; c < C; ++c) kr[c] = load16(k + (h * C + c) * kLanes);
      for (int head = h * group; head < (h + 1) * group; ++head) {
        const float* qh = q + head * C * kLanes;
        f32x16 s = mul(load(qh), kr[0]);
        for (int c = 1; c < C; ++c) s = fmadd(load(qh + c * kLanes), kr[c], s);
        const float score = reduce_add(s) * scale;
        scores[(size_t)head * len + t] = score;
        top[head] = score > top[head] ? score : top[head];
      }
    }
  }
}

// scores[head][:] <- softmax(scores[head][:]) for heads [head0, head1)
void softmax_rows(float* scores, const float* top, int head0, int head1, int len) {
  for (int head = head0; head < head1; ++head) {
    float* row = scores + (size_t)head * len;
    const f32x16 shift = set1(top[head]);
    f32x16 sums = zero();
    for (int t = 0; t < len; t += kLanes) {
      const mask16 m = tail_mask(len - t);
      const f32x16 p = pagoda::exp_ps(sub(load(m, row + t), shift));
      store(row + t, m, p);
      sums = add(sums, m, sums, p);
    }
    const f32x16 inv = set1(1.0f / reduce_add(sums));
    for (int t = 0; t < len; t += kLanes) {
      const mask16 m = tail_mask(len - t);
      store(row + t, m, mul(load(m, row + t), inv));
    }
  }
}

// out[head] = sum_t p[head][t] v[t] for heads [head0, head1); each head's accumulator stays in
// registers.
template <int C, typename T>
void weighted_values(const float* probs, const T* v_cache, const int64_t* rows, int len,
                     int head0, int head1, int group, float* out) {
  for (int head = head0; head < head1; ++head) {
    const int h = head / group;
    const float* p = probs + (size_t)head * len;
    f32x16 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = zero();
    for (int t = 0; t < len; ++t) {
      const T* v = v_cache + rows[t] + h * C * kLanes;
      if (head % group == 0 && t + kAhead < len)
        prefetch(v_cache + rows[t + kAhead] + h * C * kLanes, C * kLanes);
      const f32x16 pt = set1(p[t]);
      for (int c = 0; c < C; ++c) acc[c] = fmadd(pt, load16(v + c * kLanes), acc[c]);
    }
    for (int c = 0; c < C; ++c) store(out + (head * C + c) * kLanes, acc[c]);
  }
}

// Attention of one decode token of one sequence: the query heads of KV heads [kv0, kv1).
template <int C, typename T>
void decode_row(const float* q, const T* k_cache, const T* v_cache, const int32_t* table,
                int len, int kv0, int kv1, int num_heads, int group, int block_size,
                int64_t token_stride, float scale, float* out, std::vector<float>& scores,
                std::vector<float>& top, std::vector<int64_t>& rows) {
  scores.resize((size_t)num_heads * len);
  top.resize(num_heads);
  pagoda::token_rows(table, len, block_size, token_stride, 0, rows);
  scores_of<C, T>(q, k_cache, v_cache, rows.data(), len, kv0, kv1, group, scale, scores.data(),
                  top.data());
  softmax_rows(scores.data(), top.data(), kv0 * group, kv1 * group, len);
  weighted_values<C, T>(scores.data(), v_cache, rows.data(), len, kv0 * group, kv1 * group,
                        group, out);
}

// Prefill: up to 16 consecutive query tokens of one sequence and one head, one per lane.
// Lane i is the token at position base + i and sees keys t <= base + i. The query rows are
// transposed once (qt[d] holds dimension d of every row), so a key's score for all rows is a
// chain of broadcast FMAs, and the scores are kept as s[t][lane]: the softmax runs down
// columns with no horizontal sums.
//
//   qt[d][lane] = q[lane][d] * scale      s[t][lane] = sum_d qt[d][lane] * k[t][d]
//   o[d][lane]  = sum_t p[t][lane] * v[t][d], written back as out[lane][d]
// keys scored, and output dimensions summed, per pass of the tile loops: accumulators that fit
// in registers beside their operands (AVX2 has half the f32x16 registers of AVX-512)
constexpr int kKeys = kRegisters == 32 ? 8 : 4;
constexpr int kDims = kRegisters == 32 ? kLanes : 4;

template <int C, int J, typename T>
void score_keys(const float (*qt)[kLanes], const T* k_cache, const int64_t* rows, int t,
                int base, float* s, f32x16& top) {
  f32x16 acc[J];
  for (int j = 0; j < J; ++j) acc[j] = zero();
  for (int d = 0; d < C * kLanes; ++d) {
    const f32x16 qd = load_aligned(qt[d]);
    for (int j = 0; j < J; ++j)
      acc[j] = fmadd(qd, set1(to_float(k_cache[rows[t + j] + d])), acc[j]);
  }
  for (int j = 0; j < J; ++j) {
    const int hidden = t + j - base;  // lanes below this one may not see key t + j yet
    if (hidden > 0) acc[j] = select((mask16)((1u << hidden) - 1), acc[j], set1(-INFINITY));
    top = max(top, acc[j]);
    store_aligned(s + (size_t)(t + j) * kLanes, acc[j]);
  }
}

// The tile's attention over the context's K and V rows (rows[t] = offset of token t's row).
template <int C, typename T>
void prefill_rows(const float (*qt)[kLanes], int count, int base, int len, const T* k_cache,
                  const T* v_cache, const int64_t* rows, float* out, int64_t out_stride,
                  std::vector<float>& s_buf) {
  float* const s = pagoda::aligned_scratch(s_buf, (size_t)len * kLanes);

  f32x16 top = set1(-INFINITY);
  int t = 0;
  for (; t + kKeys <= len; t += kKeys) score_keys<C, kKeys, T>(qt, k_cache, rows, t, base, s, top);
  for (; t < len; ++t) score_keys<C, 1, T>(qt, k_cache, rows, t, base, s, top);

  f32x16 sums = zero();
  for (t = 0; t < len; ++t) {
    f32x16 p = pagoda::exp_ps(sub(load_aligned(s + (size_t)t * kLanes), top));
    const int hidden = t - base;
    if (hidden > 0) p = zero_unless((mask16)~((1u << hidden) - 1), p);
    sums = add(sums, p);
    store_aligned(s + (size_t)t * kLanes, p);
  }
  const f32x16 inv = div(set1(1.0f), sums);

  alignas(64) float o[kLanes][kLanes];  // o[j][lane]: dimension c * 16 + j of each row
  for (int c = 0; c < C; ++c) {
    for (int j0 = 0; j0 < kLanes; j0 += kDims) {
      f32x16 acc[kDims];
      for (int j = 0; j < kDims; ++j) acc[j] = zero();
      for (t = 0; t < len; ++t) {
        const f32x16 p = load_aligned(s + (size_t)t * kLanes);
        const T* v = v_cache + rows[t] + c * kLanes + j0;
        for (int j = 0; j < kDims; ++j) acc[j] = fmadd(p, set1(to_float(v[j])), acc[j]);
      }
      for (int j = 0; j < kDims; ++j) store_aligned(o[j0 + j], mul(acc[j], inv));
    }
    for (int i = 0; i < count; ++i)
      for (int j = 0; j < kLanes; ++j) out[i * out_stride + c * kLanes + j] = o[j][i];
  }
}

// The tile's queries against the first `len` tokens of the context, whose K and V rows start
// at k_cache + rows[t] and v_cache + rows[t].
template <int C, typename T>
void prefill_tile(const float* q, int64_t q_stride, float* out, int64_t out_stride, int count,
                  int base, const T* k_cache, const T* v_cache, const int64_t* rows, float scale,
                  std::vector<float>& s_buf) {
  constexpr int D = C * kLanes;
  alignas(64) float qt[D][kLanes];
  for (int d = 0; d < D; ++d)
    for (int i = 0; i < kLanes; ++i) qt[d][i] = i < count ? q[i * q_stride + d] * scale : 0.0f;
  prefill_rows<C, T>(qt, count, base, base + count, k_cache, v_cache, rows, out, out_stride,
                     s_buf);
}

// bf16 caches: the K and V rows of one sequence's context widened to fp32, for every KV head,
// kept by a thread across the tiles and heads of that sequence it takes. The tile loops
// broadcast every element of K and V into an FMA: from fp32 in memory that is the FMA's own
// operand, from bf16 a load, shift and broadcast each. (A 4 x 128-token prefill step's
// attention, 9 heads of 64, on 2 cores: 2.4-2.6 ms a layer reading bf16, 1.3 widening per
// tile and head, 1.1 widening once per sequence and KV head.)
struct WideContext {
  int seq = -1, capacity = 0;
  std::vector<int> done;       // tokens widened so far, per KV head
  std::vector<float> k, v;     // [kv_head][token < capacity][D]
  std::vector<int64_t> rows;   // rows[t] = t * D
  std::vector<int64_t> cache_rows;

  // The widened rows of tokens [0, len) of KV head `head` of sequence `seq` (context
  // `context` tokens, its blocks in `table`).
  template <int D>
  const float* widen(int seq_id, int head, int len, int context, const uint16_t* cache,
                     const uint16_t* other_cache, const int32_t* table, int block_size,
                     int64_t token_stride, int num_kv_heads, const float** other) {
    if (seq != seq_id) {
      seq = seq_id;
      capacity = context;
      done.assign(num_kv_heads, 0);
      k.resize((size_t)num_kv_heads * capacity * D);
      v.resize((size_t)num_kv_heads * capacity * D);
      if ((int)rows.size() < capacity) {
        rows.resize(capacity);
        for (int t = 0; t < capacity; ++t) rows[t] = (int64_t)t * D;
      }
    }
    float* kw = &k[(size_t)head * capacity * D];
    float* vw = &v[(size_t)head * capacity * D];
    if (done[head] < len) {
      pagoda::token_rows(table, len, block_size, token_stride, (int64_t)head * D, cache_rows);
      for (int t = done[head]; t < len; ++t)
        for (int d = 0; d < D; d += kLanes) {
          store(kw + (size_t)t * D + d, load16(cache + cache_rows[t] + d));
          store(vw + (size_t)t * D + d, load16(other_cache + cache_rows[t] + d));
        }
      done[head] = len;
    }
    *other = vw;
    return kw;
  }
};

// A unit of work: one decode sequence (tile < 0; head: one KV head, whose query heads it
// computes, or all of them when -1), or one head of one 16-token query tile.
struct Task {
  int seq, tile, head;
};

template <int C, typename T>
void attend(const float* q, int64_t q_stride, const T* k_cache, const T* v_cache,
            const int32_t* block_tables, int64_t table_stride, const int32_t* query_start,
            const int32_t* seq_lens, float* out, int B, int num_heads, int num_kv_heads,
            int block_size, float scale, int max_prefill_context, int threads) {
  constexpr int D = C * kLanes;
  const int group = num_heads / num_kv_heads;
  const int64_t token_stride = (int64_t)num_kv_heads * D;
  const int64_t out_stride = (int64_t)num_heads * D;
  std::vector<Task> tasks;
  for (int b = 0; b < B; ++b) {  // prefill tiles first, the longest of each sequence first
    const int count = query_start[b + 1] - query_start[b];
    if (count > 1 && seq_lens[b] <= max_prefill_context)
      for (int tile = (count - 1) / kLanes; tile >= 0; --tile)
        for (int head = 0; head < num_heads; ++head) tasks.push_back({b, tile, head});
  }
  int decodes = 0;
  for (int b = 0; b < B; ++b) decodes += query_start[b + 1] - query_start[b] == 1;
  // Fewer decode sequences than two a thread leave threads idle (one sequence: all but one):
  // then each KV head (with its query heads) is a task of its own: SmolLM2-135M's 30 layers at
  // batch 1 on 2 threads took 0.91 ms against 1.17 (one task per query head: 1.04).
  const bool by_kv_head = decodes < 2 * threads;
  for (int b = 0; b < B; ++b)
    if (query_start[b + 1] - query_start[b] == 1) {
      if (!by_kv_head) tasks.push_back({b, -1, -1});
      for (int kv = 0; by_kv_head && kv < num_kv_heads; ++kv) tasks.push_back({b, -1, kv});
    }
  const int num_tasks = (int)tasks.size();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores, top;
    std::vector<int64_t> rows;
    WideContext wide;
#pragma omp for schedule(dynamic, 1)
    for (int n = 0; n < num_tasks; ++n) {
      const Task task = tasks[n];
      const int32_t* table = block_tables + (int64_t)task.seq * table_stride;
      const int first = query_start[task.seq];
      const int len = seq_lens[task.seq];
      if (task.tile < 0) {
        const int kv0 = task.head < 0 ? 0 : task.head;
        const int kv1 = task.head < 0 ? num_kv_heads : task.head + 1;
        decode_row<C, T>(q + first * q_stride, k_cache, v_cache, table, len, kv0, kv1,
                         num_heads, group, block_size, token_stride, scale,
                         out + first * out_stride, scores, top, rows);
        continue;
      }
      const int count = query_start[task.seq + 1] - first;
      const int start = task.tile * kLanes;
      const int rows_here = count - start < kLanes ? count - start : kLanes;
      const int64_t row0 = first + start;
      const int base = len - count + start, seen = base + rows_here, kv_head = task.head / group;
      const float* query = q + row0 * q_stride + task.head * D;
      float* tile_out = out + row0 * out_stride + task.head * D;
      if constexpr (sizeof(T) == 2) {
        const float* v_wide;
        const float* k_wide =
            wide.template widen<D>(task.seq, kv_head, seen, len, k_cache, v_cache, table,
                                   block_size, token_stride, num_kv_heads, &v_wide);
        prefill_tile<C, float>(query, q_stride, tile_out, out_stride, rows_here, base, k_wide,
                               v_wide, wide.rows.data(), scale, scores);
      } else {
        pagoda::token_rows(table, seen, block_size, token_stride, (int64_t)kv_head * D, rows);
        prefill_tile<C, T>(query, q_stride, tile_out, out_stride, rows_here, base, k_cache,
                           v_cache, rows.data(), scale, scores);
      }
    }
  }
}

template <typename T>
void paged_attention(const float* q, int64_t q_stride, const T* k_cache, const T* v_cache,
                     const int32_t* block_tables, int64_t table_stride,
                     const int32_t* query_start, const int32_t* seq_lens, float* out, int B,
                     int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                     int max_prefill_context, int threads) {
#define PAGODA_ATTEND(C)                                                                   \
  attend<C, T>(q, q_stride, k_cache, v_cache, block_tables, table_stride, query_start,      \
               seq_lens, out, B, num_heads, num_kv_heads, block_size, scale,               \
               max_prefill_context, threads)
  switch (head_dim) {
    case 32:
      return PAGODA_ATTEND(2);
    case 64:
      return PAGODA_ATTEND(4);
    case 128:
      return PAGODA_ATTEND(8);
  }
#undef PAGODA_ATTEND
}

}  // namespace

extern "C" {

// Rows t of k and v ([T, row] with row strides k_stride, v_stride) into cache slots slots[t]
// of the caches ([num_slots, row] contiguous); a negative slot (padding row) is skipped.
void pagoda_write_kv_cache(const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                           float* k_cache, float* v_cache, const int64_t* slots, int T, int row) {
  for (int t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    memcpy(k_cache + slots[t] * row, k + t * k_stride, row * sizeof(float));
    memcpy(v_cache + slots[t] * row, v + t * v_stride, row * sizeof(float));
  }
}

// The same into bf16 caches.
void pagoda_write_kv_cache_bf16(const float* k, int64_t k_stride, const float* v,
                                int64_t v_stride, uint16_t* k_cache, uint16_t* v_cache,
                                const int64_t* slots, int T, int row) {
  for (int t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    to_bf16(k + t * k_stride, k_cache + slots[t] * row, row);
    to_bf16(v + t * v_stride, v_cache + slots[t] * row, row);
  }
}

// q: [T, num_heads * head_dim] rows with row stride q_stride; sequence b owns rows
// query_start[b] .. query_start[b + 1] - 1, the last tokens of its seq_lens[b]; out: [T,
// num_heads * head_dim] contiguous. Prefill chunks with more than max_prefill_context tokens of
// context are left unwritten for the caller. head_dim 32, 64 or 128 (the caller checks; returns
// without writing otherwise).
void pagoda_paged_attention(const float* q, int64_t q_stride, const float* k_cache,
                            const float* v_cache, const int32_t* block_tables,
                            int64_t table_stride, const int32_t* query_start,
                            const int32_t* seq_lens, float* out, int B, int num_heads,
                            int num_kv_heads, int head_dim, int block_size, float scale,
                            int max_prefill_context, int threads) {
  paged_attention(q, q_stride, k_cache, v_cache, block_tables, table_stride, query_start,
                  seq_lens, out, B, num_heads, num_kv_heads, head_dim, block_size, scale,
                  max_prefill_context, threads);
}

// The same over bf16 caches (fp32 q, out and arithmetic).
void pagoda_paged_attention_bf16(const float* q, int64_t q_stride, const uint16_t* k_cache,
                                 const uint16_t* v_cache, const int32_t* block_tables,
                                 int64_t table_stride, const int32_t* query_start,
                                 const int32_t* seq_lens, float* out, int B, int num_heads,
                                 int num_kv_heads, int head_dim, int block_size, float scale,
                                 int max_prefill_context, int threads) {
  paged_attention(q, q_stride, k_cache, v_cache, block_tables, table_stride, query_start,
                  seq_lens, out, B, num_heads, num_kv_heads, head_dim, block_size, scale,
                  max_prefill_context, threads);
}

}  // extern "C"
