// Global 2-norm / inf-norm of a list of tensors (clip_grad_norm_): one multi-tensor pass writes a
// partial per chunk (a fixed-order block reduction, no atomics), then one reduction of the
// partials. Deterministic run to run.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "fusedtech/reduce.h"
#include "multi_tensor_apply.cuh"

namespace fusedtech::cuda {
namespace {

using NormMeta = TensorListMeta<1>;

template <typename T, bool INF>
__global__ void __launch_bounds__(kThreads) norm_partials_kernel(NormMeta meta, float* partials, int64_t offset) {
  const BlockChunk c = block_chunk(meta);
  const T* x = static_cast<const T*>(meta.addr[0][c.t]);
  float acc = 0.0f;
  for_each_element(c, [&](int64_t i) {
    const float e = norm_element(static_cast<float>(x[i]), INF);
    acc = INF ? norm_combine_inf(acc, e) : acc + e;
  });
  __shared__ float shared[kThreads];
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const float other = shared[threadIdx.x + stride];
      shared[threadIdx.x] = INF ? norm_combine_inf(shared[threadIdx.x], other) : shared[threadIdx.x] + other;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[offset + blockIdx.x] = shared[0];
}

at::Tensor multi_tensor_norm_cuda(at::TensorList tensors, double norm_type) {
  const bool inf = std::isinf(norm_type);
  TORCH_CHECK(inf || norm_type == 2.0, "fusedtech: multi_tensor_norm supports norm_type 2 and inf, got ", norm_type);
  TORCH_CHECK(!tensors.empty(), "fusedtech: multi_tensor_norm got no tensors");
  const at::Device device = tensors[0].device();
  const auto dtype = tensors[0].scalar_type();
  int64_t chunks = 0;
  std::vector<at::Tensor> dense;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == device, "fusedtech: tensors[", i, "] is on ", tensors[i].device(),
                " but tensors[0] is on ", device);
    TORCH_CHECK(tensors[i].scalar_type() == dtype, "fusedtech: tensors[", i, "] has dtype ",
                tensors[i].scalar_type(), " but tensors[0] has ", dtype);
    TORCH_CHECK(tensors[i].layout() == at::kStrided, "fusedtech: tensors[", i, "] is sparse");
    dense.push_back(tensors[i].is_non_overlapping_and_dense() ? tensors[i] : tensors[i].contiguous());
    chunks += (tensors[i].numel() + kChunkElements - 1) / kChunkElements;
  }
  c10::cuda::CUDAGuard guard(device);
  at::Tensor partials = at::zeros({std::max<int64_t>(chunks, 1)}, at::TensorOptions().device(device).dtype(at::kFloat));
  const std::array<at::TensorList, 1> lists{dense};
  const auto stream = at::cuda::getCurrentCUDAStream();
  int64_t offset = 0;
  FT_DISPATCH_FLOAT_TYPES(dtype, "multi_tensor_norm_cuda", [&] {
    multi_tensor_apply<1>(lists, {}, [&](const NormMeta& meta, int blocks) {
      if (inf) {
        norm_partials_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(meta, partials.data_ptr<float>(), offset);
      } else {
        norm_partials_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(meta, partials.data_ptr<float>(), offset);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      offset += blocks;
    });
  });
  // amax propagates NaN like the per-chunk max does.
  return inf ? partials.amax() : partials.sum().sqrt();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CUDA, m) { m.impl("multi_tensor_norm", &multi_tensor_norm_cuda); }

}  // namespace fusedtech::cuda
