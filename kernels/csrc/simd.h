// The CPU kernels' vector: 16 fp32 lanes and a 16-bit lane mask, so that one kernel source
// builds for AVX-512 and for AVX2 (with FMA and F16C, which every AVX2 server CPU has).
//
//   AVX-512: f32x16 is one zmm register, mask16 a k register, and every operation below is
//            the one intrinsic it wraps: the kernels compile to the same code as when they
//            were written with the intrinsics directly.
//   AVX2:    f32x16 is two ymm registers {lanes 0-7, lanes 8-15}, run one after the other;
//            mask16 is a plain 16-bit integer, widened to lane masks for vmaskmov (which, like
//            AVX-512's masked loads, leaves masked-off memory untouched, so a row's tail may
//            end at a page's end).
//
// A kernel keeps as many f32x16 live as its loops need; on AVX2 that is twice the registers
// (16 ymm against 32 zmm), so register-blocked loops take their block size from kRegisters.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#define PAGODA_INLINE inline __attribute__((always_inline))

namespace pagoda::simd {

constexpr int kLanes = 16;

#if defined(__AVX512F__)

constexpr int kRegisters = 32;  // f32x16 values that fit in registers
using f32x16 = __m512;
using mask16 = __mmask16;

PAGODA_INLINE f32x16 zero() { return _mm512_setzero_ps(); }
PAGODA_INLINE f32x16 set1(float x) { return _mm512_set1_ps(x); }
PAGODA_INLINE f32x16 load(const float* p) { return _mm512_loadu_ps(p); }
PAGODA_INLINE f32x16 load_aligned(const float* p) { return _mm512_load_ps(p); }
PAGODA_INLINE f32x16 load(mask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
PAGODA_INLINE void store(float* p, f32x16 x) { _mm512_storeu_ps(p, x); }
PAGODA_INLINE void store_aligned(float* p, f32x16 x) { _mm512_store_ps(p, x); }
PAGODA_INLINE void store(float* p, mask16 m, f32x16 x) { _mm512_mask_storeu_ps(p, m, x); }

PAGODA_INLINE f32x16 add(f32x16 a, f32x16 b) { return _mm512_add_ps(a, b); }
PAGODA_INLINE f32x16 sub(f32x16 a, f32x16 b) { return _mm512_sub_ps(a, b); }
PAGODA_INLINE f32x16 mul(f32x16 a, f32x16 b) { return _mm512_mul_ps(a, b); }
PAGODA_INLINE f32x16 div(f32x16 a, f32x16 b) { return _mm512_div_ps(a, b); }
PAGODA_INLINE f32x16 max(f32x16 a, f32x16 b) { return _mm512_max_ps(a, b); }
PAGODA_INLINE f32x16 min(f32x16 a, f32x16 b) { return _mm512_min_ps(a, b); }
PAGODA_INLINE f32x16 fmadd(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }
PAGODA_INLINE f32x16 fnmadd(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fnmadd_ps(a, b, c); }
// a + b in the lanes of m, src elsewhere
PAGODA_INLINE f32x16 add(f32x16 src, mask16 m, f32x16 a, f32x16 b) {
  return _mm512_mask_add_ps(src, m, a, b);
}
// b in the lanes of m, a elsewhere; a in the lanes of m, 0 elsewhere
PAGODA_INLINE f32x16 select(mask16 m, f32x16 a, f32x16 b) { return _mm512_mask_mov_ps(a, m, b); }
PAGODA_INLINE f32x16 zero_unless(mask16 m, f32x16 a) { return _mm512_maskz_mov_ps(m, a); }

PAGODA_INLINE float reduce_add(f32x16 x) { return _mm512_reduce_add_ps(x); }
PAGODA_INLINE float reduce_max(f32x16 x) { return _mm512_reduce_max_ps(x); }

// x rounded to the nearest integer (ties to even); p * 2^n for integral n
PAGODA_INLINE f32x16 round_nearest(f32x16 x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
PAGODA_INLINE f32x16 times_pow2(f32x16 p, f32x16 n) { return _mm512_scalef_ps(p, n); }

// 16 bf16 values (the upper halves of fp32s) widened to fp32
PAGODA_INLINE f32x16 load_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
// x rounded to the nearest bf16, ties to even (as torch's .bfloat16()); no NaNs come here
PAGODA_INLINE void store_bf16(uint16_t* p, f32x16 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

// lanes of m where a >= b, a > b, a == b (ordered: false where either is NaN); lanes that are NaN
PAGODA_INLINE mask16 at_least(mask16 m, f32x16 a, f32x16 b) {
  return _mm512_mask_cmp_ps_mask(m, a, b, _CMP_GE_OQ);
}
PAGODA_INLINE mask16 greater(mask16 m, f32x16 a, f32x16 b) {
  return _mm512_mask_cmp_ps_mask(m, a, b, _CMP_GT_OQ);
}
PAGODA_INLINE mask16 equal(f32x16 a, f32x16 b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
PAGODA_INLINE mask16 is_nan(f32x16 a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
// min, max of a and b in the lanes of m, src elsewhere
PAGODA_INLINE f32x16 min(f32x16 src, mask16 m, f32x16 a, f32x16 b) {
  return _mm512_mask_min_ps(src, m, a, b);
}
PAGODA_INLINE f32x16 max(f32x16 src, mask16 m, f32x16 a, f32x16 b) {
  return _mm512_mask_max_ps(src, m, a, b);
}
PAGODA_INLINE float reduce_min(f32x16 x) { return _mm512_reduce_min_ps(x); }
// the lanes of m, stored one after another from p
PAGODA_INLINE void compress_store(float* p, mask16 m, f32x16 x) {
  _mm512_mask_compressstoreu_ps(p, m, x);
}

// bf16 rows' tails: 16-bit masked moves (AVX512BW and VL, which every CPU with AVX512 in torch's
// sense has); callers carry PAGODA_BF16_TAILS themselves
#define PAGODA_BF16_TAILS __attribute__((target("avx512bw,avx512vl")))
PAGODA_BF16_TAILS PAGODA_INLINE f32x16 load_bf16(mask16 m, const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
// x rounded to the nearest bf16 (ties to even), kept as fp32 (the low half zero)
PAGODA_INLINE f32x16 round_bf16(f32x16 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000)));
}
PAGODA_BF16_TAILS PAGODA_INLINE void store_bf16(uint16_t* p, mask16 m, f32x16 x) {
  const __m512i r = _mm512_srli_epi32(_mm512_castps_si512(round_bf16(x)), 16);
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

// bf16 weights in a kernel's own layout, in the order that widens fastest: 16 values that
// load_bf16_packed returns in lanes 0-15 are stored at slots kBf16Slot[0..15] (AVX-512: in order)
constexpr int kBf16Slot[kLanes] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
PAGODA_INLINE f32x16 load_bf16_packed(const uint16_t* p) { return load_bf16(p); }

#else  // AVX2

constexpr int kRegisters = 8;
struct f32x16 {
  __m256 lo, hi;
};
using mask16 = uint16_t;  // bit i: lane i

// the 8 lanes whose bits are set in `bits`, as all-ones 32-bit lanes
PAGODA_INLINE __m256i lanes(unsigned bits) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), bit), bit);
}
PAGODA_INLINE __m256 lanes_ps(unsigned bits) { return _mm256_castsi256_ps(lanes(bits)); }

PAGODA_INLINE f32x16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
PAGODA_INLINE f32x16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
PAGODA_INLINE f32x16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
PAGODA_INLINE f32x16 load_aligned(const float* p) {
  return {_mm256_load_ps(p), _mm256_load_ps(p + 8)};
}
// 8 lanes at p where `bits` are set (0 elsewhere), touching no other memory. Whole halves take
// the plain moves: vmaskmov is microcoded on AMD's Zen, and on a Zen 3 EPYC the plain moves made
// RMSNorm, SiLU and rotary 1.7-2.6x faster at 32-256 rows and the linear 8-14% at 96-256.
PAGODA_INLINE __m256 load_half(unsigned bits, const float* p) {
  if (bits == 0xFF) return _mm256_loadu_ps(p);
  return _mm256_maskload_ps(p, lanes(bits));
}
PAGODA_INLINE void store_half(float* p, unsigned bits, __m256 x) {
  if (bits == 0xFF) return _mm256_storeu_ps(p, x);
  if (bits) _mm256_maskstore_ps(p, lanes(bits), x);
}
PAGODA_INLINE f32x16 load(mask16 m, const float* p) {
  return {load_half(m & 0xFF, p), load_half(m >> 8, p + 8)};
}
PAGODA_INLINE void store(float* p, f32x16 x) {
  _mm256_storeu_ps(p, x.lo);
  _mm256_storeu_ps(p + 8, x.hi);
}
PAGODA_INLINE void store_aligned(float* p, f32x16 x) {
  _mm256_store_ps(p, x.lo);
  _mm256_store_ps(p + 8, x.hi);
}
PAGODA_INLINE void store(float* p, mask16 m, f32x16 x) {
  store_half(p, m & 0xFF, x.lo);
  store_half(p + 8, m >> 8, x.hi);
}

#define PAGODA_LANEWISE(name, op)                                           \
  PAGODA_INLINE f32x16 name(f32x16 a, f32x16 b) {                           \
    return {op(a.lo, b.lo), op(a.hi, b.hi)};                                \
  }
PAGODA_LANEWISE(add, _mm256_add_ps)
PAGODA_LANEWISE(sub, _mm256_sub_ps)
PAGODA_LANEWISE(mul, _mm256_mul_ps)
PAGODA_LANEWISE(div, _mm256_div_ps)
PAGODA_LANEWISE(max, _mm256_max_ps)
PAGODA_LANEWISE(min, _mm256_min_ps)
#undef PAGODA_LANEWISE
PAGODA_INLINE f32x16 fmadd(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
PAGODA_INLINE f32x16 fnmadd(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
PAGODA_INLINE f32x16 select(mask16 m, f32x16 a, f32x16 b) {
  return {_mm256_blendv_ps(a.lo, b.lo, lanes_ps(m & 0xFF)),
          _mm256_blendv_ps(a.hi, b.hi, lanes_ps(m >> 8))};
}
PAGODA_INLINE f32x16 add(f32x16 src, mask16 m, f32x16 a, f32x16 b) {
  return select(m, src, add(a, b));
}
PAGODA_INLINE f32x16 zero_unless(mask16 m, f32x16 a) {
  return {_mm256_and_ps(a.lo, lanes_ps(m & 0xFF)), _mm256_and_ps(a.hi, lanes_ps(m >> 8))};
}

// the same tree as GCC's _mm512_reduce_add_ps (halves, quarters, pairs), so the same bits
PAGODA_INLINE float reduce_add(f32x16 x) {
  const __m256 h = _mm256_add_ps(x.hi, x.lo);
  const __m128 q = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(p) + _mm_cvtss_f32(_mm_shuffle_ps(p, p, 1));
}
PAGODA_INLINE float reduce_max(f32x16 x) {
  const __m256 h = _mm256_max_ps(x.hi, x.lo);
  const __m128 q = _mm_max_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 p = _mm_max_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  const float a = _mm_cvtss_f32(p), b = _mm_cvtss_f32(_mm_shuffle_ps(p, p, 1));
  return a > b ? a : b;
}

PAGODA_INLINE f32x16 round_nearest(f32x16 x) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(x.lo, mode), _mm256_round_ps(x.hi, mode)};
}
// p * 2^n for integral n in [-252, 254], as two exact power-of-two factors 2^(n/2) (each a
// normal float): rounded once, where the product leaves the normal range, as vscalefps rounds
PAGODA_INLINE __m256 times_pow2(__m256 p, __m256 n) {
  const __m256i whole = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(whole, 1);
  const __m256i rest = _mm256_sub_epi32(whole, half);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}
PAGODA_INLINE f32x16 times_pow2(f32x16 p, f32x16 n) {
  return {times_pow2(p.lo, n.lo), times_pow2(p.hi, n.hi)};
}

PAGODA_INLINE __m256 widen_bf16(__m128i eight) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(eight), 16));
}
PAGODA_INLINE f32x16 load_bf16(const uint16_t* p) {
  return {widen_bf16(_mm_loadu_si128((const __m128i*)p)),
          widen_bf16(_mm_loadu_si128((const __m128i*)(p + 8)))};
}
PAGODA_INLINE __m256i round_bf16(__m256 x) {  // the bf16 in the lower half of each lane
  const __m256i b = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  return _mm256_srli_epi32(r, 16);
}
PAGODA_INLINE void store_bf16(uint16_t* p, f32x16 x) {
  // packus interleaves 128-bit halves: [lo 0-3, hi 0-3, lo 4-7, hi 4-7] -> lane order
  const __m256i packed = _mm256_packus_epi32(round_bf16(x.lo), round_bf16(x.hi));
  _mm256_storeu_si256((__m256i*)p, _mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0)));
}

// a lane mask from two 8-lane compare results
PAGODA_INLINE mask16 bits(__m256 lo, __m256 hi) {
  return (mask16)(_mm256_movemask_ps(lo) | _mm256_movemask_ps(hi) << 8);
}
template <int Op>
PAGODA_INLINE mask16 compare(f32x16 a, f32x16 b) {
  return bits(_mm256_cmp_ps(a.lo, b.lo, Op), _mm256_cmp_ps(a.hi, b.hi, Op));
}
PAGODA_INLINE mask16 at_least(mask16 m, f32x16 a, f32x16 b) {
  return m & compare<_CMP_GE_OQ>(a, b);
}
PAGODA_INLINE mask16 greater(mask16 m, f32x16 a, f32x16 b) {
  return m & compare<_CMP_GT_OQ>(a, b);
}
PAGODA_INLINE mask16 equal(f32x16 a, f32x16 b) { return compare<_CMP_EQ_OQ>(a, b); }
PAGODA_INLINE mask16 is_nan(f32x16 a) { return compare<_CMP_UNORD_Q>(a, a); }
PAGODA_INLINE f32x16 min(f32x16 src, mask16 m, f32x16 a, f32x16 b) {
  return select(m, src, min(a, b));
}
PAGODA_INLINE f32x16 max(f32x16 src, mask16 m, f32x16 a, f32x16 b) {
  return select(m, src, max(a, b));
}
PAGODA_INLINE float reduce_min(f32x16 x) {
  const __m256 h = _mm256_min_ps(x.hi, x.lo);
  const __m128 q = _mm_min_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 p = _mm_min_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  const float a = _mm_cvtss_f32(p), b = _mm_cvtss_f32(_mm_shuffle_ps(p, p, 1));
  return a < b ? a : b;
}
PAGODA_INLINE void compress_store(float* p, mask16 m, f32x16 x) {
  alignas(32) float lanes[kLanes];
  store_aligned(lanes, x);
  for (unsigned rest = m; rest; rest &= rest - 1) *p++ = lanes[__builtin_ctz(rest)];
}

#define PAGODA_BF16_TAILS
// bf16 rows' tails: AVX2 has no 16-bit masked moves, so the lanes go through a buffer
PAGODA_INLINE f32x16 load_bf16(mask16 m, const uint16_t* p) {
  if (m == 0xFFFF) return load_bf16(p);
  uint16_t lanes[kLanes] = {};
  for (unsigned rest = m; rest; rest &= rest - 1) {
    const int i = __builtin_ctz(rest);
    lanes[i] = p[i];
  }
  return load_bf16(lanes);
}
PAGODA_INLINE f32x16 round_bf16(f32x16 x) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(round_bf16(x.lo), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(round_bf16(x.hi), 16))};
}
PAGODA_INLINE void store_bf16(uint16_t* p, mask16 m, f32x16 x) {
  if (m == 0xFFFF) return store_bf16(p, x);
  uint16_t lanes[kLanes];
  store_bf16(lanes, x);
  for (unsigned rest = m; rest; rest &= rest - 1) {
    const int i = __builtin_ctz(rest);
    p[i] = lanes[i];
  }
}

// AVX2: one 256-bit load, and each half widened by one unpack against zero (the bf16 into the
// upper 16 bits of its lane), where load_bf16 takes a zero-extension and a shift; unpack works
// within 128-bit halves, so lanes 4-7 and 8-11 trade places in memory
constexpr int kBf16Slot[kLanes] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
PAGODA_INLINE f32x16 load_bf16_packed(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  const __m256i z = _mm256_setzero_si256();
  return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v)),
          _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v))};
}

#endif

// the first `remaining` lanes (all 16 from 16 on)
PAGODA_INLINE mask16 tail_mask(int remaining) {
  return remaining >= kLanes ? (mask16)0xFFFF : (mask16)((1u << remaining) - 1);
}

}  // namespace pagoda::simd
