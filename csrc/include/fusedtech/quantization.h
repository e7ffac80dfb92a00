// Blockwise quantization of optimizer states, shared by the CPU and CUDA kernels (the oracle is
// fusedtech/reference/quantization.py): value = table[code] * absmax of the code's block of
// kQuantBlock elements. Quantizing scales by 1 / max(absmax, 1e-38) and takes the nearest table entry,
// the lower one on a tie (the count of midpoints below the value); NaN compares below every midpoint.
#pragma once

#include <cstdint>

#include "fusedtech/common.h"

namespace fusedtech {

constexpr int64_t kQuantBlock = 256;

// 1 / absmax as the oracle forms it: a NaN absmax stays NaN (the block reads back NaN).
FT_HD float quant_inverse(float absmax) { return 1.0f / ft_max(absmax, 1e-38f); }

// The code of a scaled value: how many of the 2^BITS - 1 sorted midpoints lie below it. Branch-free:
// BITS comparisons at power-of-two strides.
template <int BITS>
FT_HD uint32_t quantize_code(float scaled, const float* __restrict midpoints) {
  uint32_t code = 0;
#pragma unroll
  for (uint32_t stride = 1u << (BITS - 1); stride > 0; stride >>= 1) {
    code += (midpoints[code + stride - 1] < scaled) ? stride : 0u;
  }
  return code;
}

// The same code with one table lookup instead of BITS dependent ones (the CPU kernels' path; the
// binary search above stays the definition). A scaled value falls in one bucket of its float bits:
// the sign, the exponent in kBucketExponents classes (|x| < 2^-24; the binades 2^-24 .. 2^-1;
// |x| >= 1, inf included) and the top kBucketMantissaBits mantissa bits. Where at most one midpoint
// falls inside every bucket (the 8-bit dynamic maps; checked when a table is built), a bucket's entry
// holds the code of its lowest value (bits 0-7) and the low 16 bits of the midpoint inside it (bits
// 8-23; the bucket fixes the others): the value is past that midpoint when its own low 16 bits are
// above them (below them for a negative value, whose magnitude grows with its bits). A bucket with
// no midpoint holds a bound its values never pass.
constexpr int kBucketMantissaBits = 7;  // 23 - 7 = 16: the compared bits are the low half-word
constexpr int kBucketExponents = 26;
constexpr int kBuckets = 2 * kBucketExponents << kBucketMantissaBits;

FT_HD uint32_t quant_bucket(uint32_t bits) {
  const uint32_t sign = bits >> 31;
  const int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu);  // biased: 127 is [1, 2)
  const int32_t c = e - 102;
  const uint32_t cls = static_cast<uint32_t>(c < 0 ? 0 : (c > 25 ? 25 : c));
  const uint32_t mantissa = (cls == 0u || cls == 25u) ? 0u : (bits >> 16) & ((1u << kBucketMantissaBits) - 1u);
  return ((sign * kBucketExponents + cls) << kBucketMantissaBits) | mantissa;
}

FT_HD uint32_t quantize_code_bucketed(float scaled, const int32_t* __restrict buckets) {
  uint32_t bits;
  __builtin_memcpy(&bits, &scaled, 4);
  const uint32_t entry = static_cast<uint32_t>(buckets[quant_bucket(bits)]);
  const uint32_t low = bits & 0xFFFFu, bound = entry >> 8;
  const uint32_t past = (bits >> 31) ? (low < bound) : (low > bound);
  return scaled != scaled ? 0u : (entry & 0xFFu) + past;  // NaN: code 0, as quantize_code gives it
}

FT_HD float dequantize_code(uint32_t code, const float* __restrict table, float absmax) {
  return table[code] * absmax;
}

// |x| folded into a NaN-propagating running maximum (a NaN element makes the block's absmax NaN).
FT_HD float absmax_update(float running, float x) { return ft_max(x < 0.0f ? -x : x, running); }

}  // namespace fusedtech
