// The bitmap format's mask words, shared by sparse_kernels.cpp and decode_engine.cpp.
#pragma once

#include <cstdint>
#include <cstring>

namespace ipu_sparse_csrc {

// Little-endian read of up to 8 mask bytes (fewer at the end of a row): bit j <=> column 8 * byte + j.
inline uint64_t load_bits(const uint8_t* p, int64_t nbytes) {
  uint64_t w = 0;
  if (nbytes >= 8) {
    std::memcpy(&w, p, 8);
  } else {
    for (int64_t i = 0; i < nbytes; ++i) w |= uint64_t(p[i]) << (8 * i);
  }
  return w;
}

}  // namespace ipu_sparse_csrc
