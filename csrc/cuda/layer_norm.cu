// LayerNorm / RMSNorm forward and backward on CUDA tensors, for a contiguous (rows, n) input.
// Forward: one block per row, fp32 statistics (mean, then the centred second moment: two block
// reductions), then the normalisation with the header's element math. Backward: a fixed grid of
// blocks, each over a fixed range of rows; thread t owns columns t, t + blockDim, ... of its
// block's dweight/dbias partial row, so the partials need no atomics, and they are summed in a
// fixed order afterwards: bit-identical gradients run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "../checks.h"
#include "fusedtech/norm.h"
#include "fusedtech/philox.h"

namespace fusedtech::cuda {
namespace {

constexpr int kThreads = 256;
// One block per row up to CUDA's grid limit; past 2^31 - 1 rows the blocks loop over rows.
constexpr int64_t kMaxRowBlocks = (int64_t{1} << 31) - 1;
constexpr int kBackwardBlocks = 256;

__device__ float block_sum(float v, float* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const float out = shared[0];
  __syncthreads();
  return out;
}

// The weight or bias as contiguous fp32 (exact for fp32/fp16/bf16 parameters; a weight in the
// input's dtype would round fp32 weights when a bf16 input meets them, as under autocast).
at::Tensor as_float(const std::optional<at::Tensor>& t) {
  return t ? t->to(at::kFloat).contiguous() : at::Tensor();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ln_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                         const float* __restrict__ w, const float* __restrict__ b,
                                                         float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                         int64_t rows, int64_t n, float eps, bool rms) {
  __shared__ float shared[kThreads];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // a grid of at most kMaxRowBlocks
    const T* xr = x + row * n;
    // The sum of x - x[0], plus x[0] (the cpu kernel's and Triton's shifted mean): a constant row's
    // mean is exact, where sum / n rounds and 1 / sqrt(var + eps) magnifies x - mean.
    const float shift = rms ? 0.0f : static_cast<float>(xr[0]);
    float sum = 0.0f;
    if (!rms) {
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sum += static_cast<float>(xr[j]) - shift;
    }
    const float mean = rms ? 0.0f : shift + block_sum(sum, shared) / n;
    float m2 = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float d = static_cast<float>(xr[j]) - mean;
      m2 += d * d;
    }
    // Correctly rounded sqrt and divide, as the Triton kernels' 1 / sqrt_rn (rsqrtf is off by up to 2 ulp).
    const float rstd = 1.0f / sqrtf(block_sum(m2, shared) / n + eps);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float wj = w ? w[j] : 1.0f, bj = b ? b[j] : 0.0f;
      y[row * n + j] = static_cast<T>(norm_forward<float>(static_cast<float>(xr[j]), mean, rstd, wj, bj));
    }
    if (threadIdx.x == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// from_output: x is the forward's output y, and xhat = (y - b) * (1 / w) (the memory-saving backward).
template <typename T>
__global__ void __launch_bounds__(kThreads) ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                         const float* __restrict__ w, const float* __restrict__ b,
                                                         const float* __restrict__ mean,
                                                         const float* __restrict__ rstd, T* __restrict__ dx,
                                                         float* __restrict__ dw_part, float* __restrict__ db_part,
                                                         int64_t rows, int64_t n, int64_t rows_per_block, bool rms,
                                                         bool from_output) {
  __shared__ float shared[kThreads];
  float* dwp = dw_part + static_cast<int64_t>(blockIdx.x) * n;
  float* dbp = db_part + static_cast<int64_t>(blockIdx.x) * n;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dwp[j] = dbp[j] = 0.0f;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  auto xhat_at = [&](int64_t row, int64_t j, float mu, float rs) {
    const float v = static_cast<float>(x[row * n + j]);
    if (!from_output) return (v - mu) * rs;
    return xhat_from_output<float>(v, b ? b[j] : 0.0f, w ? 1.0f / w[j] : 1.0f);
  };
  for (int64_t row = first; row < min(rows, first + rows_per_block); ++row) {
    const float mu = (rms || from_output) ? 0.0f : mean[row], rs = rstd[row];
    float c1 = 0.0f, c2 = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float wdy = static_cast<float>(dy[row * n + j]) * (w ? w[j] : 1.0f);
      c1 += xhat_at(row, j, mu, rs) * wdy;
      c2 += wdy;
    }
    c1 = block_sum(c1, shared) / n;
    c2 = rms ? 0.0f : block_sum(c2, shared) / n;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float g = static_cast<float>(dy[row * n + j]);
      const float xhat = xhat_at(row, j, mu, rs);
      dx[row * n + j] = static_cast<T>(norm_backward<float>(g * (w ? w[j] : 1.0f), xhat, c1, c2, rs));
      dwp[j] += g * xhat;
      dbp[j] += g;
    }
  }
}

// dropout(x) + residual, then LayerNorm / RMSNorm, one block per row (the CPU kernel's semantics):
// element i's mask is the dropout kernel's, word i % 4 of Philox block i / 4 (a block per element
// here, as Triton's: rows need not start on a multiple of four); the sum is rounded to x's dtype as
// stored, dropout(x) first as the dropout op rounds it, and the stored sum is what is normalised.
template <typename T>
__global__ void __launch_bounds__(kThreads) dropout_add_norm_kernel(
    const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ w, const float* __restrict__ b,
    T* __restrict__ y, T* __restrict__ sum, float* __restrict__ mean_out, float* __restrict__ rstd_out,
    const int64_t* __restrict__ seed, int64_t rows, int64_t n, float eps, bool rms, uint32_t threshold, float scale) {
  __shared__ float shared[kThreads];
  const uint64_t key = static_cast<uint64_t>(*seed);
  const auto dropped_sum = [&](int64_t i) {  // dropout(x) + residual at element i, as stored
    uint32_t draw[4];
    philox4(key, static_cast<uint64_t>(i) / 4, draw);
    const T dropped = static_cast<T>(dropout_keep<float>(static_cast<float>(x[i]), draw[i % 4], threshold, scale));
    return static_cast<T>(static_cast<float>(dropped) + static_cast<float>(residual[i]));
  };
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // a grid of at most kMaxRowBlocks
    // The shifted mean (ln_fwd_kernel's): every thread computes the row's first sum itself.
    const float shift = rms ? 0.0f : static_cast<float>(dropped_sum(row * n));
    float acc = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {  // each thread later reads back only its own
      const int64_t i = row * n + j;
      const T s = dropped_sum(i);
      sum[i] = s;
      acc += static_cast<float>(s) - shift;
    }
    const float mean = rms ? 0.0f : shift + block_sum(acc, shared) / n;
    float m2 = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float d = static_cast<float>(sum[row * n + j]) - mean;
      m2 += d * d;
    }
    // Correctly rounded sqrt and divide, as the Triton kernels' 1 / sqrt_rn (rsqrtf is off by up to 2 ulp).
    const float rstd = 1.0f / sqrtf(block_sum(m2, shared) / n + eps);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float wj = w ? w[j] : 1.0f, bj = b ? b[j] : 0.0f;
      y[row * n + j] = static_cast<T>(norm_forward<float>(static_cast<float>(sum[row * n + j]), mean, rstd, wj, bj));
    }
    if (threadIdx.x == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias, double eps,
                                                                  bool rms) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
              "fusedtech: layer_norm (cuda) expects a contiguous 2-D CUDA input, got ", x.sizes(), " on ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble, "fusedtech: layer_norm (cuda) takes float32, float16 or bfloat16");
  check_norm_args(x, weight, bias, "layer_norm");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::zeros({rows}, x.options().dtype(at::kFloat)), rstd = at::zeros({rows}, x.options().dtype(at::kFloat));
  if (rows == 0 || n == 0) return {y, mean, rstd};
  const at::Tensor w = as_float(weight), b = as_float(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    ln_fwd_kernel<scalar_t><<<std::min(rows, kMaxRowBlocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), w.defined() ? w.const_data_ptr<float>() : nullptr,
        b.defined() ? b.const_data_ptr<float>() : nullptr, mean.data_ptr<float>(), rstd.data_ptr<float>(), rows,
        n, static_cast<float>(eps), rms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  const at::Tensor& mean, const at::Tensor& rstd,
                                                                  bool rms, bool from_output) {
  TORCH_CHECK(x.is_cuda(), "fusedtech: layer_norm (cuda) got input on ", x.device());
  check_norm_args(x, weight, bias, "layer_norm");
  check_norm_bwd_args(dy_in, x, mean, rstd, !rms && !from_output);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat,
              "fusedtech: layer_norm (cuda) mean and rstd must be float32");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = dy_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(kBackwardBlocks, rows));
  const int64_t per_block = (rows + blocks - 1) / blocks;
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw_part = at::zeros({blocks, n}, x.options().dtype(at::kFloat));
  at::Tensor db_part = at::zeros({blocks, n}, x.options().dtype(at::kFloat));
  const at::Tensor w = as_float(weight), b = from_output ? as_float(bias) : at::Tensor();
  if (rows > 0 && n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cuda", [&] {
      ln_bwd_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.defined() ? w.const_data_ptr<float>() : nullptr,
          b.defined() ? b.const_data_ptr<float>() : nullptr, mean.const_data_ptr<float>(),
          rstd.const_data_ptr<float>(), dx.data_ptr<scalar_t>(), dw_part.data_ptr<float>(), db_part.data_ptr<float>(),
          rows, n, per_block, rms, from_output);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto f32 = x.options().dtype(at::kFloat);
  return {dx, weight ? dw_part.sum(0) : at::empty({0}, f32), bias ? db_part.sum(0) : at::empty({0}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_fwd_cuda(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, bool rms, const at::Tensor& seed) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
              "fusedtech: dropout_add_layer_norm (cuda) expects a contiguous 2-D CUDA input, got ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble, "fusedtech: dropout_add_layer_norm (cuda) takes float32, float16 or bfloat16");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() && residual.scalar_type() == x.scalar_type() &&
                  residual.device() == x.device(),
              "fusedtech: dropout_add_layer_norm residual must be contiguous, of x's shape, dtype and device, got ",
              residual.sizes(), " ", residual.scalar_type(), " on ", residual.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fusedtech: dropout probability has to be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device() == x.device(),
              "fusedtech: seed must be a one-element int64 tensor on ", x.device());
  check_norm_args(x, weight, bias, "dropout_add_layer_norm");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor y = at::empty_like(x), sum = at::empty_like(x);
  at::Tensor mean = at::zeros({rows}, x.options().dtype(at::kFloat)), rstd = at::zeros({rows}, x.options().dtype(at::kFloat));
  if (rows == 0 || n == 0) return {y, sum, mean, rstd};
  const uint32_t threshold = static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0));
  const at::Tensor w = as_float(weight), b = as_float(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_add_norm_fwd_cuda", [&] {
    dropout_add_norm_kernel<scalar_t><<<std::min(rows, kMaxRowBlocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(),
        w.defined() ? w.const_data_ptr<float>() : nullptr, b.defined() ? b.const_data_ptr<float>() : nullptr,
        y.data_ptr<scalar_t>(), sum.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
        seed.const_data_ptr<int64_t>(), rows, n, static_cast<float>(eps), rms, threshold, dropout_scale<float>(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, sum, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CUDA, m) {
  m.impl("dropout_add_norm_fwd", &dropout_add_norm_fwd_cuda);
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace fusedtech::cuda
