// Runs pagoda's CPU kernels on fixed pseudo-random inputs and prints every output (and the
// inputs of the AVX-512-only kernels) as hex records: "R <name> <bytes> <hex>". Built once for
// AVX2 (run natively) and once for AVX-512 (run under an emulator); a script compares them.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <unistd.h>

#include <string>
#include <vector>

extern "C" {
void pagoda_write_kv_cache(const float*, int64_t, const float*, int64_t, float*, float*,
                           const int64_t*, int, int);
void pagoda_write_kv_cache_bf16(const float*, int64_t, const float*, int64_t, uint16_t*,
                                uint16_t*, const int64_t*, int, int);
void pagoda_paged_attention(const float*, int64_t, const float*, const float*, const int32_t*,
                            int64_t, const int32_t*, const int32_t*, float*, int, int, int, int,
                            int, float, int, int);
void pagoda_paged_attention_bf16(const float*, int64_t, const uint16_t*, const uint16_t*,
                                 const int32_t*, int64_t, const int32_t*, const int32_t*, float*,
                                 int, int, int, int, int, float, int, int);
void pagoda_add_layer_norm_bf16(const uint16_t*, const uint16_t*, const uint16_t*,
                                const uint16_t*, uint16_t*, int, int, float, int);
void pagoda_argmax_rows(const float*, int64_t, int64_t*, int, int, int);
void pagoda_rms_norm(const float*, int64_t, const float*, const float*, float*, float*, int, int,
                     float, int);
void pagoda_silu_and_mul(const float*, int64_t, float*, int, int, int);
void pagoda_rotary(const float*, int64_t, int64_t, const float*, const float*, float*, int, int,
                   int, int);
void pagoda_kth_largest_rows(const float*, int64_t, const int64_t*, float*, int, int, int);
void pagoda_top_p_cutoff_rows(const float*, int64_t, const float*, float*, int, int, int);
void pagoda_sample_rows(const float*, int64_t, const float*, const float*, int64_t*, int, int,
                        int);
int64_t pagoda_packed_size(int, int);
void pagoda_pack_weight(const float*, float*, int, int);
void pagoda_pack_weight_bf16(const float*, uint16_t*, int, int);
void pagoda_linear(const float*, int64_t, const float*, const float*, float*, int64_t, int, int,
                   int, int);
void pagoda_linear_bf16_weights(const float*, int64_t, const uint16_t*, const float*, float*,
                                int64_t, int, int, int, int);
// AVX-512 only (weak: absent from the AVX2 build)
__attribute__((weak)) int pagoda_bf16_enable_amx();
__attribute__((weak)) int64_t pagoda_bf16_packed_size(int, int);
__attribute__((weak)) void pagoda_bf16_pack_weight(const uint16_t*, uint16_t*, int, int);
__attribute__((weak)) void pagoda_bf16_linear(const void*, int64_t, int, const uint16_t*,
                                              const float*, float*, int64_t, int, int, int, int,
                                              int);
__attribute__((weak)) void pagoda_bf16_linear_silu_mul(const void*, int64_t, int,
                                                       const uint16_t*, uint16_t*, int64_t, int,
                                                       int, int, int);
__attribute__((weak)) void pagoda_packed_attention_bf16(const uint16_t*, int64_t,
                                                        const uint16_t*, int64_t,
                                                        const uint16_t*, int64_t, uint16_t*,
                                                        const int32_t*, int, int, int, int,
                                                        float, int);
__attribute__((weak)) void pagoda_prefill_attention_amx(const float*, int64_t, const uint16_t*,
                                                        const uint16_t*, const int32_t*, int64_t,
                                                        const int32_t*, const int32_t*, float*,
                                                        int, int, int, int, int, float, int,
                                                        int);
}

namespace {

uint64_t state = 0x9E3779B97F4A7C15ull;
uint64_t next_u64() {  // splitmix64
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
float uniform() { return (float)((next_u64() >> 40) * (1.0 / 16777216.0)); }  // [0, 1)
std::vector<float> randf(size_t n, float scale = 1.0f) {
  std::vector<float> v(n);
  for (float& x : v) x = (2.0f * uniform() - 1.0f) * scale;
  return v;
}
uint16_t bf16(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  return (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}
std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16(v[i]);
  return out;
}

void emit(const std::string& name, const void* data, size_t bytes) {
  static const char* digits = "0123456789abcdef";
  std::string line = "R " + name + " " + std::to_string(bytes) + " ";
  const uint8_t* p = (const uint8_t*)data;
  for (size_t i = 0; i < bytes; ++i) {
    line += digits[p[i] >> 4];
    line += digits[p[i] & 15];
  }
  line += "\n";
  fputs(line.c_str(), stdout);
}
uint64_t fnv1a(const void* data, size_t bytes) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < bytes; ++i) h = (h ^ ((const uint8_t*)data)[i]) * 1099511628211ull;
  return h;
}
void emit_hash(const std::string& name, const void* data, size_t bytes) {
  const uint64_t h = fnv1a(data, bytes);
  emit(name + "#fnv", &h, sizeof(h));
}
template <class T>
void emit(const std::string& name, const std::vector<T>& v) {
  emit(name, v.data(), v.size() * sizeof(T));
}

// 64-byte aligned storage, as the engine's tensors are
template <class T>
T* aligned(size_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, 64, (n + 64) * sizeof(T))) abort();
  memset(p, 0, (n + 64) * sizeof(T));
  return (T*)p;
}

void linears() {
  const int shapes[][4] = {{1, 576, 576, 0}, {4, 64, 576, 1},  {17, 100, 37, 1},
                           {32, 256, 576, 0}, {5, 49, 130, 1}, {13, 33, 8, 1}};
  for (auto& s : shapes) {
    const int M = s[0], N = s[1], K = s[2], has_bias = s[3], ldx = K + 3, ldy = N + 1;
    const std::string tag = std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K);
    std::vector<float> w = randf((size_t)N * K, 0.1f), x = randf((size_t)M * ldx),
                       bias = randf(N);
    float* packed = aligned<float>(pagoda_packed_size(N, K));
    uint16_t* packed16 = aligned<uint16_t>(pagoda_packed_size(N, K));
    pagoda_pack_weight(w.data(), packed, N, K);
    pagoda_pack_weight_bf16(w.data(), packed16, N, K);
    for (int threads : {1, 2}) {
      std::vector<float> y((size_t)M * ldy, -7.0f), y16((size_t)M * ldy, -7.0f);
      pagoda_linear(x.data(), ldx, packed, has_bias ? bias.data() : nullptr, y.data(), ldy, M, N,
                    K, threads);
      pagoda_linear_bf16_weights(x.data(), ldx, packed16, has_bias ? bias.data() : nullptr,
                                 y16.data(), ldy, M, N, K, threads);
      if (threads == 1) {
        emit("linear/" + tag, y);
        emit("linear_bf16w/" + tag, y16);
      }
      emit_hash("linear/" + tag + "/t" + std::to_string(threads), y.data(), y.size() * 4);
      emit_hash("linear_bf16w/" + tag + "/t" + std::to_string(threads), y16.data(), y16.size() * 4);
    }
    free(packed);
    free(packed16);
  }
}

struct AttnShape {
  int heads, kv_heads, dim, block;
};

void attention() {
  const AttnShape shapes[] = {{9, 3, 64, 16}, {4, 4, 32, 16}, {2, 1, 128, 32}};
  const int seq_lens[] = {1, 37, 150, 16};
  const int prefill_queries[] = {1, 5, 20, 16};
  for (const AttnShape& a : shapes) {
    const int B = 4, row = a.kv_heads * a.dim, max_blocks = 160 / a.block + 1;
    const int num_blocks = B * max_blocks + 3;
    const std::string tag = std::to_string(a.heads) + "h" + std::to_string(a.kv_heads) + "kv" +
                            std::to_string(a.dim) + "d" + std::to_string(a.block) + "b";
    // block tables: a shuffled permutation of the blocks
    std::vector<int32_t> perm(num_blocks), tables((size_t)B * max_blocks, 0);
    for (int i = 0; i < num_blocks; ++i) perm[i] = i;
    for (int i = num_blocks - 1; i > 0; --i) std::swap(perm[i], perm[next_u64() % (i + 1)]);
    for (int i = 0; i < B * max_blocks; ++i) tables[i] = perm[i];
    // every sequence's whole context into the caches, through the write kernels
    std::vector<int64_t> slots;
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < seq_lens[b]; ++t)
        slots.push_back((int64_t)tables[b * max_blocks + t / a.block] * a.block + t % a.block);
    slots.push_back(-1);  // a padding row, skipped
    const int T = (int)slots.size(), kv_stride = row + 5;
    std::vector<float> k = randf((size_t)T * kv_stride), v = randf((size_t)T * kv_stride);
    const size_t cache = (size_t)num_blocks * a.block * row;
    float* kc = aligned<float>(cache);
    float* vc = aligned<float>(cache);
    uint16_t* kc16 = aligned<uint16_t>(cache);
    uint16_t* vc16 = aligned<uint16_t>(cache);
    pagoda_write_kv_cache(k.data(), kv_stride, v.data(), kv_stride, kc, vc, slots.data(), T, row);
    pagoda_write_kv_cache_bf16(k.data(), kv_stride, v.data(), kv_stride, kc16, vc16, slots.data(),
                               T, row);
    emit_hash("kv_bf16/" + tag, kc16, cache * 2);
    const float scale = 1.0f / sqrtf((float)a.dim);
    for (int prefill : {0, 1}) {
      std::vector<int32_t> starts(B + 1, 0), lens(seq_lens, seq_lens + B);
      for (int b = 0; b < B; ++b) starts[b + 1] = starts[b] + (prefill ? prefill_queries[b] : 1);
      const int Q = starts[B], q_stride = a.heads * a.dim + 3;
      std::vector<float> q = randf((size_t)Q * q_stride);
      for (int threads : {1, 2}) {
        const std::string base = tag + (prefill ? "/prefill" : "/decode");
        const std::string name = threads == 1 ? base : base + "/t" + std::to_string(threads);
        std::vector<float> out((size_t)Q * a.heads * a.dim, -7.0f), out16 = out;
        pagoda_paged_attention(q.data(), q_stride, kc, vc, tables.data(), max_blocks,
                               starts.data(), lens.data(), out.data(), B, a.heads, a.kv_heads,
                               a.dim, a.block, scale, 1 << 30, threads);
        pagoda_paged_attention_bf16(q.data(), q_stride, kc16, vc16, tables.data(), max_blocks,
                                    starts.data(), lens.data(), out16.data(), B, a.heads,
                                    a.kv_heads, a.dim, a.block, scale, 1 << 30, threads);
        if (threads == 1) {
          emit("attention/" + name, out);
          emit("attention_bf16/" + name, out16);
        }
        emit_hash("attention/" + name, out.data(), out.size() * 4);
        emit_hash("attention_bf16/" + name, out16.data(), out16.size() * 4);
        if (pagoda_prefill_attention_amx && getenv("PAGODA_ISA_AMX")) {
          std::vector<float> q16(q.size()), ref((size_t)Q * a.heads * a.dim, -7.0f);
          for (size_t i = 0; i < q.size(); ++i) {
            const uint32_t b = (uint32_t)bf16(q[i]) << 16;
            memcpy(&q16[i], &b, 4);
          }
          pagoda_paged_attention_bf16(q16.data(), q_stride, kc16, vc16, tables.data(), max_blocks,
                                      starts.data(), lens.data(), ref.data(), B, a.heads,
                                      a.kv_heads, a.dim, a.block, scale, 1 << 30, 1);
          if (threads == 1) emit("prefill_amx_ref/" + base, ref);
          std::vector<float> amx((size_t)Q * a.heads * a.dim, -7.0f);
          pagoda_prefill_attention_amx(q.data(), q_stride, kc16, vc16, tables.data(), max_blocks,
                                       starts.data(), lens.data(), amx.data(), B, a.heads,
                                       a.kv_heads, a.dim, a.block, scale, 1 << 30, threads);
          emit("prefill_amx/" + name, amx);
        }
      }
    }
    free(kc);
    free(vc);
    free(kc16);
    free(vc16);
  }
}

void elementwise() {
  {  // argmax: ties, a NaN row, a row of -inf
    const int T = 4, V = 1000, stride = V + 7;
    std::vector<float> x = randf((size_t)T * stride);
    x[1 * stride + 10] = x[1 * stride + 900] = 5.0f;
    x[2 * stride + 500] = NAN;
    for (int i = 0; i < V; ++i) x[3 * stride + i] = -INFINITY;
    std::vector<int64_t> out(T, -1);
    pagoda_argmax_rows(x.data(), stride, out.data(), T, V, 1);
    emit("argmax", out);
  }
  for (int H : {576, 37}) {
    const int T = 3, stride = H + 9;
    std::vector<float> x = randf((size_t)T * stride), res = randf((size_t)T * H),
                       w = randf(H);
    std::vector<float> out((size_t)T * H), nres((size_t)T * H), out2((size_t)T * H);
    pagoda_rms_norm(x.data(), stride, res.data(), w.data(), out.data(), nres.data(), T, H, 1e-5f,
                    1);
    pagoda_rms_norm(x.data(), stride, nullptr, w.data(), out2.data(), nullptr, T, H, 1e-5f, 1);
    emit("rms_norm/" + std::to_string(H), out);
    emit("rms_norm_residual/" + std::to_string(H), nres);
    emit("rms_norm_plain/" + std::to_string(H), out2);
  }
  for (int I : {1536, 23}) {
    const int T = 3, stride = 2 * I + 5;
    std::vector<float> x = randf((size_t)T * stride, 6.0f), out((size_t)T * I);
    pagoda_silu_and_mul(x.data(), stride, out.data(), T, I, 1);
    emit("silu_mul/" + std::to_string(I), out);
  }
  {
    const int T = 3, H = 9, D = 64, sh = D + 2, st = H * sh + 1;
    std::vector<float> x = randf((size_t)T * st), c = randf((size_t)T * D),
                       s = randf((size_t)T * D), out((size_t)T * H * D);
    pagoda_rotary(x.data(), st, sh, c.data(), s.data(), out.data(), T, H, D, 1);
    emit("rotary", out);
  }
  {
    const int T = 4, V = 5000, stride = V + 3;
    std::vector<float> x = randf((size_t)T * stride, 8.0f), kth(T), cut(T);
    std::vector<int64_t> k = {1, 50, 5000, 7}, sampled(T, -1);
    pagoda_kth_largest_rows(x.data(), stride, k.data(), kth.data(), T, V, 1);
    emit("kth_largest", kth);
    std::vector<float> p((size_t)T * stride, 0.0f);
    for (int t = 0; t < T; ++t) {
      double sum = 0;
      for (int i = 0; i < V; ++i) sum += exp(x[(size_t)t * stride + i]);
      for (int i = 0; i < V; ++i) p[(size_t)t * stride + i] = exp(x[(size_t)t * stride + i]) / sum;
    }
    std::vector<float> top_p = {0.9f, 1.0f, 0.5f, 0.0f};
    pagoda_top_p_cutoff_rows(p.data(), stride, top_p.data(), cut.data(), T, V, 1);
    emit("top_p_cutoff", cut);
    std::vector<float> temperature = {1.0f, 0.7f, 1.5f, 0.3f}, u = {0.3f, 0.999f, 0.0f, 0.62f};
    pagoda_sample_rows(x.data(), stride, temperature.data(), u.data(), sampled.data(), T, V, 1);
    emit("sample", sampled);
  }
  for (int H : {576, 37}) {
    const int T = 3;
    std::vector<uint16_t> x = to_bf16(randf((size_t)T * H, 4.0f)),
                          r = to_bf16(randf((size_t)T * H)),
                          w = to_bf16(randf(H)), b = to_bf16(randf(H));
    std::vector<uint16_t> out((size_t)T * H), out2((size_t)T * H);
    pagoda_add_layer_norm_bf16(x.data(), r.data(), w.data(), b.data(), out.data(), T, H, 1e-5f, 1);
    pagoda_add_layer_norm_bf16(x.data(), nullptr, nullptr, nullptr, out2.data(), T, H, 1e-5f, 1);
    emit("layer_norm_bf16/" + std::to_string(H), out);
    emit("layer_norm_bf16_plain/" + std::to_string(H), out2);
  }
}

// the kernels that run on AMX tiles alone
void amx_only() {
  {  // the MLP's gate_up linear with silu(gate) * up, gate and up rows interleaved 16 by 16
    const int M = 5, I = 96, K = 576, N = 2 * I;
    std::vector<uint16_t> gate = to_bf16(randf((size_t)I * K, 0.1f)),
                          up = to_bf16(randf((size_t)I * K, 0.1f)), w((size_t)N * K);
    for (int n = 0; n < N; ++n) {
      const int block = n / 32, j = n % 32, row = block * 16 + j % 16;
      const std::vector<uint16_t>& src = j < 16 ? gate : up;
      memcpy(&w[(size_t)n * K], &src[(size_t)row * K], K * 2);
    }
    std::vector<float> x = randf((size_t)M * K);
    uint16_t* packed = aligned<uint16_t>(pagoda_bf16_packed_size(N, K));
    pagoda_bf16_pack_weight(w.data(), packed, N, K);
    std::vector<uint16_t> out((size_t)M * I, 0xFFFF);
    pagoda_bf16_linear_silu_mul(x.data(), K, 0, packed, out.data(), I, M, N, K, 2);
    // the unfused path, as tests/test_linear_bf16_gemv.py checks it: the plain linear over
    // [gate; up], silu_and_mul, rounded to bf16; the fused kernel must give the same bits
    std::vector<uint16_t> plain_w((size_t)N * K);
    memcpy(plain_w.data(), gate.data(), (size_t)I * K * 2);
    memcpy(plain_w.data() + (size_t)I * K, up.data(), (size_t)I * K * 2);
    uint16_t* plain = aligned<uint16_t>(pagoda_bf16_packed_size(N, K));
    pagoda_bf16_pack_weight(plain_w.data(), plain, N, K);
    std::vector<float> y((size_t)M * N), act((size_t)M * I);
    pagoda_bf16_linear(x.data(), K, 0, plain, nullptr, y.data(), N, M, N, K, 2, 1);
    pagoda_silu_and_mul(y.data(), N, act.data(), M, I, 1);
    emit("silu_mul_unfused", to_bf16(act));
    free(plain);
    emit("silu_mul_in/gate", gate);
    emit("silu_mul_in/up", up);
    emit("silu_mul_in/x", x);
    emit("silu_mul_amx", out);
    free(packed);
  }
  {  // packed-run bidirectional attention (encoders)
    const int lengths[] = {1, 15, 16, 17, 33, 5, 70};
    const int heads = 8, kv_heads = 2, dim = 64, S = 7;
    std::vector<int32_t> cu(S + 1, 0);
    for (int s = 0; s < S; ++s) cu[s + 1] = cu[s] + lengths[s];
    const int T = cu[S], stride = (heads + 2 * kv_heads) * dim;
    std::vector<uint16_t> fused = to_bf16(randf((size_t)T * stride, 2.0f));
    std::vector<uint16_t> out((size_t)T * heads * dim, 0xFFFF);
    pagoda_packed_attention_bf16(fused.data(), stride, fused.data() + heads * dim, stride,
                                 fused.data() + (heads + kv_heads) * dim, stride, out.data(),
                                 cu.data(), S, heads, kv_heads, dim, 1.0f / sqrtf((float)dim), 2);
    emit("packed_in/fused", fused);
    emit("packed_in/cu", cu);
    emit("packed_attention_amx", out);
  }
}

// whether this shape's inputs were printed already (by the other unit's pass)
bool emitted_inputs(const std::string& tag) {
  static std::vector<std::string> seen;
  for (const std::string& s : seen)
    if (s == tag) return true;
  seen.push_back(tag);
  return false;
}

// the bf16 linear kernel (AVX-512 only): inputs too, for a torch reference
void bf16_linears(bool amx) {
  const int shapes[][3] = {{1, 576, 576}, {2, 100, 64}, {3, 64, 37}, {4, 512, 576},
                           {17, 96, 576}, {33, 576, 130}};
  for (auto& s : shapes) {
    const int M = s[0], N = s[1], K = s[2], ldx = K + 4, ldy = N + 2;
    if (!amx && M > 4) continue;
    const std::string tag = std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K);
    state = 1000003ull * (M * 65536 + N) + K;  // the same inputs for both units
    std::vector<uint16_t> w = to_bf16(randf((size_t)N * K, 0.1f));
    std::vector<float> x = randf((size_t)M * ldx), bias = randf(N);
    std::vector<uint16_t> x16 = to_bf16(x);
    uint16_t* packed = aligned<uint16_t>(pagoda_bf16_packed_size(N, K));
    pagoda_bf16_pack_weight(w.data(), packed, N, K);
    const std::string unit = amx ? "amx" : "avx512bf16";
    if (!emitted_inputs(tag)) {
      emit("bf16_in/" + tag + "/w", w);
      emit("bf16_in/" + tag + "/x", x);
      emit("bf16_in/" + tag + "/bias", bias);
    }
    for (int x_bf16 : {0, 1}) {
      std::vector<float> y((size_t)M * ldy, -7.0f);
      pagoda_bf16_linear(x_bf16 ? (const void*)x16.data() : (const void*)x.data(), ldx, x_bf16,
                         packed, bias.data(), y.data(), ldy, M, N, K, 2, amx);
      emit("bf16_linear/" + unit + "/" + tag + "/xbf16_" + std::to_string(x_bf16), y);
    }
    free(packed);
  }
}

}  // namespace

int main() {
  linears();
  attention();
  elementwise();
  if (pagoda_bf16_linear && __builtin_cpu_supports("avx512bf16")) {
    bf16_linears(false);
    // PAGODA_ISA_AMX=force: the tiles without asking Linux (an emulator that grants them)
    const char* amx = getenv("PAGODA_ISA_AMX");
    if (amx && (!strcmp(amx, "force") || pagoda_bf16_enable_amx())) {
      bf16_linears(true);
      amx_only();
    }
  }
  puts("ISA_CHECK_DONE");
  fflush(stdout);
  if (getpid() == 1) {  // the emulated machine's init: let the console drain, power it off
    sync();
    sleep(5);
    reboot(RB_POWER_OFF);
  }
  return 0;
}
