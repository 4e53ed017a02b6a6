// Scratch buffers kept and grown across calls, handed out 64-byte aligned. malloc aligns to 16
// bytes (a large block sits 16 bytes past a page), and at an offset of 16 or 48 bytes a 32- or
// 64-byte load, or a tile row, splits a cache line: re-reading such a buffer, the AVX2 bf16
// linear took 1.10-1.19x the time of an aligned one (2-core Zen 3 EPYC).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <vector>

namespace pagoda {

// The first `count` elements of `buffer`, 64-byte aligned. It grows (never shrinks); what it
// held is not kept where it grows.
template <class T>
T* aligned_scratch(std::vector<T>& buffer, size_t count) {
  constexpr size_t slack = 64 / sizeof(T);
  if (buffer.size() < count + slack) buffer.resize(count + slack);
  return (T*)(((uintptr_t)buffer.data() + 63) & ~(uintptr_t)63);
}

}  // namespace pagoda
