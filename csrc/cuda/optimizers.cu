// Fused multi-tensor SGD, RMSprop and Adagrad steps on CUDA tensors (Adam: adam.cu). Each is one
// launch per 32 tensors / 320 chunks; the element math is the headers' (shared with the CPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedtech/adagrad.h"
#include "fusedtech/rmsprop.h"
#include "fusedtech/sgd.h"
#include "multi_tensor_apply.cuh"

namespace fusedtech::cuda {
namespace {

// GradScaler and Tensor-lr operands, read on the device (no host synchronisation).
struct ScalarPtrs {
  const float* lr;          // Tensor lr, or null
  const float* grad_scale;  // or null
  const float* found_inf;   // or null
};

__device__ __forceinline__ bool skipped(const ScalarPtrs& s) {
  return s.found_inf && *s.found_inf != 0.0f;
}
__device__ __forceinline__ float inv_scale(const ScalarPtrs& s) {
  return s.grad_scale ? 1.0f / *s.grad_scale : 1.0f;
}

const float* scalar_ptr(const std::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  if (!t) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1,
              "fusedtech: ", name, " must be a one-element float32 tensor on ", device, ", got ",
              t->scalar_type(), " on ", t->device());
  return t->data_ptr<float>();
}

ScalarPtrs scalar_ptrs(const std::optional<at::Tensor>& lr, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, const at::Device& device) {
  return {scalar_ptr(lr, "lr", device), scalar_ptr(grad_scale, "grad_scale", device),
          scalar_ptr(found_inf, "found_inf", device)};
}

template <typename P>
__device__ __forceinline__ float load_param(const P* p, const float* master, int64_t i) {
  return master ? master[i] : static_cast<float>(p[i]);
}

template <typename P>
__device__ __forceinline__ void store_param(P* p, float* master, int64_t i, float v) {
  if (master) master[i] = v;
  p[i] = static_cast<P>(v);
}

// ---- SGD ------------------------------------------------------------------------------------
using SgdMeta = TensorListMeta<4>;  // param, grad, momentum buffer, master

template <typename P, typename S, bool MOMENTUM>
__global__ void __launch_bounds__(kThreads) sgd_kernel(SgdMeta meta, SgdHyper h, double lr, ScalarPtrs sp) {
  if (skipped(sp)) return;
  const BlockChunk c = block_chunk(meta);
  P* p = static_cast<P*>(meta.addr[0][c.t]);
  const P* g = static_cast<const P*>(meta.addr[1][c.t]);
  S* buf = static_cast<S*>(meta.addr[2][c.t]);
  float* master = static_cast<float*>(meta.addr[3][c.t]);
  h.neg_lr = static_cast<float>(-(sp.lr ? static_cast<double>(*sp.lr) : lr));
  const float scale = inv_scale(sp);
  for_each_element(c, [&](int64_t i) {
    float pf = load_param(p, master, i);
    float b = MOMENTUM ? static_cast<float>(buf[i]) : 0.0f;
    sgd_update(pf, static_cast<float>(g[i]) * scale, b, MOMENTUM, h);
    if (MOMENTUM) buf[i] = static_cast<S>(b);
    store_param(p, master, i, pf);
  });
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList master_params, double lr, const std::optional<at::Tensor>& lr_tensor,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool first_step, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  check_param_list(params);
  const bool has_master = !master_params.empty(), has_momentum = !momentum_buffers.empty();
  const auto pdtype = params[0].scalar_type();
  const auto sdtype = has_master ? at::kFloat : pdtype;
  check_like_params(params, grads, "grads", pdtype);
  if (has_momentum) check_like_params(params, momentum_buffers, "momentum_buffers", sdtype);
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fusedtech: sgd_step (cuda) got params on ", device);
  c10::cuda::CUDAGuard guard(device);
  const ScalarPtrs sp = scalar_ptrs(lr_tensor, grad_scale, found_inf, device);
  const SgdHyper h{static_cast<float>(-lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                   static_cast<float>(weight_decay), nesterov, maximize, first_step};
  const std::array<at::TensorList, 4> lists{params, grads, momentum_buffers, master_params};
  const auto stream = at::cuda::getCurrentCUDAStream();
  FT_DISPATCH_FLOAT_TYPES(pdtype, "sgd_step_cuda", [&] {
    using P = scalar_t;
    auto run = [&](auto state_tag, auto momentum_tag) {
      using S = decltype(state_tag);
      multi_tensor_apply<4>(lists, {}, [&](const SgdMeta& meta, int blocks) {
        sgd_kernel<P, S, decltype(momentum_tag)::value><<<blocks, kThreads, 0, stream>>>(meta, h, lr, sp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (has_master) {
      has_momentum ? run(float{}, std::true_type{}) : run(float{}, std::false_type{});
    } else {
      has_momentum ? run(P{}, std::true_type{}) : run(P{}, std::false_type{});
    }
  });
}

// ---- RMSprop --------------------------------------------------------------------------------
using RmspropMeta = TensorListMeta<6>;  // param, grad, square_avg, grad_avg, momentum buffer, master

template <typename P, typename S, bool CENTERED, bool MOMENTUM>
__global__ void __launch_bounds__(kThreads) rmsprop_kernel(RmspropMeta meta, RmspropHyper h, double lr,
                                                          ScalarPtrs sp) {
  if (skipped(sp)) return;
  const BlockChunk c = block_chunk(meta);
  P* p = static_cast<P*>(meta.addr[0][c.t]);
  const P* g = static_cast<const P*>(meta.addr[1][c.t]);
  S* sq = static_cast<S*>(meta.addr[2][c.t]);
  S* ga = static_cast<S*>(meta.addr[3][c.t]);
  S* buf = static_cast<S*>(meta.addr[4][c.t]);
  float* master = static_cast<float*>(meta.addr[5][c.t]);
  h.neg_lr = static_cast<float>(-(sp.lr ? static_cast<double>(*sp.lr) : lr));
  const float scale = inv_scale(sp);
  for_each_element(c, [&](int64_t i) {
    float pf = load_param(p, master, i);
    float sqf = static_cast<float>(sq[i]);
    float gaf = CENTERED ? static_cast<float>(ga[i]) : 0.0f;
    float bf = MOMENTUM ? static_cast<float>(buf[i]) : 0.0f;
    rmsprop_update(pf, static_cast<float>(g[i]) * scale, sqf, gaf, bf, CENTERED, MOMENTUM, h);
    sq[i] = static_cast<S>(sqf);
    if (CENTERED) ga[i] = static_cast<S>(gaf);
    if (MOMENTUM) buf[i] = static_cast<S>(bf);
    store_param(p, master, i, pf);
  });
}

void rmsprop_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList master_params,
                       double lr, const std::optional<at::Tensor>& lr_tensor, double alpha, double eps,
                       double weight_decay, double momentum, bool maximize,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  check_param_list(params);
  const bool has_master = !master_params.empty(), centered = !grad_avgs.empty(),
             has_momentum = !momentum_buffers.empty();
  const auto pdtype = params[0].scalar_type();
  const auto sdtype = has_master ? at::kFloat : pdtype;
  check_like_params(params, grads, "grads", pdtype);
  check_like_params(params, square_avgs, "square_avgs", sdtype);
  if (centered) check_like_params(params, grad_avgs, "grad_avgs", sdtype);
  if (has_momentum) check_like_params(params, momentum_buffers, "momentum_buffers", sdtype);
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fusedtech: rmsprop_step (cuda) got params on ", device);
  c10::cuda::CUDAGuard guard(device);
  const ScalarPtrs sp = scalar_ptrs(lr_tensor, grad_scale, found_inf, device);
  const RmspropHyper h{static_cast<float>(-lr), static_cast<float>(alpha), static_cast<float>(1.0 - alpha),
                       static_cast<float>(eps), static_cast<float>(weight_decay), static_cast<float>(momentum),
                       maximize};
  const std::array<at::TensorList, 6> lists{params, grads, square_avgs, grad_avgs, momentum_buffers, master_params};
  const auto stream = at::cuda::getCurrentCUDAStream();
  FT_DISPATCH_FLOAT_TYPES(pdtype, "rmsprop_step_cuda", [&] {
    using P = scalar_t;
    auto run = [&](auto state_tag, auto centered_tag, auto momentum_tag) {
      using S = decltype(state_tag);
      multi_tensor_apply<6>(lists, {}, [&](const RmspropMeta& meta, int blocks) {
        rmsprop_kernel<P, S, decltype(centered_tag)::value, decltype(momentum_tag)::value>
            <<<blocks, kThreads, 0, stream>>>(meta, h, lr, sp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    auto with_flags = [&](auto state_tag) {
      if (centered) {
        has_momentum ? run(state_tag, std::true_type{}, std::true_type{})
                     : run(state_tag, std::true_type{}, std::false_type{});
      } else {
        has_momentum ? run(state_tag, std::false_type{}, std::true_type{})
                     : run(state_tag, std::false_type{}, std::false_type{});
      }
    };
    if (has_master) with_flags(float{}); else with_flags(P{});
  });
}

// ---- Adagrad --------------------------------------------------------------------------------
using AdagradMeta = TensorListMeta<4>;  // param, grad, sum, master (+ the step in meta.step)

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) adagrad_kernel(AdagradMeta meta, AdagradHyper h, double lr,
                                                          double lr_decay, ScalarPtrs sp) {
  if (skipped(sp)) return;
  const BlockChunk c = block_chunk(meta);
  P* p = static_cast<P*>(meta.addr[0][c.t]);
  const P* g = static_cast<const P*>(meta.addr[1][c.t]);
  S* sum = static_cast<S*>(meta.addr[2][c.t]);
  float* master = static_cast<float*>(meta.addr[3][c.t]);
  const float neg_clr =
      adagrad_neg_clr(sp.lr ? static_cast<double>(*sp.lr) : lr, lr_decay, *meta.step[c.t]);
  const float scale = inv_scale(sp);
  for_each_element(c, [&](int64_t i) {
    float pf = load_param(p, master, i);
    float s = static_cast<float>(sum[i]);
    adagrad_update(pf, static_cast<float>(g[i]) * scale, s, neg_clr, h);
    sum[i] = static_cast<S>(s);
    store_param(p, master, i, pf);
  });
}

void adagrad_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList master_params, at::TensorList steps, double lr,
                       const std::optional<at::Tensor>& lr_tensor, double lr_decay, double weight_decay,
                       double eps, bool maximize, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  check_param_list(params);
  const bool has_master = !master_params.empty();
  const auto pdtype = params[0].scalar_type();
  const auto sdtype = has_master ? at::kFloat : pdtype;
  check_like_params(params, grads, "grads", pdtype);
  check_like_params(params, state_sums, "state_sums", sdtype);
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  check_steps(params, steps);
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fusedtech: adagrad_step (cuda) got params on ", device);
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].device() == device, "fusedtech: steps[", i, "] is on ", steps[i].device(),
                " but params are on ", device);
  }
  c10::cuda::CUDAGuard guard(device);
  const ScalarPtrs sp = scalar_ptrs(lr_tensor, grad_scale, found_inf, device);
  const AdagradHyper h{static_cast<float>(eps), static_cast<float>(weight_decay), maximize};
  const std::array<at::TensorList, 4> lists{params, grads, state_sums, master_params};
  const auto stream = at::cuda::getCurrentCUDAStream();
  FT_DISPATCH_FLOAT_TYPES(pdtype, "adagrad_step_cuda", [&] {
    using P = scalar_t;
    auto run = [&](auto state_tag) {
      using S = decltype(state_tag);
      multi_tensor_apply<4>(lists, steps, [&](const AdagradMeta& meta, int blocks) {
        adagrad_kernel<P, S><<<blocks, kThreads, 0, stream>>>(meta, h, lr, lr_decay, sp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (has_master) run(float{}); else run(P{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CUDA, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("rmsprop_step_", &rmsprop_step_cuda);
  m.impl("adagrad_step_", &adagrad_step_cuda);
}

}  // namespace fusedtech::cuda
