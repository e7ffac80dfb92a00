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

// The memory-saving backward's xhat from the forward's output: (y - b) / w, as (y - b) * (1 / w)
// with the reciprocal taken once per column (b = 0 without a bias, 1 / w = 1 without a weight).
template <typename A>
FT_HD A xhat_from_output(A y, A b, A winv) {
  return (y - b) * winv;
}

// Mean and sum of squared deviations of count > 0 values from their shifted sums s1 = sum(x - shift)
// and s2 = sum((x - shift)^2), one pass. With shift one of the values, s2 - s1^2 / count has none
// of the cancellation a plain sum of squares suffers when |mean| >> std.
// The shift of shifted_moments: one of the values (x0), or 0 when x0 is not finite: an infinite shift
// would make every x - shift infinite or NaN, and the mean NaN where torch's is +-inf.
FT_HD double moment_shift(double x0) { return x0 - x0 == 0.0 ? x0 : 0.0; }

struct Moments {
  double mean, m2;
};

FT_HD Moments shifted_moments(double shift, double s1, double s2, double count) {
  const double d = s1 / count;
  // Squares that overflow (float64 values past 1e154) with finite values: an infinite sum of
  // squared deviations, as torch's Welford gives (s1 * d may overflow too, and inf - inf is NaN).
  // An infinite value (s1 infinite too: s1 - s1 is NaN) stays inf - inf = NaN, as torch's.
  const bool squares_overflow = s2 == static_cast<double>(INFINITY) && s1 - s1 == 0.0;
  const double m2 = squares_overflow ? s2 : s2 - s1 * d;
  // Only a negative rounding residue is clamped; a NaN (a row holding NaN or +-inf) must stay NaN
  // so the outputs and running statistics are NaN as torch's.
  return {shift + d, m2 < 0.0 ? 0.0 : m2};
}

}  // namespace fusedtech
