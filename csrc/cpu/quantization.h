// CPU side of the quantized states: the lookup arrays a 256-entry table needs, built once per table.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "fusedtech/quantization.h"

namespace fusedtech::cpu {

struct QuantTable {
  std::vector<float> values;            // the table itself (256)
  std::vector<float> midpoints;  // 255
  std::vector<int32_t> buckets;  // kBuckets entries (quantize_code_bucketed); empty if the table allows none
  const float* mids() const { return midpoints.data(); }
  bool bucketed() const { return !buckets.empty(); }
};

// The arrays of `table` (256 sorted float32 values on the CPU), cached by content: built on first use.
const QuantTable& quant_table(const at::Tensor& table);

// The block loops of the quantized kernels, with AVX-512 where the build has it (GCC vectorises none
// of them: each needs gathers); every path gives the scalar functions' bits.

// The absmax of values[0..count): NaN-propagating (absmax_update), so order-independent.
inline float block_absmax(const float* values, int64_t count) {
  float amax = 0.0f;
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 running = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (; k + 16 <= count; k += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(values + k));
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    running = _mm512_max_ps(running, a);
  }
  amax = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(running);
#endif
  for (; k < count; ++k) amax = absmax_update(amax, values[k]);
  return amax;
}

// codes[k] = the code of values[k] * inverse (quantize_code<8>'s).
inline void quantize_run(const float* values, int64_t count, float inverse, uint8_t* codes, const QuantTable& q) {
  int64_t k = 0;
  if (!q.bucketed()) {
    for (; k < count; ++k) codes[k] = static_cast<uint8_t>(quantize_code<8>(values[k] * inverse, q.mids()));
    return;
  }
  const int32_t* buckets = q.buckets.data();
#if defined(__AVX512F__)
  const __m512 vinverse = _mm512_set1_ps(inverse);
  const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(25);
  const __m512i low_mask = _mm512_set1_epi32(0xFFFF);
  for (; k + 16 <= count; k += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(values + k), vinverse);
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i e = _mm512_and_si512(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(0xFF));
    const __m512i cls = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(102)), zero), top);
    const __mmask16 edge = _mm512_cmpeq_epi32_mask(cls, zero) | _mm512_cmpeq_epi32_mask(cls, top);
    const __m512i mantissa = _mm512_maskz_and_epi32(static_cast<__mmask16>(~edge), _mm512_srli_epi32(bits, 16),
                                                    _mm512_set1_epi32((1 << kBucketMantissaBits) - 1));
    const __m512i sign = _mm512_srli_epi32(bits, 31);
    const __m512i bucket = _mm512_or_si512(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_mullo_epi32(sign, _mm512_set1_epi32(kBucketExponents)), cls),
                          kBucketMantissaBits),
        mantissa);
    const __m512i entry = _mm512_i32gather_epi32(bucket, buckets, 4);
    const __m512i low = _mm512_and_si512(bits, low_mask), bound = _mm512_srli_epi32(entry, 8);
    const __mmask16 negative = _mm512_test_epi32_mask(sign, sign);
    const __mmask16 past = (_mm512_cmpgt_epu32_mask(low, bound) & static_cast<__mmask16>(~negative)) |
                           (_mm512_cmplt_epu32_mask(low, bound) & negative);
    __m512i code = _mm512_and_si512(entry, _mm512_set1_epi32(0xFF));
    code = _mm512_mask_add_epi32(code, past, code, one);
    code = _mm512_mask_mov_epi32(code, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), zero);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtepi32_epi8(code));
  }
#endif
  for (; k < count; ++k) codes[k] = static_cast<uint8_t>(quantize_code_bucketed(values[k] * inverse, buckets));
}

// out[k] = table[codes[k]] * absmax.
inline void dequantize_run(const uint8_t* codes, int64_t count, float absmax, const float* table, float* out) {
  int64_t k = 0;
#if defined(__AVX512F__)
  // The table held in 16 registers: each 32-entry slice looked up by the code's low 5 bits
  // (permutex2var), the slice picked by its top 3 bits; no memory access per element.
  __m512 t[16];
  for (int r = 0; r < 16; ++r) t[r] = _mm512_loadu_ps(table + 16 * r);
  const __m512 scale = _mm512_set1_ps(absmax);
  for (; k + 16 <= count; k += 16) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k)));
    const __mmask16 b5 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(128));
    __m512 slice[4];
    for (int q = 0; q < 4; ++q) {
      slice[q] = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(t[4 * q], c, t[4 * q + 1]),
                                      _mm512_permutex2var_ps(t[4 * q + 2], c, t[4 * q + 3]));
    }
    const __m512 value = _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, slice[0], slice[1]),
                                              _mm512_mask_blend_ps(b6, slice[2], slice[3]));
    _mm512_storeu_ps(out + k, _mm512_mul_ps(value, scale));
  }
#endif
  for (; k < count; ++k) out[k] = dequantize_code(codes[k], table, absmax);
}

}  // namespace fusedtech::cpu
