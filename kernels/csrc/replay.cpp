// A CPU graph's kernel calls (engine/cpu_graphs.py) run back to back from C: one ctypes call a
// decode step instead of one per kernel. A ctypes call costs about 1.5 us, and a batch-1 step
// of SmolLM2-135M makes 300, during which no weights stream.
//
// Every kernel takes integer-class arguments (pointers, int64, int32) and floats only. The
// x86-64 System V convention hands each class its registers, then stack slots, in the order
// of that class's arguments alone: ints to rdi, rsi, rdx, rcx, r8, r9, then the stack; floats
// to xmm0-7. So one function type with kInts ints and kFloats floats reaches every kernel with
// no more of either: the callee reads the arguments it declares (an int32 is the low half of
// its 64-bit slot) and the caller pops the stack slots it does not read.
#include <stdint.h>

#include <chrono>

#if !defined(__x86_64__) || defined(_WIN32)
#error "replay.cpp relies on the x86-64 System V calling convention"
#endif

namespace {

constexpr int kInts = 16;
constexpr int kFloats = 2;

struct Call {
  void* function;
  int64_t ints[kInts];  // the integer-class arguments in order, zero past the callee's
  float floats[kFloats];
};

using AnyKernel = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, float, float);
static_assert(kInts == 16 && kFloats == 2, "AnyKernel spells out kInts ints and kFloats floats");

}  // namespace

extern "C" {

int pagoda_replay_ints() { return kInts; }
int pagoda_replay_floats() { return kFloats; }

void pagoda_replay(const Call* calls, int count) {
  for (int c = 0; c < count; ++c) {
    const int64_t* i = calls[c].ints;
    const float* f = calls[c].floats;
    reinterpret_cast<AnyKernel>(calls[c].function)(i[0], i[1], i[2], i[3], i[4], i[5], i[6], i[7],
                                                   i[8], i[9], i[10], i[11], i[12], i[13], i[14],
                                                   i[15], f[0], f[1]);
  }
}

// The same, each call's seconds into seconds[c]: benchmarks/profile_decode.py's split of a
// step by kernel.
void pagoda_replay_timed(const Call* calls, int count, double* seconds) {
  for (int c = 0; c < count; ++c) {
    const auto start = std::chrono::steady_clock::now();
    pagoda_replay(calls + c, 1);
    seconds[c] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
}

}  // extern "C"
