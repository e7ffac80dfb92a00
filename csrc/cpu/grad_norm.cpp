// Global 2-norm / inf-norm of a list of tensors (clip_grad_norm_) in one pass over all of them:
// per-chunk partials (double for sums of squares), combined in chunk order, so the result is the
// same run to run whatever the thread count.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "fusedtech/reduce.h"
#include "multi_tensor.h"

namespace fusedtech::cpu {
namespace {

// kLanes independent accumulators: no cross-iteration dependency, so GCC vectorises the
// reduction without reassociation flags, and the order is fixed (deterministic).
constexpr int kLanes = 16;

template <typename T, bool INF>
__attribute__((noinline)) double chunk_partial(const T* __restrict x, int64_t begin, int64_t end) {
  double acc[kLanes] = {};
  auto add = [](double a, float e) { return INF ? static_cast<double>(norm_combine_inf(static_cast<float>(a), e)) : a + e; };
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float v = to_float(x[i + k]);
      acc[k] = INF ? add(acc[k], norm_element(v, true)) : acc[k] + static_cast<double>(v) * v;
    }
  }
  for (; i < end; ++i) {
    const float v = to_float(x[i]);
    acc[0] = INF ? add(acc[0], norm_element(v, true)) : acc[0] + static_cast<double>(v) * v;
  }
  double out = 0.0;
  for (int k = 0; k < kLanes; ++k) out = INF ? add(out, static_cast<float>(acc[k])) : out + acc[k];
  return out;
}

at::Tensor multi_tensor_norm_cpu(at::TensorList tensors, double norm_type) {
  const bool inf = std::isinf(norm_type);
  TORCH_CHECK(inf || norm_type == 2.0, "fusedtech: multi_tensor_norm supports norm_type 2 and inf, got ", norm_type);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto dt = tensors[i].scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fusedtech: tensors[", i,
                "] has dtype ", dt, "; float32, float16 or bfloat16 expected");
    TORCH_CHECK(tensors[i].device().is_cpu(), "fusedtech: tensors[", i, "] is on ", tensors[i].device());
    TORCH_CHECK(tensors[i].layout() == at::kStrided, "fusedtech: tensors[", i, "] is sparse");
  }
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  for (const auto& t : tensors) dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  const std::vector<Chunk> chunks = make_chunks(dense);
  std::vector<double> partial(chunks.size(), 0.0);
  // One partial per chunk, summed in chunk order: the same total on any thread count (and on the
  // calling thread alone below the optimizers' parallel threshold, as their steps run).
  for_each_chunk_index(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const at::Tensor& t = dense[ch.tensor];
    FT_DISPATCH_FLOAT_TYPES(t.scalar_type(), "multi_tensor_norm_cpu", [&] {
      const scalar_t* x = t.const_data_ptr<scalar_t>();
      partial[c] = inf ? chunk_partial<scalar_t, true>(x, ch.begin, ch.end)
                       : chunk_partial<scalar_t, false>(x, ch.begin, ch.end);
    });
  });
  double total = 0.0;
  for (double p : partial) total = inf ? static_cast<double>(norm_combine_inf(total, p)) : total + p;
  // Rounded to float here: a norm past float's range is inf (at::scalar_tensor would refuse to convert it).
  const float norm = static_cast<float>(inf ? total : std::sqrt(total));
  return at::scalar_tensor(norm, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) { m.impl("multi_tensor_norm", &multi_tensor_norm_cpu); }

}  // namespace fusedtech::cpu
