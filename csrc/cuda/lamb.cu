// Fused multi-tensor LAMB on CUDA tensors (see lamb.h): pass 1 (moments, per-chunk partial sums
// of p^2 and u^2, fixed-order block reductions), pass 2 (one block per tensor: its partials summed
// in order, trust ratio, step scalar; the norms and ratio written out), pass 3 (update).
// Deterministic; no atomics.
// The per-tensor table of pass 2 is copied to the device each step, so this step is not
// capturable in a CUDA graph (Adam, SGD, RMSprop and Adagrad are).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedtech/lamb.h"
#include "multi_tensor_apply.cuh"

namespace fusedtech::cuda {
namespace {

using LambMeta = TensorListMeta<5>;  // param, grad, exp_avg, exp_avg_sq, master

__device__ __forceinline__ float block_sum(float v, float* shared) {
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

// Pass 1's "step" slot holds the tensor's step counter (for bias_correction's bc1, bc2).
template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) lamb_moments_kernel(LambMeta meta, LambHyper h, double beta1, double beta2,
                                                               bool bias_correction, const float* grad_scale,
                                                               const float* found_inf, float* partials,
                                                               int64_t offset) {
  if (found_inf && *found_inf != 0.0f) return;
  const BlockChunk c = block_chunk(meta);
  const LambCorrection bc = lamb_correction(beta1, beta2, *meta.step[c.t], bias_correction);
  const P* p = static_cast<const P*>(meta.addr[0][c.t]);
  const P* g = static_cast<const P*>(meta.addr[1][c.t]);
  S* m = static_cast<S*>(meta.addr[2][c.t]);
  S* v = static_cast<S*>(meta.addr[3][c.t]);
  const float* master = static_cast<const float*>(meta.addr[4][c.t]);
  const float scale = grad_scale ? 1.0f / *grad_scale : 1.0f;
  float wsq = 0.0f, usq = 0.0f;
  for_each_element(c, [&](int64_t i) {
    const float pf = master ? master[i] : static_cast<float>(p[i]);
    float mf = static_cast<float>(m[i]);
    float vf = static_cast<float>(v[i]);
    lamb_moments(static_cast<float>(g[i]) * scale, mf, vf, h);
    const S ms = static_cast<S>(mf), vs = static_cast<S>(vf);
    m[i] = ms;
    v[i] = vs;
    const float u = lamb_direction(pf, static_cast<float>(ms), static_cast<float>(vs), h, bc);
    wsq += pf * pf;
    usq += u * u;
  });
  __shared__ float shared[kThreads];
  wsq = block_sum(wsq, shared);
  usq = block_sum(usq, shared);
  if (threadIdx.x == 0) {
    partials[2 * (offset + blockIdx.x)] = wsq;
    partials[2 * (offset + blockIdx.x) + 1] = usq;
  }
}

// table rows: first chunk, chunk count, address of the tensor's step. Writes norms[t] (see lamb.h)
// and scalars[t] = (step scalar, bc1, sqrt(bc2)), which pass 3 reads.
__global__ void __launch_bounds__(kThreads) lamb_ratio_kernel(const int64_t* table, const float* partials,
                                                             float* scalars, float* norms, double lr,
                                                             const float* lr_ptr, double beta1, double beta2,
                                                             float clamp_lower, float clamp_upper, bool debias,
                                                             bool adam, bool bias_correction, bool trust_clip,
                                                             const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return;
  const int64_t t = blockIdx.x;
  const int64_t first = table[3 * t], count = table[3 * t + 1];
  const float* step = reinterpret_cast<const float*>(table[3 * t + 2]);
  float wsq = 0.0f, usq = 0.0f;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    wsq += partials[2 * (first + k)];
    usq += partials[2 * (first + k) + 1];
  }
  __shared__ float shared[kThreads];
  wsq = block_sum(wsq, shared);
  usq = block_sum(usq, shared);
  if (threadIdx.x == 0) {
    const double rate = lr_ptr ? static_cast<double>(*lr_ptr) : lr;
    const LambCorrection bc = lamb_correction(beta1, beta2, *step, bias_correction);
    scalars[3 * t] = lamb_neg_step(sqrtf(wsq), sqrtf(usq), clamp_lower, clamp_upper, adam, trust_clip,
                                   lamb_step_size(rate, beta1, beta2, *step, debias), norms + 3 * t);
    scalars[3 * t + 1] = bc.bc1;
    scalars[3 * t + 2] = bc.sqrt_bc2;
  }
}

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) lamb_update_kernel(LambMeta meta, LambHyper h, const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return;
  const BlockChunk c = block_chunk(meta);
  P* p = static_cast<P*>(meta.addr[0][c.t]);
  const S* m = static_cast<const S*>(meta.addr[2][c.t]);
  const S* v = static_cast<const S*>(meta.addr[3][c.t]);
  float* master = static_cast<float*>(meta.addr[4][c.t]);
  // This pass's "step" slot points at the tensor's row of pass 2's scalars.
  const float neg_step = meta.step[c.t][0];
  const LambCorrection bc{meta.step[c.t][1], meta.step[c.t][2]};
  for_each_element(c, [&](int64_t i) {
    const float pf = master ? master[i] : static_cast<float>(p[i]);
    const float out = pf + neg_step * lamb_direction(pf, static_cast<float>(m[i]), static_cast<float>(v[i]), h, bc);
    if (master) master[i] = out;
    p[i] = static_cast<P>(out);
  });
}

const float* optional_ptr(const std::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  if (!t) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1, "fusedtech: ", name,
              " must be a one-element float32 tensor on ", device);
  return t->data_ptr<float>();
}

void lamb_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList master_params, at::TensorList steps,
                    const at::Tensor& norms, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                    double beta2, double eps, double weight_decay, double clamp_lower, double clamp_upper,
                    bool debias, bool adam, bool grad_averaging, bool bias_correction, bool trust_clip,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  check_param_list(params);
  const bool has_master = !master_params.empty();
  const auto pdtype = params[0].scalar_type();
  const auto sdtype = has_master ? at::kFloat : pdtype;
  check_like_params(params, grads, "grads", pdtype);
  check_like_params(params, exp_avgs, "exp_avgs", sdtype);
  check_like_params(params, exp_avg_sqs, "exp_avg_sqs", sdtype);
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  check_steps(params, steps);
  check_lamb_norms(params, norms);
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fusedtech: lamb_step (cuda) got params on ", device);
  c10::cuda::CUDAGuard guard(device);
  const float* lr_ptr = optional_ptr(lr_tensor, "lr", device);
  const float* gs_ptr = optional_ptr(grad_scale, "grad_scale", device);
  const float* fi_ptr = optional_ptr(found_inf, "found_inf", device);
  const LambHyper h{static_cast<float>(beta1), static_cast<float>(beta2),
                    static_cast<float>(grad_averaging ? 1.0 - beta1 : 1.0), static_cast<float>(1.0 - beta2),
                    static_cast<float>(eps), static_cast<float>(weight_decay)};

  // Per-tensor chunk ranges in multi_tensor_apply's block order (empty tensors own no chunk).
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor table = at::empty({n, 3}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* rows = table.data_ptr<int64_t>();
  int64_t chunks = 0;
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(steps[t].device() == device, "fusedtech: steps[", t, "] is on ", steps[t].device());
    const int64_t count = (params[t].numel() + kChunkElements - 1) / kChunkElements;
    rows[3 * t] = chunks;
    rows[3 * t + 1] = count;
    rows[3 * t + 2] = reinterpret_cast<int64_t>(steps[t].data_ptr<float>());
    chunks += count;
  }
  const auto opts = at::TensorOptions().device(device).dtype(at::kFloat);
  at::Tensor partials = at::zeros({std::max<int64_t>(chunks, 1), 2}, opts);
  at::Tensor scalars = at::zeros({n, 3}, opts);
  at::Tensor table_dev = table.to(device, /*non_blocking=*/true);
  std::vector<at::Tensor> scalar_slots;
  scalar_slots.reserve(n);
  for (int64_t t = 0; t < n; ++t) scalar_slots.push_back(scalars.select(0, t));

  const std::array<at::TensorList, 5> lists{params, grads, exp_avgs, exp_avg_sqs, master_params};
  const auto stream = at::cuda::getCurrentCUDAStream();
  FT_DISPATCH_FLOAT_TYPES(pdtype, "lamb_step_cuda", [&] {
    using P = scalar_t;
    auto run = [&](auto state_tag) {
      using S = decltype(state_tag);
      int64_t offset = 0;
      multi_tensor_apply<5>(lists, steps, [&](const LambMeta& meta, int blocks) {
        lamb_moments_kernel<P, S><<<blocks, kThreads, 0, stream>>>(meta, h, beta1, beta2, bias_correction, gs_ptr,
                                                                     fi_ptr, partials.data_ptr<float>(), offset);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        offset += blocks;
      });
      lamb_ratio_kernel<<<n, kThreads, 0, stream>>>(table_dev.data_ptr<int64_t>(), partials.data_ptr<float>(),
                                                     scalars.data_ptr<float>(), norms.data_ptr<float>(), lr, lr_ptr,
                                                     beta1, beta2, static_cast<float>(clamp_lower),
                                                     static_cast<float>(clamp_upper), debias, adam, bias_correction,
                                                     trust_clip, fi_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      multi_tensor_apply<5>(lists, scalar_slots, [&](const LambMeta& meta, int blocks) {
        lamb_update_kernel<P, S><<<blocks, kThreads, 0, stream>>>(meta, h, fi_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (has_master) run(float{}); else run(P{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CUDA, m) { m.impl("lamb_step_", &lamb_step_cuda); }

}  // namespace fusedtech::cuda
