// LayerNorm / RMSNorm element math shared by the CPU and CUDA kernels (the row reductions that
// feed it are each executor's own: OpenMP over rows, or a block per row).
#pragma once

#include "fusedtech/common.h"

namespace fusedtech {

// y = (x - mean) * rstd * w + b; RMSNorm passes mean = 0 and no bias.
template <typename A>
FT_HD A norm_forward(A x, A mean, A rstd, A w, A b) {
  return (x - mean) * rstd * w + b;
}

// dx = (w dy - (xhat c1 + c2)) rstd, with c1 = mean(xhat * w dy), c2 = mean(w dy) over the row
// (RMSNorm: c2 = 0).
template <typename A>
FT_HD A norm_backward(A wdy, A xhat, A c1, A c2, A rstd) {
  return (wdy - (xhat * c1 + c2)) * rstd;
}

}  // namespace fusedtech
