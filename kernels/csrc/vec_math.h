// Vector math shared by the CPU kernels (fp32, on simd.h's vectors).
#pragma once
#include "simd.h"

namespace pagoda {

using simd::f32x16;

// e^x to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
// (remainder below 2e-7 relative), then scaled by 2^n.
inline f32x16 exp_ps(f32x16 x) {
  using namespace simd;
  x = min(max(x, set1(-87.3f)), set1(88.7f));
  const f32x16 n = round_nearest(mul(x, set1(1.44269504f)));
  f32x16 r = fnmadd(n, set1(0.693145752f), x);
  r = fnmadd(n, set1(1.42860677e-6f), r);
  f32x16 p = set1(1.0f / 720);
  p = fmadd(p, r, set1(1.0f / 120));
  p = fmadd(p, r, set1(1.0f / 24));
  p = fmadd(p, r, set1(1.0f / 6));
  p = fmadd(p, r, set1(0.5f));
  p = fmadd(p, r, set1(1.0f));
  p = fmadd(p, r, set1(1.0f));
  return times_pow2(p, n);
}

// silu(g) * u = g / (1 + e^-g) * u: one definition for the activation kernel and the linear
// that fuses it, so that both give the same bits
inline f32x16 silu_mul(f32x16 g, f32x16 u) {
  using namespace simd;
  const f32x16 one = set1(1.0f);
  const f32x16 sig = div(one, add(one, exp_ps(sub(zero(), g))));
  return mul(mul(g, sig), u);
}

}  // namespace pagoda
