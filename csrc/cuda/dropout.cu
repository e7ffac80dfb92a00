// Inverted dropout on CUDA tensors with the Philox mask of csrc/include/fusedtech/philox.h: the
// same (seed, element index) -> mask as the CPU kernel and Triton's tl.randint4x, so any backend
// regenerates any other's mask. The seed is read on the device (no host synchronisation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "fusedtech/philox.h"

namespace fusedtech::cuda {
namespace {

// Four consecutive elements per thread and iteration: one Philox block gives their four draws, and
// when both pointers are aligned to four elements they move as one vector load and store.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;  // torch's math type

template <typename T, bool ALIGNED>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ y, const int64_t* __restrict__ seed,
                               int64_t n, uint32_t threshold, math_t<T> scale) {
  using M = math_t<T>;
  const uint64_t s = static_cast<uint64_t>(*seed);
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t draw[4];
    philox4(s, static_cast<uint64_t>(g), draw);
    const int64_t i = 4 * g;
    if (ALIGNED && i + 4 <= n) {
      Vec4<T> in = reinterpret_cast<const Vec4<T>*>(x)[g], out;
#pragma unroll
      for (int k = 0; k < 4; ++k) out.v[k] = static_cast<T>(dropout_keep<M>(static_cast<M>(in.v[k]), draw[k], threshold, scale));
      reinterpret_cast<Vec4<T>*>(y)[g] = out;
    } else {
      for (int k = 0; k < 4 && i + k < n; ++k) {
        y[i + k] = static_cast<T>(dropout_keep<M>(static_cast<M>(x[i + k]), draw[k], threshold, scale));
      }
    }
  }
}

at::Tensor dropout_apply_cuda(const at::Tensor& x_in, double p, const at::Tensor& seed) {
  TORCH_CHECK(x_in.is_cuda(), "fusedtech: dropout (cuda) got input on ", x_in.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fusedtech: dropout probability has to be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device() == x_in.device(),
              "fusedtech: seed must be a one-element int64 tensor on ", x_in.device());
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const uint32_t threshold = static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0));
  const int threads = 256;
  const int64_t groups = (n + 3) / 4;
  const int blocks = static_cast<int>(std::min<int64_t>((groups + threads - 1) / threads, 65535 * 8));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const uintptr_t vec = 4 * sizeof(scalar_t);
    const bool aligned = reinterpret_cast<uintptr_t>(xp) % vec == 0 && reinterpret_cast<uintptr_t>(yp) % vec == 0;
    auto kernel = aligned ? dropout_kernel<scalar_t, true> : dropout_kernel<scalar_t, false>;
    kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(xp, yp, seed.const_data_ptr<int64_t>(), n,
                                                                     threshold, dropout_scale<math_t<scalar_t>>(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CUDA, m) { m.impl("dropout_apply", &dropout_apply_cuda); }

}  // namespace fusedtech::cuda
