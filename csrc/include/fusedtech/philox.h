// Counter-based Philox4x32-10, bit-identical to Triton's tl.randint4x(seed, offset) (triton/language/
// random.py: counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi)), so the CPU, CUDA and
// Triton dropout kernels draw the same mask from the same (seed, element index): element i takes
// word i % 4 of the block at counter i / 4, so one evaluation (ten rounds) serves four elements.
#pragma once

#include <cstdint>

#include "fusedtech/common.h"

namespace fusedtech {

FT_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// The four output words of one Philox4x32-10 block: Triton's tl.randint4x(seed, counter).
FT_HD void philox4(uint64_t seed, uint64_t counter, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t _c0 = c0, _c2 = c2;
    c0 = umulhi32(0xCD9E8D57u, _c2) ^ c1 ^ k0;
    c2 = umulhi32(0xD2511F53u, _c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * _c2;
    c3 = 0xD2511F53u * _c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Inverted dropout of one element given its draw: dropped when the draw falls below
// threshold = floor(p * 2^32).
FT_HD float dropout_keep(float x, uint32_t draw, uint32_t threshold, float scale) {
  return draw >= threshold ? x * scale : 0.0f;
}

}  // namespace fusedtech
