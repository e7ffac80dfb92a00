// SGD with momentum / Nesterov, element update shared by the CPU executor and the CUDA kernel.
// Order of operations as torch.optim.SGD's single-tensor path: grad (+ wd * param), then
// buf = buf * momentum + (1 - dampening) * grad (or buf = grad on the first step), then
// param += -lr * (nesterov ? grad + momentum * buf : buf).
#pragma once

#include "fusedtech/common.h"

namespace fusedtech {

struct SgdHyper {
  float neg_lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  bool nesterov;
  bool maximize;
  bool first_step;  // momentum buffers are being created: buf = grad, exactly (torch clones)
};

// has_momentum is a template parameter of the callers (it decides whether a buffer exists).
FT_HD void sgd_update(float& param, float grad, float& buf, bool has_momentum, const SgdHyper& h) {
  float g = ft_select(h.maximize, -grad, grad);
  g = ft_select(h.weight_decay != 0.0f, g + h.weight_decay * param, g);
  if (has_momentum) {
    buf = ft_select(h.first_step, g, buf * h.momentum + h.one_minus_dampening * g);
    g = ft_select(h.nesterov, g + h.momentum * buf, buf);
  }
  param = param + h.neg_lr * g;
}

}  // namespace fusedtech
