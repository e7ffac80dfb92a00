// Inverted dropout on CPU tensors with a mask regenerated from (seed, element index) by Philox:
// forward and backward run the same function, so nothing but the seed is saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "fusedtech/philox.h"

namespace fusedtech::cpu {
namespace {

// y = dropout(x) with the mask of (seed, i); also the backward (x = dy).
at::Tensor dropout_apply_cpu(const at::Tensor& x_in, double p, const at::Tensor& seed) {
  TORCH_CHECK(x_in.device().is_cpu(), "fusedtech: dropout (cpu) got input on ", x_in.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fusedtech: dropout probability has to be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "fusedtech: seed must be a one-element int64 tensor");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t threshold = static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    using mt = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;  // torch's math type
    const mt scale = dropout_scale<mt>(p);
    const int64_t n = x.numel();
    // Chunks of draws computed eight Philox blocks at a time, then applied.
    constexpr int64_t kChunk = 1024;
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 16, [&](int64_t lo, int64_t hi) {
      uint32_t draw[kChunk];
      for (int64_t chunk = lo; chunk < hi; ++chunk) {
        const int64_t first = chunk * kChunk, count = std::min(kChunk, n - first);
        philox_draws(s, first, count, draw);
        for (int64_t k = 0; k < count; ++k) {
          yp[first + k] = static_cast<scalar_t>(dropout_keep<mt>(static_cast<mt>(xp[first + k]), draw[k], threshold, scale));
        }
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) { m.impl("dropout_apply", &dropout_apply_cpu); }

}  // namespace fusedtech::cpu
