// Adam / AdamW element update, shared by the CPU executor and the CUDA kernel.
//
// The order of operations follows torch.optim.Adam's single-tensor path so that fp32 results
// agree with torch to rounding: lerp for the first moment, mul-then-addcmul for the second,
// sqrt / bias_correction2_sqrt + eps for the denominator, and addcdiv's (value * m) / denom.
#pragma once

#include "fusedtech/common.h"

namespace fusedtech {

struct AdamHyper {
  float beta1;
  float beta2;
  float one_minus_beta1;  // lerp weight, rounded once like torch's Scalar argument
  float one_minus_beta2;
  float eps;
  float weight_decay;
  bool decoupled;  // AdamW: param *= 1 - lr * wd instead of grad += wd * param
  bool amsgrad;
  bool maximize;
};

// The launchers' AdamHyper from the op's arguments (1 - beta rounded once from double, as torch's Scalar).
inline AdamHyper adam_hyper(double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad,
                            bool maximize) {
  return AdamHyper{static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta1),
                   static_cast<float>(1.0 - beta2), static_cast<float>(eps), static_cast<float>(weight_decay),
                   decoupled, amsgrad, maximize};
}

// Depends on the tensor's step, not on the element: computed once per tensor (per CUDA block or
// CPU chunk), in double as torch does it in Python floats.
struct AdamTensorScalars {
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bias_correction2_sqrt;
  float decay_factor;  // 1 - lr * wd (AdamW only)
};

FT_HD AdamTensorScalars adam_tensor_scalars(double lr, double beta1, double beta2,
                                            double weight_decay, double step) {
  AdamTensorScalars s;
  const double bias_correction1 = 1.0 - pow(beta1, step);
  const double bias_correction2 = 1.0 - pow(beta2, step);
  s.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  s.bias_correction2_sqrt = static_cast<float>(sqrt(bias_correction2));
  s.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  return s;
}

// One element. `grad` arrives unscaled (GradScaler's division happens in the caller's load).
// Options are applied as selects, not branches: the CPU loops then if-convert and vectorise, and
// on the GPU the conditions are uniform across a warp anyway. Each select keeps torch's exact
// arithmetic for the option it stands for (nothing is multiplied by 1 or added as 0).
FT_HD void adam_update(float& param, float grad, float& exp_avg, float& exp_avg_sq,
                       float& max_exp_avg_sq, const AdamHyper& h, const AdamTensorScalars& s) {
  const bool decay = h.weight_decay != 0.0f;
  float p = param;
  float g = ft_select(h.maximize, -grad, grad);
  g = ft_select(decay & !h.decoupled, g + h.weight_decay * p, g);
  p = ft_select(decay & h.decoupled, p * s.decay_factor, p);
  const float m = ft_lerp(exp_avg, g, h.one_minus_beta1);
  const float v = exp_avg_sq * h.beta2 + h.one_minus_beta2 * g * g;
  const float vmax = ft_max(max_exp_avg_sq, v);
  const float second = ft_select(h.amsgrad, vmax, v);
  const float denom = ft_sqrt(second) / s.bias_correction2_sqrt + h.eps;
  param = p + (s.neg_step_size * m) / denom;
  exp_avg = m;
  exp_avg_sq = v;
  max_exp_avg_sq = ft_select(h.amsgrad, vmax, max_exp_avg_sq);
}

}  // namespace fusedtech
