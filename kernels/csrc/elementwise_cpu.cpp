// The per-token elementwise ops of a decoder layer, fp32, AVX-512 or AVX2 (simd.h). At decode
// batch sizes torch spends most of their time dispatching its 3-8 small ops each; one pass here
// does the same arithmetic in a few microseconds. And an encoder's residual add and LayerNorm in
// bf16, and the sampler's reductions over rows of the vocabulary.
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "simd.h"
#include "vec_math.h"

namespace {

using namespace pagoda::simd;

// Rows are split between threads only when there is enough work to pay for waking them.
constexpr int64_t kParallelFloats = 1 << 14;

alignas(64) constexpr float kLaneIndices[kLanes] = {0, 1, 2,  3,  4,  5,  6,  7,
                                                   8, 9, 10, 11, 12, 13, 14, 15};

// Vector passes over a row for the sampler's selections: how many values, and how much mass,
// lie at or above a threshold; and those values, compressed into out (returns their count).
int64_t count_at_least(const float* x, int V, float tau) {
  const f32x16 t = set1(tau);
  int64_t n = 0;
  for (int i = 0; i < V; i += kLanes) {
    const mask16 m = tail_mask(V - i);
    n += __builtin_popcount(at_least(m, load(m, x + i), t));
  }
  return n;
}

double mass_at_least(const float* x, int V, float tau) {
  const f32x16 t = set1(tau);
  f32x16 sum = zero();
  for (int i = 0; i < V; i += kLanes) {
    const mask16 m = tail_mask(V - i);
    const f32x16 v = load(m, x + i);
    sum = add(sum, at_least(m, v, t), sum, v);
  }
  return reduce_add(sum);
}

// the smallest value above -inf and the largest (inf and -inf when there is none)
void finite_range(const float* x, int V, float* lo, float* hi) {
  f32x16 small = set1(INFINITY), large = set1(-INFINITY);
  for (int i = 0; i < V; i += kLanes) {
    const mask16 m = tail_mask(V - i);
    const f32x16 v = load(m, x + i);
    const mask16 finite = greater(m, v, set1(-INFINITY));
    small = min(small, finite, small, v);
    large = max(large, finite, large, v);
  }
  *lo = reduce_min(small);
  *hi = reduce_max(large);
}

int compress_at_least(const float* x, int V, float tau, float* out) {
  const f32x16 t = set1(tau);
  int n = 0;
  for (int i = 0; i < V; i += kLanes) {
    const mask16 m = tail_mask(V - i);
    const f32x16 v = load(m, x + i);
    const mask16 keep = at_least(m, v, t);
    compress_store(out + n, keep, v);
    n += __builtin_popcount(keep);
  }
  return n;
}

// The smallest probability that top-p keeps in a row: token x is kept when the tokens more
// probable than x hold less than top_p of the mass (equal probabilities are kept or dropped
// together). A quickselect by mass over v[0, n), which must hold every value above the answer:
// each round splits the range around a pivot into larger, equal and smaller values and goes on
// in the part where the mass before a token crosses top_p. Returns -1 where v's mass is short
// of top_p.
float top_p_select(float* v, size_t n, double top_p) {
  // invariants: above (the mass of the values larger than all of [lo, hi)) < top_p, and the
  // smallest kept value lies in [lo, hi)
  size_t lo = 0, hi = n;
  double above = 0.0;
  while (lo < hi) {
    const float a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi - 1];
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    size_t larger = lo, i = lo, smaller = hi;  // [lo, larger) > pivot, [larger, i) == pivot
    double mass_larger = 0.0, mass_equal = 0.0;
    while (i < smaller) {
      const float x = v[i];
      if (x > pivot) {
        mass_larger += x;
        std::swap(v[larger++], v[i++]);
      } else if (x < pivot) {
        std::swap(v[i], v[--smaller]);
      } else {
        mass_equal += x;
        ++i;
      }
    }
    if (above + mass_larger >= top_p) {  // the pivot's tokens are dropped: cut above them
      hi = larger;
      continue;
    }
    above += mass_larger + mass_equal;  // the pivot's tokens are kept
    if (above >= top_p) return pivot;
    lo = smaller;
  }
  return -1.0f;
}


}  // namespace

extern "C" {

// out = layer_norm(x + residual) * weight + bias over rows of H, all bf16 and contiguous [T, H]
// (residual, weight, bias may be null), the sum and the statistics in fp32, as torch's bf16
// LayerNorm computes them.
PAGODA_BF16_TAILS void pagoda_add_layer_norm_bf16(
    const uint16_t* x, const uint16_t* residual, const uint16_t* weight, const uint16_t* bias,
    uint16_t* out, int T, int H, float eps, int threads) {
#pragma omp parallel num_threads(threads) if ((int64_t)T * H >= kParallelFloats)
  {
    std::vector<float> row(H);
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) {
      const uint16_t* xt = x + (int64_t)t * H;
      const uint16_t* rt = residual ? residual + (int64_t)t * H : nullptr;
      f32x16 sum = zero();
      for (int i = 0; i < H; i += kLanes) {
        const mask16 m = tail_mask(H - i);
        f32x16 v = load_bf16(m, xt + i);
        // the sum rounded to bf16, as torch's bf16 add leaves it for its LayerNorm
        if (rt) v = round_bf16(add(v, load_bf16(m, rt + i)));
        store(&row[i], m, v);
        sum = add(sum, v);
      }
      const f32x16 mean = set1(reduce_add(sum) / H);
      f32x16 squares = zero();
      for (int i = 0; i < H; i += kLanes) {
        const mask16 m = tail_mask(H - i);
        const f32x16 d = zero_unless(m, sub(load(m, &row[i]), mean));
        squares = fmadd(d, d, squares);
      }
      const f32x16 inv = set1(1.0f / sqrtf(reduce_add(squares) / H + eps));
      uint16_t* ot = out + (int64_t)t * H;
      for (int i = 0; i < H; i += kLanes) {
        const mask16 m = tail_mask(H - i);
        f32x16 v = mul(sub(load(m, &row[i]), mean), inv);
        if (weight) v = mul(v, load_bf16(m, weight + i));
        if (bias) v = add(v, load_bf16(m, bias + i));
        store_bf16(ot + i, m, v);
      }
    }
  }
}

// out[t] = the index of the largest value of row t of x ([T, V], row stride x_stride), the
// first of equal ones, or of the first NaN in a row that has one: torch's max(dim=-1).indices.
// A row of -inf (every token masked) gives 0.
void pagoda_argmax_rows(const float* x, int64_t x_stride, int64_t* out, int T, int V,
                        int threads) {
#pragma omp parallel for num_threads(threads) if ((int64_t)T * V >= kParallelFloats)
  for (int t = 0; t < T; ++t) {
    const float* row = x + t * x_stride;
    // per lane: its largest value so far and where (a strict > keeps the first of equal ones),
    // the index as a float, exact below 2^24 (a vocabulary is far smaller)
    f32x16 best = set1(-INFINITY), where = zero(), at = load(kLaneIndices);
    mask16 nan = 0;
    for (int i = 0; i < V; i += kLanes) {
      const mask16 m = tail_mask(V - i);
      const f32x16 v = select(m, best, load(m, row + i));
      const mask16 larger = greater(0xFFFF, v, best);
      nan |= is_nan(v);
      best = select(larger, best, v);
      where = select(larger, where, at);
      at = add(at, set1((float)kLanes));
    }
    if (nan) {
      int i = 0;
      while (row[i] == row[i]) ++i;
      out[t] = i;
      continue;
    }
    const mask16 tops = equal(best, set1(reduce_max(best)));
    out[t] = (int64_t)reduce_min(select(tops, set1(INFINITY), where));
  }
}

// new_residual = x + residual (x alone when residual is null), out = weight * new_residual /
// rms(new_residual). x rows have stride x_stride; the rest is contiguous [T, H].
void pagoda_rms_norm(const float* x, int64_t x_stride, const float* residual, const float* weight,
                     float* out, float* new_residual, int T, int H, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if ((int64_t)T * H >= kParallelFloats)
  for (int t = 0; t < T; ++t) {
    const float* xt = x + t * x_stride;
    const float* rt = residual ? residual + (int64_t)t * H : nullptr;
    float* nt = new_residual ? new_residual + (int64_t)t * H : nullptr;
    f32x16 squares = zero();
    for (int i = 0; i < H; i += kLanes) {
      const mask16 m = tail_mask(H - i);
      f32x16 v = load(m, xt + i);
      if (rt) v = add(v, load(m, rt + i));
      if (nt) store(nt + i, m, v);
      squares = fmadd(v, v, squares);
    }
    const f32x16 inv = set1(1.0f / sqrtf(reduce_add(squares) / H + eps));
    const float* src = nt ? nt : xt;
    float* ot = out + (int64_t)t * H;
    for (int i = 0; i < H; i += kLanes) {
      const mask16 m = tail_mask(H - i);
      const f32x16 v = mul(load(m, src + i), inv);
      store(ot + i, m, mul(load(m, weight + i), v));
    }
  }
}

// out [T, I] = silu(gate) * up where each row of x (stride x_stride) is [gate (I) | up (I)].
void pagoda_silu_and_mul(const float* x, int64_t x_stride, float* out, int T, int I,
                         int threads) {
#pragma omp parallel for num_threads(threads) if ((int64_t)T * I >= kParallelFloats)
  for (int t = 0; t < T; ++t) {
    const float* gate = x + t * x_stride;
    const float* up = gate + I;
    float* ot = out + (int64_t)t * I;
    for (int i = 0; i < I; i += kLanes) {
      const mask16 m = tail_mask(I - i);
      store(ot + i, m, pagoda::silu_mul(load(m, gate + i), load(m, up + i)));
    }
  }
}

// NeoX rotary: out [T, H, D] contiguous from x [T, H, D] (strides x_stride_t, x_stride_h, 1),
// cos/sin [T, D] contiguous: out = x * cos + concat(-x[D/2:], x[:D/2]) * sin.
void pagoda_rotary(const float* x, int64_t x_stride_t, int64_t x_stride_h, const float* cos_t,
                   const float* sin_t, float* out, int T, int H, int D, int threads) {
  const int half = D / 2;
#pragma omp parallel for num_threads(threads) if ((int64_t)T * H * D >= kParallelFloats)
  for (int t = 0; t < T; ++t) {
    const float* c = cos_t + (int64_t)t * D;
    const float* s = sin_t + (int64_t)t * D;
    for (int h = 0; h < H; ++h) {
      const float* xh = x + t * x_stride_t + h * x_stride_h;
      float* oh = out + ((int64_t)t * H + h) * D;
      for (int i = 0; i < half; i += kLanes) {
        const mask16 m = tail_mask(half - i);
        const f32x16 lo = load(m, xh + i);
        const f32x16 hi = load(m, xh + half + i);
        const f32x16 lo_out = fnmadd(hi, load(m, s + i), mul(lo, load(m, c + i)));
        const f32x16 hi_out = fmadd(lo, load(m, s + half + i), mul(hi, load(m, c + half + i)));
        store(oh + i, m, lo_out);
        store(oh + half + i, m, hi_out);
      }
    }
  }
}

// out[t] = the k[t]-th largest value of row t (top-k keeps the values >= it), or -inf where
// k[t] >= V (top-k off) or the row has fewer than k[t] values above -inf. Per row: a threshold
// with at least k values at or above it, bisected on vector passes that count them, then the
// values at or above it, a few more than k, through nth_element: 32 x 49,152 with k = 50 in
// 0.8 ms on 2 cores, where nth_element over whole rows took 4.9 and torch's sort 48.
void pagoda_kth_largest_rows(const float* x, int64_t x_stride, const int64_t* k, float* out,
                             int T, int V, int threads) {
#pragma omp parallel num_threads(threads) if ((int64_t)T * V >= kParallelFloats)
  {
    std::vector<float> kept(V);
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < T; ++t) {
      const float* row = x + t * x_stride;
      const int64_t want = std::max<int64_t>(k[t], 1);
      out[t] = -INFINITY;
      if (want >= V) continue;
      float lo, hi;
      finite_range(row, V, &lo, &hi);
      if (count_at_least(row, V, lo) < want) continue;
      for (int step = 0; step < 16 && lo < hi; ++step) {  // count(>= lo) >= want throughout
        const float mid = lo + (hi - lo) * 0.5f;
        if (mid <= lo || mid >= hi) break;
        (count_at_least(row, V, mid) >= want ? lo : hi) = mid;
      }
      const int n = compress_at_least(row, V, lo, kept.data());
      std::nth_element(kept.begin(), kept.begin() + (want - 1), kept.begin() + n,
                       std::greater<float>());
      out[t] = kept[want - 1];
    }
  }
}

// out[t] = the smallest probability top-p keeps in row t of p (0 where top_p[t] >= 1). Tokens
// below a threshold whose values at or above it hold top_p of the mass are all dropped, so
// the quickselect runs over those only: the threshold starts at (1 - top_p) / V of the row's
// mass (the values below it hold less than 1 - top_p) and rises by bisection on vector passes
// that sum the mass at or above it. 32 x 49,152 with top_p 0.9 in 1.1-1.5 ms on 2 cores (4.9
// where each row keeps some 20,000 tokens), where the quickselect over whole rows took 6.5 and
// torch's sort 48.
void pagoda_top_p_cutoff_rows(const float* p, int64_t p_stride, const float* top_p, float* out,
                              int T, int V, int threads) {
#pragma omp parallel num_threads(threads) if ((int64_t)T * V >= kParallelFloats)
  {
    std::vector<float> kept(V);
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < T; ++t) {
      const float* row = p + t * p_stride;
      out[t] = 0.0f;
      if (top_p[t] >= 1.0f) continue;
      // a margin for the float sums of the passes: the exact sum over the survivors decides
      const double goal = top_p[t] + 1e-5;
      float lo, hi;
      finite_range(row, V, &lo, &hi);
      lo = (float)((1.0 - top_p[t]) / V * mass_at_least(row, V, 0.0f));
      for (int step = 0; step < 16 && lo < hi && lo > 0.0f; ++step) {
        const float mid = sqrtf(lo * hi);  // the values span decades: bisect their logs
        if (mid <= lo || mid >= hi) break;
        (mass_at_least(row, V, mid) >= goal ? lo : hi) = mid;
      }
      int n = compress_at_least(row, V, lo, kept.data());
      float cutoff = top_p_select(kept.data(), n, top_p[t]);
      if (cutoff < 0.0f) {  // the float sums overshot: select over the whole row
        std::copy_n(row, V, kept.data());
        cutoff = top_p_select(kept.data(), V, top_p[t]);
      }
      out[t] = std::max(cutoff, 0.0f);
    }
  }
}

// out[t] = a token drawn from softmax(x[t] / temperature[t]) at uniform[t] in [0, 1): the first
// whose cumulative probability passes uniform[t] of the row's total (-inf logits have none).
// Two passes a row: the exponentials, stored, and the total by 16-value blocks in order; then
// the same running sums again up to the block that passes the target, and the tokens of that
// block one by one. 32 x 49,152 in 0.53 ms on 2 cores, where torch's division, softmax,
// cumsum and search took 5.1.
void pagoda_sample_rows(const float* x, int64_t x_stride, const float* temperature,
                        const float* uniform, int64_t* out, int T, int V, int threads) {
#pragma omp parallel num_threads(threads) if ((int64_t)T * V >= kParallelFloats)
  {
    std::vector<float> e(((size_t)V + kLanes - 1) / kLanes * kLanes);
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < T; ++t) {
      const float* row = x + t * x_stride;
      float lo, top;
      finite_range(row, V, &lo, &top);
      const f32x16 shift = set1(top), inv = set1(1.0f / temperature[t]);
      double total = 0.0;
      for (int i = 0; i < V; i += kLanes) {
        const mask16 m = tail_mask(V - i);
        const f32x16 v = load(m, row + i);
        const mask16 finite = greater(m, v, set1(-INFINITY));
        const f32x16 p = zero_unless(finite, pagoda::exp_ps(mul(sub(v, shift), inv)));
        store(&e[i], p);
        total += reduce_add(p);
      }
      const double target = uniform[t] * total;
      double run = 0.0;
      int64_t token = -1;
      for (int i = 0; i < V && token < 0; i += kLanes) {
        const double block = reduce_add(load(&e[i]));
        if (run + block <= target) {
          run += block;
          continue;
        }
        for (int j = i; j < std::min(i + kLanes, V) && token < 0; ++j) {
          run += e[j];
          if (e[j] > 0.0f && run > target) token = j;
        }
      }
      // sums in another order fell short of the target: the last token of nonzero probability
      for (int j = V - 1; token < 0 && j >= 0; --j)
        if (e[j] > 0.0f) token = j;
      out[t] = token;
    }
  }
}

}  // extern "C"
