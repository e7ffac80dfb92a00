// RMSprop (plain, centered, with momentum), element update shared by CPU and CUDA.
// Order of operations as torch.optim.RMSprop's single-tensor path.
#pragma once

#include "fusedtech/common.h"

namespace fusedtech {

struct RmspropHyper {
  float neg_lr;
  float alpha;
  float one_minus_alpha;
  float eps;
  float weight_decay;
  float momentum;
  bool maximize;
};

// centered / has_momentum are template parameters of the callers (they decide which buffers exist).
FT_HD void rmsprop_update(float& param, float grad, float& square_avg, float& grad_avg,
                          float& buf, bool centered, bool has_momentum, const RmspropHyper& h) {
  float g = ft_select(h.maximize, -grad, grad);
  g = ft_select(h.weight_decay != 0.0f, g + h.weight_decay * param, g);
  square_avg = square_avg * h.alpha + h.one_minus_alpha * g * g;
  float avg;
  if (centered) {
    grad_avg = ft_lerp(grad_avg, g, h.one_minus_alpha);
    avg = ft_sqrt(square_avg + (-1.0f * grad_avg) * grad_avg);
  } else {
    avg = ft_sqrt(square_avg);
  }
  avg = avg + h.eps;
  if (has_momentum) {
    buf = buf * h.momentum + g / avg;
    param = param + h.neg_lr * buf;
  } else {
    param = param + (h.neg_lr * g) / avg;
  }
}

}  // namespace fusedtech
