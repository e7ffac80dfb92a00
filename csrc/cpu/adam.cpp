// Fused multi-tensor Adam/AdamW step on CPU tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "fusedtech/adam.h"
#include "multi_tensor.h"

namespace fusedtech::cpu {
namespace {

// One chunk: a single SIMD loop, each element loaded into fp32 locals, updated, stored back.
// h and s arrive by value: as locals the compiler knows they cannot alias the arrays, hoists every
// option test out of the loop and vectorises it.
template <typename P, typename S, bool AMSGRAD, bool MASTER>
__attribute__((noinline)) void adam_chunk(const Chunk& c, P* __restrict param, const P* __restrict grad, S* __restrict exp_avg,
                S* __restrict exp_avg_sq, S* __restrict max_exp_avg_sq, float* __restrict master,
                float inv_grad_scale, const AdamHyper h, const AdamTensorScalars s) {
  const int64_t begin = c.begin, end = c.end;
  for (int64_t i = begin; i < end; ++i) {
    float p = MASTER ? master[i] : to_float(param[i]);
    float m = to_float(exp_avg[i]);
    float v = to_float(exp_avg_sq[i]);
    float vmax = AMSGRAD ? to_float(max_exp_avg_sq[i]) : 0.0f;
    adam_update(p, to_float(grad[i]) * inv_grad_scale, m, v, vmax, h, s);
    if (MASTER) master[i] = p;
    param[i] = from_float<P>(p);
    exp_avg[i] = from_float<S>(m);
    exp_avg_sq[i] = from_float<S>(v);
    if (AMSGRAD) max_exp_avg_sq[i] = from_float<S>(vmax);
  }
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList master_params, at::TensorList steps, double lr,
                   const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                   double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  check_param_list(params);
  const bool has_master = !master_params.empty();
  const auto pdtype = params[0].scalar_type();
  const auto sdtype = has_master ? at::kFloat : pdtype;
  check_like_params(params, grads, "grads", pdtype);
  check_like_params(params, exp_avgs, "exp_avgs", sdtype);
  check_like_params(params, exp_avg_sqs, "exp_avg_sqs", sdtype);
  if (amsgrad) check_like_params(params, max_exp_avg_sqs, "max_exp_avg_sqs", sdtype);
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  check_steps(params, steps);
  TORCH_CHECK(params[0].device().is_cpu(), "fusedtech: adam_step (cpu) got params on ",
              params[0].device());

  if (found_inf && found_inf->item<double>() != 0.0) return;  // GradScaler: skip the step
  const float inv_grad_scale =
      grad_scale ? static_cast<float>(1.0 / grad_scale->item<double>()) : 1.0f;
  if (lr_tensor) lr = lr_tensor->item<double>();

  const AdamHyper h{static_cast<float>(beta1), static_cast<float>(beta2),
                    static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
                    static_cast<float>(eps), static_cast<float>(weight_decay), decoupled,
                    amsgrad, maximize};
  std::vector<AdamTensorScalars> per_tensor(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    per_tensor[t] =
        adam_tensor_scalars(lr, beta1, beta2, weight_decay, steps[t].item<double>());
  }

  FT_DISPATCH_FLOAT_TYPES(pdtype, "adam_step_cpu", [&] {
    using P = scalar_t;
    auto run = [&](auto state_tag, auto amsgrad_tag, auto master_tag) {
      using S = decltype(state_tag);
      constexpr bool kAmsgrad = decltype(amsgrad_tag)::value;
      constexpr bool kMaster = decltype(master_tag)::value;
      for_each_chunk(params, [&](const Chunk& c) {
        const int64_t t = c.tensor;
        adam_chunk<P, S, kAmsgrad, kMaster>(
            c, params[t].data_ptr<P>(), grads[t].const_data_ptr<P>(), exp_avgs[t].data_ptr<S>(),
            exp_avg_sqs[t].data_ptr<S>(), kAmsgrad ? max_exp_avg_sqs[t].data_ptr<S>() : nullptr,
            kMaster ? master_params[t].data_ptr<float>() : nullptr, inv_grad_scale, h,
            per_tensor[t]);
      });
    };
    using T = std::true_type;
    using F = std::false_type;
    if (has_master) {
      amsgrad ? run(float{}, T{}, T{}) : run(float{}, F{}, T{});
    } else {
      amsgrad ? run(P{}, T{}, F{}) : run(P{}, F{}, F{});
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace fusedtech::cpu
