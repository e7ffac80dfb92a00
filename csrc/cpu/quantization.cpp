// Blockwise quantize / dequantize of a dense tensor on CPU: what loading a full-precision optimizer
// checkpoint into a quantized optimizer, and dequantize_state_dict, run; bit-exact with the oracle and
// with the optimizer kernels' own requantization.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "fusedtech/quantization.h"

namespace fusedtech::cpu {
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
  const at::Tensor mids = (table.slice(0, 0, 255) + table.slice(0, 1, 256)) / 2;
  const float* m = mids.const_data_ptr<float>();
  const float* src = xf.const_data_ptr<float>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t begin = b * block, end = std::min(n, begin + block);
      float amax = 0.0f;
      for (int64_t i = begin; i < end; ++i) amax = absmax_update(amax, src[i]);
      const float inverse = quant_inverse(amax);
      for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<uint8_t>(quantize_code<8>(src[i] * inverse, m));
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
      for (int64_t i = begin; i < end; ++i) dst[i] = dequantize_code(src[i], t, am[b]);
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
