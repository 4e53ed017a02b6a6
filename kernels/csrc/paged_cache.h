// The paged K/V cache's addressing, shared by the CPU attention kernels: cache[num_blocks]
// [block_size][num_kv_heads][head_dim], token t of a sequence in block table[t / block_size]
// at offset t % block_size.
#pragma once
#include <stdint.h>

#include <vector>

namespace pagoda {

// rows[t] = element offset of token t's cache row (plus `offset`, e.g. a KV head's), for
// t < len (computed once per task, so the loops over tokens do no division).
inline void token_rows(const int32_t* table, int len, int block_size, int64_t token_stride,
                       int64_t offset, std::vector<int64_t>& rows) {
  rows.resize(len);
  for (int t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
    const int64_t first = (int64_t)table[b] * block_size * token_stride + offset;
    const int end = t0 + block_size < len ? t0 + block_size : len;
    for (int t = t0; t < end; ++t) rows[t] = first + (t - t0) * token_stride;
  }
}

}  // namespace pagoda
