// Fused multi-tensor Adam/AdamW step on CPU tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedtech/adam.h"
#include "multi_tensor.h"

namespace fusedtech::cpu {
namespace {

template <typename P, typename S>
void adam_chunk(const Chunk& c, P* param, const P* grad, S* exp_avg, S* exp_avg_sq,
                S* max_exp_avg_sq, float* master, float inv_grad_scale, bool has_grad_scale,
                const AdamHyper& h, const AdamTensorScalars& s) {
  float p[kBlockElements], g[kBlockElements], m[kBlockElements], v[kBlockElements],
      vmax[kBlockElements];
  for (int64_t b = c.begin; b < c.end; b += kBlockElements) {
    const int64_t n = std::min(kBlockElements, c.end - b);
    for (int64_t i = 0; i < n; ++i) {
      p[i] = master ? master[b + i] : to_float(param[b + i]);
      g[i] = to_float(grad[b + i]);
      m[i] = to_float(exp_avg[b + i]);
      v[i] = to_float(exp_avg_sq[b + i]);
      vmax[i] = h.amsgrad ? to_float(max_exp_avg_sq[b + i]) : 0.0f;
    }
    if (has_grad_scale) {
      for (int64_t i = 0; i < n; ++i) g[i] = g[i] * inv_grad_scale;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) adam_update(p[i], g[i], m[i], v[i], vmax[i], h, s);
    for (int64_t i = 0; i < n; ++i) {
      if (master) master[b + i] = p[i];
      param[b + i] = from_float<P>(p[i]);
      exp_avg[b + i] = from_float<S>(m[i]);
      exp_avg_sq[b + i] = from_float<S>(v[i]);
      if (h.amsgrad) max_exp_avg_sq[b + i] = from_float<S>(vmax[i]);
    }
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
  const bool has_grad_scale = grad_scale.has_value();
  const float inv_grad_scale =
      has_grad_scale ? static_cast<float>(1.0 / grad_scale->item<double>()) : 1.0f;
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
    auto run = [&](auto state_tag) {
      using S = decltype(state_tag);
      for_each_chunk(params, [&](const Chunk& c) {
        const int64_t t = c.tensor;
        adam_chunk<P, S>(c, params[t].data_ptr<P>(), grads[t].const_data_ptr<P>(),
                         exp_avgs[t].data_ptr<S>(), exp_avg_sqs[t].data_ptr<S>(),
                         amsgrad ? max_exp_avg_sqs[t].data_ptr<S>() : nullptr,
                         has_master ? master_params[t].data_ptr<float>() : nullptr,
                         inv_grad_scale, has_grad_scale, h, per_tensor[t]);
      });
    };
    if (has_master) run(float{}); else run(P{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace fusedtech::cpu
