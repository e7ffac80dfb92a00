// DropBlock on CUDA tensors (the oracle, fusedtech/reference/drop_block.py, states the mask; the CPU
// and Triton kernels draw the same one). Three kernels: the block centres as bytes, four per thread
// from one Philox block (centre k takes word k % 4 of block k / 4: the dropout draw of its index);
// the keep mask, one thread per element OR-ing the centres of its block_size^2 window (byte loads
// that hit the cache), stored with the tensor's strides, each block adding its count of kept
// elements to one int64 (integer atomics: the same total in any order); then x * scale where kept,
// over storage, the scale read from device memory (the caller forms it: no host synchronisation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "fusedtech/philox.h"

namespace fusedtech::cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, 65535 * 8));
}

// threshold is 2^32 when gamma is 1 (every centre set): compared in 64 bits.
__global__ void centres_kernel(const int64_t* __restrict__ seed, uint8_t* __restrict__ centres, int64_t count,
                               uint64_t threshold) {
  const uint64_t key = static_cast<uint64_t>(*seed);
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; 4 * g < count;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t draw[4];
    philox4(key, static_cast<uint64_t>(g), draw);
    for (int k = 0; k < 4 && 4 * g + k < count; ++k) centres[4 * g + k] = draw[k] < threshold;
  }
}

struct Shape {
  int64_t C, H, W, b;       // channels, height, width, block size
  int64_t sn, sc, sh, sw;   // the keep mask's (and x's) strides
};

// Element (h, w) of plane (n, c) is dropped when a centre lies in [h - b + 1, h] x [w - b + 1, w]
// (torchvision's pad-then-max-pool places the block below and right of its centre).
__global__ void __launch_bounds__(kThreads) keep_kernel(const uint8_t* __restrict__ centres, uint8_t* __restrict__ keep,
                                                        unsigned long long* __restrict__ kept, int64_t total, Shape s) {
  __shared__ int block_kept;
  if (threadIdx.x == 0) block_kept = 0;
  __syncthreads();
  const int64_t centre_h = s.H - s.b + 1, centre_w = s.W - s.b + 1, plane_size = s.H * s.W;
  int mine = 0;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = idx / plane_size, rem = idx - plane * plane_size;
    const int64_t h = rem / s.W, w = rem - h * s.W;
    const uint8_t* c = centres + plane * centre_h * centre_w;
    bool dropped = false;
    for (int64_t i = max(h - s.b + 1, int64_t(0)); i <= min(h, centre_h - 1) && !dropped; ++i)
      for (int64_t j = max(w - s.b + 1, int64_t(0)); j <= min(w, centre_w - 1); ++j) dropped |= c[i * centre_w + j] != 0;
    const int64_t n = plane / s.C, ch = plane - n * s.C;
    keep[n * s.sn + ch * s.sc + h * s.sh + w * s.sw] = !dropped;
    mine += !dropped;
  }
  atomicAdd(&block_kept, mine);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(kept, static_cast<unsigned long long>(block_kept));
}

template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// y = x * (scale where keep, else 0) over storage (x and keep share their strides); S the scale's type.
template <typename T, typename S>
__global__ void apply_kernel(const T* __restrict__ x, const uint8_t* __restrict__ keep, const S* __restrict__ scale,
                             T* __restrict__ y, int64_t n) {
  using M = math_t<T>;
  const M sc = static_cast<M>(*scale);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = static_cast<T>(static_cast<M>(x[i]) * (keep[i] ? sc : M(0)));  // a dropped NaN stays NaN
}

// keep (uint8 with x's shape and strides, 1 = kept) and the number kept (int64, 0-d, on the device).
std::tuple<at::Tensor, at::Tensor> drop_block_keep_cuda(const at::Tensor& x, const at::Tensor& seed, double gamma,
                                                        int64_t block_size) {
  TORCH_CHECK(x.is_cuda(), "fusedtech: drop_block2d (cuda) got input on ", x.device());
  check_drop_block_keep(x, seed, gamma, block_size);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), b = block_size;
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor keep = at::empty_like(x, x.options().dtype(at::kByte));
  at::Tensor kept = at::zeros({}, x.options().dtype(at::kLong));
  if (x.numel() == 0) return {keep, kept};
  const int64_t centre_count = N * C * (H - b + 1) * (W - b + 1);
  at::Tensor centres = at::empty({centre_count}, x.options().dtype(at::kByte));
  const uint64_t threshold = static_cast<uint64_t>(std::floor(gamma * 4294967296.0));  // 2^32: every centre
  auto stream = at::cuda::getCurrentCUDAStream();
  centres_kernel<<<blocks_for((centre_count + 3) / 4), kThreads, 0, stream>>>(seed.const_data_ptr<int64_t>(),
                                                                             centres.data_ptr<uint8_t>(), centre_count,
                                                                             threshold);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "the count is an int64 tensor");
  const Shape shape{C, H, W, b, keep.stride(0), keep.stride(1), keep.stride(2), keep.stride(3)};
  keep_kernel<<<blocks_for(x.numel()), kThreads, 0, stream>>>(
      centres.const_data_ptr<uint8_t>(), keep.data_ptr<uint8_t>(),
      reinterpret_cast<unsigned long long*>(kept.data_ptr<int64_t>()), x.numel(), shape);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {keep, kept};
}

at::Tensor drop_block_apply_cuda(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& scale) {
  TORCH_CHECK(x.is_cuda(), "fusedtech: drop_block2d (cuda) got input on ", x.device());
  check_drop_block_apply(x, keep, scale);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "drop_block_apply_cuda", [&] {
    if (scale.scalar_type() == at::kDouble) {
      apply_kernel<scalar_t, double><<<blocks_for(n), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), keep.const_data_ptr<uint8_t>(), scale.const_data_ptr<double>(),
          y.data_ptr<scalar_t>(), n);
    } else {
      apply_kernel<scalar_t, float><<<blocks_for(n), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), keep.const_data_ptr<uint8_t>(), scale.const_data_ptr<float>(),
          y.data_ptr<scalar_t>(), n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CUDA, m) {
  m.impl("drop_block_keep", &drop_block_keep_cuda);
  m.impl("drop_block_apply", &drop_block_apply_cuda);
}

}  // namespace fusedtech::cuda
