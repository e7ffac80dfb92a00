// LAMB, shared by the CPU and CUDA kernels. Math of torch_optimizer.Lamb (the default; what users
// of the technique call today), plus apex FusedLAMB's grad_averaging switch:
//   m = beta1 m + (1 - beta1) g        (grad_averaging; else m = beta1 m + g)
//   v = beta2 v + (1 - beta2) g^2
//   u = m / (sqrt(v) + eps) + wd p                     the Adam direction, "adam_step"
//   r = phi(||p||) / ||u||  (1 if either norm is 0; 1 with adam=True), phi = clamp(lower, upper)
//   p = p - (step_size * r) u,  step_size = lr (* sqrt(1 - beta2^t) / (1 - beta1^t) with debias)
// A step is three passes: (1) moments, and per-chunk partial sums of p^2 and u^2; (2) per-tensor
// norms and trust ratios; (3) the update, recomputing u from the stored moments (as many bytes as
// storing u, and no scratch tensor).
#pragma once

#include "fusedtech/common.h"

namespace fusedtech {

struct LambHyper {
  float beta1;
  float beta2;
  float grad_coef;  // 1 - beta1 with grad_averaging, else 1
  float one_minus_beta2;
  float eps;
  float weight_decay;
};

// u from the stored moments (pass 1, and again in pass 3).
FT_HD float lamb_direction(float param, float exp_avg, float exp_avg_sq, const LambHyper& h) {
  const float u = exp_avg / (ft_sqrt(exp_avg_sq) + h.eps);
  return ft_select(h.weight_decay != 0.0f, u + h.weight_decay * param, u);
}

// Pass 1, one element: updates the moments. The caller then takes u = lamb_direction(...) of the
// moments as stored (rounded to the state dtype), the same u pass 3 recomputes.
FT_HD void lamb_moments(float grad, float& exp_avg, float& exp_avg_sq, const LambHyper& h) {
  exp_avg = exp_avg * h.beta1 + h.grad_coef * grad;
  exp_avg_sq = exp_avg_sq * h.beta2 + h.one_minus_beta2 * grad * grad;
}

// Pass 2, once per tensor: phi(||p||) / ||u|| with torch_optimizer's zero-norm rule, in fp32 like
// its tensor arithmetic; the step's scalar is fp32(-step_size) * ratio, as torch_optimizer's alpha.
FT_HD float lamb_neg_step(float weight_norm, float update_norm, float clamp_lower, float clamp_upper,
                          bool adam, double step_size) {
  // fminf/fmaxf drop a NaN; torch.clamp keeps it (the whole tensor's step is then NaN, as torch_optimizer's).
  const float w = weight_norm != weight_norm ? weight_norm : fminf(fmaxf(weight_norm, clamp_lower), clamp_upper);
  const float ratio = (adam || w == 0.0f || update_norm == 0.0f) ? 1.0f : w / update_norm;
  return static_cast<float>(-step_size) * ratio;
}

FT_HD double lamb_step_size(double lr, double beta1, double beta2, double step, bool debias) {
  return debias ? lr * (sqrt(1.0 - pow(beta2, step)) / (1.0 - pow(beta1, step))) : lr;
}

}  // namespace fusedtech
