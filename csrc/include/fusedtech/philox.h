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

// One Philox4x32 round on the counter words (c0..c3) with the round's key (k0, k1).
FT_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint32_t _c0 = c0, _c2 = c2;
  c0 = umulhi32(0xCD9E8D57u, _c2) ^ c1 ^ k0;
  c2 = umulhi32(0xD2511F53u, _c0) ^ c3 ^ k1;
  c1 = 0xCD9E8D57u * _c2;
  c3 = 0xD2511F53u * _c0;
}

// The four output words of one Philox4x32-10 block: Triton's tl.randint4x(seed, counter), or with the
// upper counter words c2, c3 (zero there) tl.philox(seed, counter_lo, counter_hi, c2, c3): the
// stochastic rounding of the optimizers keys its draws by (element / 4, step, tensor) that way.
FT_HD void philox4(uint64_t seed, uint64_t counter, uint32_t out[4], uint32_t c2 = 0, uint32_t c3 = 0) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The draws of elements [first, first + count) into out (CPU): the same words as philox4, with
// eight blocks evaluated side by side in lanes the compiler vectorises (one block at a time was
// most of a CPU dropout's time).
inline void philox_draws(uint64_t seed, int64_t first, int64_t count, uint32_t* out, uint32_t upper2 = 0,
                         uint32_t upper3 = 0) {
  constexpr int kBlocks = 8;
  const int64_t end = first + count;
  for (int64_t base = first / 4; base * 4 < end; base += kBlocks) {
    uint32_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
    for (int l = 0; l < kBlocks; ++l) {
      const uint64_t counter = static_cast<uint64_t>(base + l);
      c0[l] = static_cast<uint32_t>(counter);
      c1[l] = static_cast<uint32_t>(counter >> 32);
      c2[l] = upper2;
      c3[l] = upper3;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < kBlocks; ++l) philox_round(c0[l], c1[l], c2[l], c3[l], k0, k1);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int l = 0; l < kBlocks; ++l) {
      const uint32_t words[4] = {c0[l], c1[l], c2[l], c3[l]};
      for (int w = 0; w < 4; ++w) {
        const int64_t i = (base + l) * 4 + w;
        if (i >= first && i < end) out[i - first] = words[w];
      }
    }
  }
}

// fp32 -> bf16 bits rounded stochastically: 16 random bits added below the kept ones, then truncated,
// so x rounds up with probability (its distance from the bf16 below) / (the gap): unbiased. NaN stays
// a quiet NaN; a value within a gap of the largest bf16 may round to inf, as it would upwards.
FT_HD uint16_t bf16_bits_stochastic(float x, uint32_t draw) {
  uint32_t bits;
  __builtin_memcpy(&bits, &x, 4);
  return static_cast<uint16_t>(x != x ? ((bits >> 16) | 0x40u) : ((bits + (draw >> 16)) >> 16));
}

// Inverted dropout of one element given its draw: dropped when the draw falls below
// threshold = floor(p * 2^32). A is the math type: float, double for double inputs (as torch's).
// A product with the mask, not a select, as torch's input * mask / (1 - p): a dropped NaN or inf
// stays NaN (0 * inf), forward and backward.
template <typename A>
FT_HD A dropout_keep(A x, uint32_t draw, uint32_t threshold, A scale) {
  return x * (draw >= threshold ? scale : A(0));
}

// The scale 1 / (1 - p) in the math type (rounded once, from double).
template <typename A>
inline A dropout_scale(double p) {
  return static_cast<A>(1.0 / (1.0 - p));
}

}  // namespace fusedtech
