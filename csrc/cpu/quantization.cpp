// Blockwise quantize / dequantize of a dense tensor on CPU: what loading a full-precision optimizer
// checkpoint into a quantized optimizer, and dequantize_state_dict, run; bit-exact with the oracle and
// with the optimizer kernels' own requantization.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>

#include "../checks.h"
#include "quantization.h"

namespace fusedtech::cpu {

namespace {

float from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

uint32_t to_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return bits;
}

std::unique_ptr<QuantTable> build(const float* values) {
  auto t = std::make_unique<QuantTable>();
  t->values.assign(values, values + 256);
  t->midpoints.resize(255);
  for (int i = 0; i < 255; ++i) t->midpoints[i] = (values[i] + values[i + 1]) / 2;
  // Per bucket: the lowest and highest code of its values, from the extremes of every run of bit
  // patterns it holds (codes grow with the value); usable if no bucket spans more than one midpoint.
  std::vector<int32_t> lo(kBuckets, std::numeric_limits<int32_t>::max()), hi(kBuckets, -1);
  constexpr uint32_t kRun = 1u << (23 - kBucketMantissaBits);
  for (uint32_t sign = 0; sign < 2; ++sign) {
    for (uint32_t e = 0; e < 256; ++e) {
      for (uint32_t m = 0; m < (1u << kBucketMantissaBits); ++m) {
        const uint32_t first = (sign << 31) | (e << 23) | (m * kRun);
        for (const uint32_t bits : {first, first | (kRun - 1u)}) {
          const float x = from_bits(bits);
          if (x != x) continue;  // NaN takes code 0 apart from the buckets
          const uint32_t b = quant_bucket(bits);
          const int32_t code = static_cast<int32_t>(quantize_code<8>(x, t->mids()));
          lo[b] = std::min(lo[b], code);
          hi[b] = std::max(hi[b], code);
        }
      }
    }
  }
  std::vector<int32_t> buckets(kBuckets);
  for (uint32_t b = 0; b < static_cast<uint32_t>(kBuckets); ++b) {
    const bool negative = b >= static_cast<uint32_t>(kBuckets / 2);
    uint32_t bound = negative ? 0u : 0xFFFFu;  // never passed
    if (hi[b] < 0) {
      lo[b] = 0;  // a bucket no float falls in
    } else if (hi[b] - lo[b] > 1) {
      return t;  // this table needs the binary search
    } else if (hi[b] == lo[b] + 1) {
      const uint32_t cls = (b >> kBucketMantissaBits) % kBucketExponents;
      if (cls == 0 || cls == kBucketExponents - 1) return t;  // a class of several exponents: one code only
      const uint32_t split = to_bits(t->midpoints[lo[b]]);
      if (quant_bucket(split) != b) return t;
      bound = split & 0xFFFFu;
    }
    buckets[b] = static_cast<int32_t>((bound << 8) | static_cast<uint32_t>(lo[b]));
  }
  t->buckets = std::move(buckets);
  return t;
}

}  // namespace

const QuantTable& quant_table(const at::Tensor& table) {
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.numel() == 256 && table.is_contiguous() &&
                  table.device().is_cpu(),
              "fusedtech: a quantization table must be a contiguous float32 CPU tensor of 256 values");
  static std::mutex mutex;
  static std::vector<std::unique_ptr<QuantTable>> tables;
  const float* values = table.const_data_ptr<float>();
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& t : tables) {
    if (std::memcmp(t->values.data(), values, 256 * sizeof(float)) == 0) return *t;
  }
  tables.push_back(build(values));
  return *tables.back();
}

namespace {

void check_table(const at::Tensor& table) {
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 1 && table.numel() == 256 &&
                  table.is_contiguous() && table.device().is_cpu(),
              "fusedtech: quantization table must be a contiguous float32 CPU tensor of 256 values, got ",
              table.scalar_type(), " of shape ", table.sizes(), " on ", table.device());
}

void check_block(int64_t block) {
  TORCH_CHECK(block == kQuantBlock, "fusedtech: quantization block must be ", kQuantBlock, ", got ", block);
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, const at::Tensor& table,
                                                          int64_t block) {
  check_table(table);
  check_block(block);
  TORCH_CHECK(x.device().is_cpu(), "fusedtech: quantize_blockwise (cpu) got x on ", x.device());
  TORCH_CHECK(x.numel() == 0 || x.is_non_overlapping_and_dense(), "fusedtech: quantize_blockwise x must be dense");
  const at::Tensor xf = x.to(at::kFloat);  // keeps x's strides: codes are written in its memory order
  at::Tensor codes = at::empty_like(x, x.options().dtype(at::kByte));
  const int64_t n = x.numel();
  const int64_t blocks = (n + block - 1) / block;
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  const QuantTable& q = quant_table(table);
  const float* src = xf.const_data_ptr<float>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t begin = b * block, end = std::min(n, begin + block);
      const float amax = block_absmax(src + begin, end - begin);
      quantize_run(src + begin, end - begin, quant_inverse(amax), dst + begin, q);
      am[b] = amax;
    }
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& table,
                                    int64_t block) {
  check_table(table);
  check_block(block);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "fusedtech: dequantize_blockwise codes must be uint8, got ",
              codes.scalar_type());
  TORCH_CHECK(codes.numel() == 0 || codes.is_non_overlapping_and_dense(),
              "fusedtech: dequantize_blockwise codes must be dense");
  const int64_t n = codes.numel();
  const int64_t blocks = (n + block - 1) / block;
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == blocks && absmax.is_contiguous(),
              "fusedtech: dequantize_blockwise absmax must be a contiguous float32 tensor of ", blocks,
              " values, got ", absmax.scalar_type(), " of shape ", absmax.sizes());
  TORCH_CHECK(codes.device().is_cpu() && absmax.device().is_cpu(), "fusedtech: dequantize_blockwise (cpu) got codes on ",
              codes.device(), " and absmax on ", absmax.device());
  at::Tensor out = at::empty_like(codes, codes.options().dtype(at::kFloat));
  const float* t = table.const_data_ptr<float>();
  const uint8_t* src = codes.const_data_ptr<uint8_t>();
  const float* am = absmax.const_data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, blocks, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t begin = b * block, end = std::min(n, begin + block);
      dequantize_run(src + begin, end - begin, am[b], t, dst + begin);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
}

}  // namespace fusedtech::cpu
