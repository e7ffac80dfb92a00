// LAMB, shared by the CPU and CUDA kernels. Math of torch_optimizer.Lamb (the default; what users
// of the technique call today), plus apex FusedLAMB's grad_averaging switch and timm's Lamb modes:
//   m = beta1 m + (1 - beta1) g        (grad_averaging; else m = beta1 m + g)
//   v = beta2 v + (1 - beta2) g^2
//   u = m / (sqrt(v) + eps) + wd p                     the Adam direction, "adam_step"
//     = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd p with bias_correction (timm), bc = 1 - beta^t
//   r = phi(||p||) / ||u||  (1 if either norm is 0), phi = clamp(lower, upper); min(r, 1) with
//       trust_clip (timm's LAMBC); the kernel applies 1 instead with adam=True
//   p = p - (step_size * r) u,  step_size = lr (* sqrt(1 - beta2^t) / (1 - beta1^t) with debias)
// A step is three passes: (1) moments, and per-chunk partial sums of p^2 and u^2; (2) per-tensor
// norms and trust ratios, written out as (phi(||p||), ||u||, r) per tensor (torch_optimizer's
// weight_norm, adam_norm, trust_ratio state); (3) the update, recomputing u from the stored moments
// (as many bytes as storing u, and no scratch tensor).
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

// One tensor's bias corrections for bias_correction (timm): m / bc1 and sqrt(v) / sqrt(bc2), as
// timm divides by them (fp32 division by the fp64 value rounded to fp32). Without it both are 1,
// and dividing by 1 changes nothing, so one formula serves both modes.
struct LambCorrection {
  float bc1;
  float sqrt_bc2;
};

FT_HD LambCorrection lamb_correction(double beta1, double beta2, double step, bool bias_correction) {
  if (!bias_correction) return {1.0f, 1.0f};
  return {static_cast<float>(1.0 - pow(beta1, step)), static_cast<float>(sqrt(1.0 - pow(beta2, step)))};
}

// u from the stored moments (pass 1, and again in pass 3).
FT_HD float lamb_direction(float param, float exp_avg, float exp_avg_sq, const LambHyper& h,
                           const LambCorrection& c) {
  const float u = (exp_avg / c.bc1) / (ft_sqrt(exp_avg_sq) / c.sqrt_bc2 + h.eps);
  return ft_select(h.weight_decay != 0.0f, u + h.weight_decay * param, u);
}

// Pass 1, one element: updates the moments. The caller then takes u = lamb_direction(...) of the
// moments as stored (rounded to the state dtype), the same u pass 3 recomputes.
FT_HD void lamb_moments(float grad, float& exp_avg, float& exp_avg_sq, const LambHyper& h) {
  exp_avg = exp_avg * h.beta1 + h.grad_coef * grad;
  exp_avg_sq = exp_avg_sq * h.beta2 + h.one_minus_beta2 * grad * grad;
}

// Pass 2, once per tensor: phi(||p||) / ||u|| with torch_optimizer's zero-norm rule, in fp32 like
// its tensor arithmetic. `norms` gets what torch_optimizer keeps in its state: the clamped weight
// norm, the update norm and the ratio as computed (before adam=True replaces it with 1, as
// torch_optimizer stores it). Returns the step's scalar fp32(-step_size) * ratio, as
// torch_optimizer's alpha.
FT_HD float lamb_neg_step(float weight_norm, float update_norm, float clamp_lower, float clamp_upper,
                          bool adam, bool trust_clip, double step_size, float* norms) {
  // fminf/fmaxf drop a NaN; torch.clamp keeps it (the whole tensor's step is then NaN, as torch_optimizer's).
  const float w = weight_norm != weight_norm ? weight_norm : fminf(fmaxf(weight_norm, clamp_lower), clamp_upper);
  float ratio = (w == 0.0f || update_norm == 0.0f) ? 1.0f : w / update_norm;
  if (trust_clip && ratio > 1.0f) ratio = 1.0f;  // torch.clamp(max=1): a NaN stays NaN
  norms[0] = w;
  norms[1] = update_norm;
  norms[2] = ratio;
  return static_cast<float>(-step_size) * (adam ? 1.0f : ratio);
}

FT_HD double lamb_step_size(double lr, double beta1, double beta2, double step, bool debias) {
  return debias ? lr * (sqrt(1.0 - pow(beta2, step)) / (1.0 - pow(beta1, step))) : lr;
}

}  // namespace fusedtech
