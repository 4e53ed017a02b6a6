// The AMX tile configuration that `_tile_loadconfig` reads (palette 1): per tile, its rows and
// the bytes of each row.
#pragma once
#include <stdint.h>

namespace pagoda {

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace pagoda
