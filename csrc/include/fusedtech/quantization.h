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

FT_HD float dequantize_code(uint32_t code, const float* __restrict table, float absmax) {
  return table[code] * absmax;
}

// |x| folded into a NaN-propagating running maximum (a NaN element makes the block's absmax NaN).
FT_HD float absmax_update(float running, float x) { return ft_max(x < 0.0f ? -x : x, running); }

}  // namespace fusedtech
