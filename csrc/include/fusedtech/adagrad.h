// Adagrad, element update shared by CPU and CUDA. Order of operations as torch.optim.Adagrad's
// single-tensor path: sum += grad * grad; param += (-clr * grad) / (sqrt(sum) + eps).
#pragma once

#include "fusedtech/common.h"

namespace fusedtech {

struct AdagradHyper {
  float eps;
  float weight_decay;
  bool maximize;
};

// -lr / (1 + (step - 1) * lr_decay), once per tensor, in double as torch does in Python floats.
FT_HD float adagrad_neg_clr(double lr, double lr_decay, double step) {
  return static_cast<float>(-(lr / (1.0 + (step - 1.0) * lr_decay)));
}

FT_HD void adagrad_update(float& param, float grad, float& sum, float neg_clr,
                          const AdagradHyper& h) {
  float g = ft_select(h.maximize, -grad, grad);
  g = ft_select(h.weight_decay != 0.0f, g + h.weight_decay * param, g);
  sum = sum + 1.0f * g * g;
  const float std = ft_sqrt(sum) + h.eps;
  param = param + (neg_clr * g) / std;
}

}  // namespace fusedtech
