// Shared by the CPU (g++) and CUDA (nvcc) builds: the element math of every fused op is written
// once, in headers under this folder, as inline functions that compile on both sides.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FT_HD __host__ __device__ __forceinline__
#else
#define FT_HD inline
#endif

namespace fusedtech {

FT_HD float ft_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

FT_HD float ft_max(float a, float b) {
  // NaN-propagating like torch.maximum: a NaN in either operand wins.
  return (a != a || a > b) ? a : b;
}

// torch.lerp's formula for a scalar weight (ATen/native/Lerp.h): which branch is taken depends on
// the weight only, so the branch is uniform across a tensor and keeps loops vectorisable.
FT_HD float ft_lerp(float self, float end, float weight) {
  return (weight < 0.5f && weight > -0.5f) ? self + weight * (end - self)
                                           : end - (end - self) * (1.0f - weight);
}

}  // namespace fusedtech
