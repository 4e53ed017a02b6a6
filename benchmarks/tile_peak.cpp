// The AMX tiles' own bf16 peak on this CPU, for benchmarks/linear_bf16.py --tile-peak: each
// thread loads two A and two B tiles once, then runs `tdpbf16ps` into four C tiles (the
// kernel's 2 x 2 blocking) `iterations` times, nothing else. The tiles' speed can depend on
// the data, so the caller passes the values to load. The caller has the tile state granted
// to the process first (linear_bf16.kernel_amx).
#pragma GCC target("amx-tile,amx-bf16")
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "../kernels/csrc/amx_tiles.h"

extern "C" {

// Seconds that `threads` threads took for `iterations` rounds of four tile products each,
// with A and B tiles from `values` (2048 bf16: two 16 x 32 tiles, used for both).
double pagoda_tile_peak(const uint16_t* values, int64_t iterations, int threads) {
  const double start = omp_get_wtime();
#pragma omp parallel num_threads(threads)
  {
    pagoda::TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.colsb[t] = 64;
      config.rows[t] = 16;
    }
    // GCC does not count the configuration as read by ldtilecfg: without this it may drop
    // the stores that fill it in
    asm volatile("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
    _tile_loadd(4, values, 64);
    _tile_loadd(5, values + 512, 64);
    _tile_loadd(6, values + 1024, 64);
    _tile_loadd(7, values + 1536, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t i = 0; i < iterations; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_release();
  }
  return omp_get_wtime() - start;
}

}  // extern "C"
