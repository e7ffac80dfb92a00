// Norm reductions shared by the CPU and CUDA multi-tensor norm: what one element contributes and
// how two partial results combine, for the 2-norm (sum of squares) and the inf-norm (max |x|).
#pragma once

#include "fusedtech/common.h"

namespace fusedtech {

// NaN-propagating max of magnitudes (torch's inf-norm of a tensor holding NaN is NaN).
FT_HD float norm_combine_inf(float a, float b) { return ft_max(a, b); }

FT_HD float norm_element(float x, bool inf_norm) { return inf_norm ? fabsf(x) : x * x; }

}  // namespace fusedtech
