// GroupNorm + activation element math shared by the CPU and CUDA kernels: the activations (codes as
// BatchNorm's: 0 none, 1 relu, 2 exact gelu, 3 silu) and their gradients, and the Welford / Chan
// merge of (count, mean, m2) partials. The affine step and the dx formula are LayerNorm's
// (norm.h: norm_forward, norm_backward), with c1, c2 the means over a group instead of a row.
#pragma once

#include "fusedtech/common.h"
#include "fusedtech/norm.h"

namespace fusedtech {

// The functions the activations need, for float and double. The templates below take them as a
// parameter M so that the CPU kernels can pass at::vec versions that work on a vector at a time.
struct ScalarMath {
  FT_HD static float exp(float x) {
#if defined(__CUDA_ARCH__)
    return expf(x);
#else
    return std::exp(x);
#endif
  }
  FT_HD static double exp(double x) {
#if defined(__CUDA_ARCH__)
    return ::exp(x);
#else
    return std::exp(x);
#endif
  }
  FT_HD static float erf(float x) {
#if defined(__CUDA_ARCH__)
    return erff(x);
#else
    return std::erf(x);
#endif
  }
  FT_HD static double erf(double x) {
#if defined(__CUDA_ARCH__)
    return ::erf(x);
#else
    return std::erf(x);
#endif
  }
  // torch.relu keeps NaN; the gradient mask is torch.where(pre > 0, g, 0), 0 where pre is NaN.
  template <typename A>
  FT_HD static A relu(A v) {
    return (v != v || v > A(0)) ? v : A(0);
  }
  template <typename A>
  FT_HD static A where_positive(A pre, A g) {
    return pre > A(0) ? g : A(0);
  }
};

// act(v), in the oracle's order of operations (torch's CPU gelu and silu kernels').
template <int Act, typename M = ScalarMath, typename V>
FT_HD V gn_activate(V v) {
  if constexpr (Act == 1) {
    return M::relu(v);
  } else if constexpr (Act == 2) {
    return v * V(0.5) * (V(1) + M::erf(v * V(0.7071067811865476)));
  } else if constexpr (Act == 3) {
    return v / (V(1) + M::exp(V(0) - v));
  } else {
    return v;
  }
}

// dz = g * act'(pre), the gradient at the pre-activation from the output's gradient g.
template <int Act, typename M = ScalarMath, typename V>
FT_HD V gn_activation_grad(V g, V pre) {
  if constexpr (Act == 1) {
    return M::where_positive(pre, g);
  } else if constexpr (Act == 2) {
    const V cdf = V(0.5) * (V(1) + M::erf(pre * V(0.7071067811865476)));
    return g * (cdf + pre * M::exp(V(-0.5) * pre * pre) * V(0.3989422804014327));
  } else if constexpr (Act == 3) {
    const V sig = V(1) / (V(1) + M::exp(V(0) - pre));
    return g * (sig * (V(1) + pre * (V(1) - sig)));
  } else {
    return g;
  }
}

// (count, mean, sum of squared deviations) of a set of values. Partials of disjoint sets merge
// exactly (Chan et al.); with no E[x^2] - E[x]^2 there is no cancellation when |mean| >> std.
template <typename A>
struct Welford {
  A n, mean, m2;
};

template <typename A>
FT_HD Welford<A> welford_merge(Welford<A> a, Welford<A> b) {
  const A n = a.n + b.n;
  if (n == A(0)) return {A(0), A(0), A(0)};
  const A delta = b.mean - a.mean, fb = b.n / n;
  // (delta * fb) * (delta * a.n): an empty side gives 0 * finite, where delta * delta could
  // overflow and make inf * 0 = NaN.
  return {n, a.mean + delta * fb, a.m2 + b.m2 + (delta * fb) * (delta * a.n)};
}

// One value x into s, whose count s.n already includes it; inv_n = 1 / s.n is passed in so that
// several states stepping in lockstep (a thread's channels) share one division.
template <typename A>
FT_HD void welford_step(Welford<A>& s, A x, A inv_n) {
  const A d = x - s.mean;
  s.mean += d * inv_n;
  s.m2 += d * (x - s.mean);
}

}  // namespace fusedtech
