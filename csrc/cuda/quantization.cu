// Blockwise quantize / dequantize of a dense tensor on CUDA (the CPU kernels' ops; fusedtech/quantization.h).
// Written and compiled for sm_80 / sm_90; first run on a GPU pending.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "quantization.cuh"

namespace fusedtech::cuda {
namespace {

__global__ void __launch_bounds__(kQuantThreads)
    quantize_kernel(const float* __restrict x, uint8_t* __restrict codes, float* __restrict absmax,
                    const float* __restrict table, int64_t n) {
  __shared__ float values[256], mids[255], scratch[8];
  load_table(table, values, mids);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kQuantThreads + threadIdx.x;
  const float v = i < n ? x[i] : 0.0f;
  const float amax = block_absmax(v, scratch);
  if (i < n) codes[i] = static_cast<uint8_t>(quantize_code<8>(v * quant_inverse(amax), mids));
  if (threadIdx.x == 0) absmax[blockIdx.x] = amax;
}

__global__ void dequantize_kernel(const uint8_t* __restrict codes, const float* __restrict absmax,
                                  const float* __restrict table, float* __restrict out, int64_t n) {
  __shared__ float values[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) values[i] = table[i];
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = dequantize_code(codes[i], values, absmax[i / kQuantBlock]);
}

void check_table(const at::Tensor& table, const at::Tensor& like) {
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.numel() == 256 && table.is_contiguous() &&
                  table.device() == like.device(),
              "fusedtech: quantization table must be a contiguous float32 tensor of 256 values on ", like.device(),
              ", got ", table.scalar_type(), " of shape ", table.sizes(), " on ", table.device());
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x, const at::Tensor& table,
                                                           int64_t block) {
  TORCH_CHECK(block == kQuantBlock, "fusedtech: quantization block must be ", kQuantBlock, ", got ", block);
  TORCH_CHECK(x.is_cuda(), "fusedtech: quantize_blockwise (cuda) got x on ", x.device());
  TORCH_CHECK(x.numel() == 0 || x.is_non_overlapping_and_dense(), "fusedtech: quantize_blockwise x must be dense");
  check_table(table, x);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor codes = at::empty_like(x, x.options().dtype(at::kByte));
  const int64_t n = x.numel(), blocks = (n + kQuantBlock - 1) / kQuantBlock;
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  if (n > 0) {
    quantize_kernel<<<blocks, kQuantThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        xf.const_data_ptr<float>(), codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), table.const_data_ptr<float>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& table,
                                     int64_t block) {
  TORCH_CHECK(block == kQuantBlock, "fusedtech: quantization block must be ", kQuantBlock, ", got ", block);
  TORCH_CHECK(codes.is_cuda() && codes.scalar_type() == at::kByte, "fusedtech: dequantize_blockwise codes must be "
              "uint8 on a CUDA device, got ", codes.scalar_type(), " on ", codes.device());
  TORCH_CHECK(codes.numel() == 0 || codes.is_non_overlapping_and_dense(), "fusedtech: dequantize_blockwise codes must be dense");
  const int64_t n = codes.numel(), blocks = (n + kQuantBlock - 1) / kQuantBlock;
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == blocks && absmax.is_contiguous() &&
                  absmax.device() == codes.device(),
              "fusedtech: dequantize_blockwise absmax must be a contiguous float32 tensor of ", blocks, " values on ",
              codes.device());
  check_table(table, codes);
  c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty_like(codes, codes.options().dtype(at::kFloat));
  if (n > 0) {
    constexpr int kThreads = 256;
    dequantize_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        codes.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), table.const_data_ptr<float>(),
        out.data_ptr<float>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CUDA, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
}

}  // namespace fusedtech::cuda
