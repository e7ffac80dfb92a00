// Shared by the CPU (g++) and CUDA (nvcc) builds: the element math of every fused op is written
// once, in headers under this folder, as inline functions that compile on both sides.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FT_HD __host__ __device__ __forceinline__
#else
// always_inline: the CPU executors call these inside `omp simd` loops, which vectorise only what
// is inlined.
#define FT_HD inline __attribute__((always_inline))
#endif

namespace fusedtech {

FT_HD float ft_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

// c ? a : b for a condition that is uniform over a loop (an option flag). On the GPU a plain
// select; on the CPU a bit blend, because GCC does not vectorise a select on a scalar bool but
// does vectorise integer ops with a loop-invariant mask. Both give exactly a or b.
FT_HD float ft_select(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  uint32_t ua, ub;
  __builtin_memcpy(&ua, &a, 4);
  __builtin_memcpy(&ub, &b, 4);
  const uint32_t r = (ua & mask) | (ub & ~mask);
  float out;
  __builtin_memcpy(&out, &r, 4);
  return out;
#endif
}

FT_HD float ft_max(float a, float b) {
  // NaN-propagating like torch.maximum: a NaN in either operand wins.
  // Non-short-circuit | and &: branch-free, so loops calling this if-convert and vectorise.
  return ((a != a) | (a > b)) ? a : b;
}

// torch.lerp's formula for a scalar weight (ATen/native/Lerp.h): which branch is taken depends on
// the weight only, so the branch is uniform across a tensor and keeps loops vectorisable.
FT_HD float ft_lerp(float self, float end, float weight) {
  return ft_select((weight < 0.5f) & (weight > -0.5f), self + weight * (end - self),
                   end - (end - self) * (1.0f - weight));
}

// The activation codes of the fused norm kernels (0 none, 1 relu, 2 gelu, 3 silu) as a compile-time
// constant: f(Act<code>{}) instantiates one kernel per activation, the code a template argument.
template <int A>
using Act = std::integral_constant<int, A>;

template <typename F>
void with_activation(int64_t act, F f) {
  switch (act) {
    case 1: f(Act<1>{}); break;
    case 2: f(Act<2>{}); break;
    case 3: f(Act<3>{}); break;
    default: f(Act<0>{});
  }
}

}  // namespace fusedtech
