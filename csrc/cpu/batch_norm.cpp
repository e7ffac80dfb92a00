// BatchNorm over dim 1 of an (N, C, *) tensor on CPU. The tensor is walked as (N, C, S) through its
// strides, in one of two shapes of loop:
//   channel runs (NCHW): each (n, c) is a contiguous run of S elements; one task per channel.
//   channel rows (channels_last, and (N, C)): each (n, s) is a contiguous row of C channels; rows are
//     cut into chunks fixed by the shape, each chunk sums into its own partials, and the partials are
//     added in chunk order.
// Sums are in double over eight lanes (element i goes to lane i % 8, lanes added in order at the
// end) so that the loops vectorise; the order depends on the shape only, so results are identical
// run to run and whatever the thread count. Elementwise math is in float (double for double).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fusedtech::cpu {
namespace {

constexpr int kLanes = 8;
constexpr int64_t kMaxChunks = 256;  // channel rows: partial sums kept per chunk of rows

template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct View {
  int64_t n, c, s;     // sizes
  int64_t sn, sc, ss;  // strides
  bool rows() const { return c == 1 || sc == 1; }  // channels contiguous within a row
  bool logical() const { return ss == 1 && sc == s && sn == c * s; }  // memory order = (n, c, s) order
  int64_t chunk_rows() const { return (n * s + kMaxChunks - 1) / kMaxChunks; }
  int64_t row_offset(int64_t r) const { return (r / s) * sn + (r % s) * ss; }
};

bool uniformly_strided(const at::Tensor& t) {
  for (int64_t d = 2; d + 1 < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != t.stride(d + 1) * t.size(d + 1)) return false;
  }
  return t.is_non_overlapping_and_dense();
}

View view_of(const at::Tensor& x) {
  View v{x.size(0), x.size(1), 1, x.stride(0), x.stride(1), 1};
  for (int64_t d = 2; d < x.dim(); ++d) v.s *= x.size(d);
  if (x.dim() > 2) v.ss = x.stride(x.dim() - 1);
  if (v.s == 1) v.ss = 1;
  // A run of S elements is contiguous only if ss == 1; rows need sc == 1. Anything else is copied.
  return v;
}

// The (N, C, S) view of x if its trailing dims form one uniformly strided run that one of the two
// loops walks (contiguous and channels_last tensors); otherwise of a contiguous copy.
std::pair<at::Tensor, View> channel_view(const at::Tensor& x_in, const char* name) {
  TORCH_CHECK(x_in.dim() >= 2, "fusedtech: batch_norm ", name, " must have at least 2 dims, got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "fusedtech: batch_norm (cpu) got ", name, " on ", x_in.device());
  at::Tensor x = x_in;
  if (!uniformly_strided(x)) x = x.contiguous();
  View v = view_of(x);
  if (!v.rows() && v.ss != 1) {
    x = x.contiguous();
    v = view_of(x);
  }
  return {x, v};
}

template <typename T>
inline double to_double(T v) {
  return static_cast<double>(static_cast<math_t<T>>(v));
}

inline double fold(const double* lanes) {
  double s = 0.0;
  for (int k = 0; k < kLanes; ++k) s += lanes[k];
  return s;
}

// For each channel c, K sums over its elements i: sums[j][c] = sum of f(c, p[i], q[i])[j] (q may
// be null: f sees 0), via eight lanes per channel run (NCHW) or per-chunk partials (rows). One pass
// however many sums (BatchNorm's backward needs two). p and q share the view's strides.
template <int K, typename T, typename F>
void channel_sums(const T* p, const T* q, const View& v, std::array<double*, K> sums, F f) {
  auto at = [&](int64_t c, int64_t i) { return f(c, to_double(p[i]), q ? to_double(q[i]) : 0.0); };
  if (!v.rows()) {
    at::parallel_for(0, v.c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        double lanes[K][kLanes] = {};
        for (int64_t n = 0; n < v.n; ++n) {
          const int64_t off = n * v.sn + c * v.sc;
          int64_t i = 0;
          for (; i + kLanes <= v.s; i += kLanes)
            for (int l = 0; l < kLanes; ++l) {
              const std::array<double, K> r = at(c, off + i + l);
              for (int j = 0; j < K; ++j) lanes[j][l] += r[j];
            }
          for (int l = 0; i < v.s; ++i, ++l) {
            const std::array<double, K> r = at(c, off + i);
            for (int j = 0; j < K; ++j) lanes[j][l] += r[j];
          }
        }
        for (int j = 0; j < K; ++j) sums[j][c] = fold(lanes[j]);
      }
    });
    return;
  }
  const int64_t rows = v.n * v.s, per_chunk = std::max<int64_t>(1, v.chunk_rows());
  const int64_t chunks = rows == 0 ? 0 : (rows + per_chunk - 1) / per_chunk;
  std::vector<double> partial(chunks * K * v.c, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      double* acc = partial.data() + k * K * v.c;  // [K][C] for this chunk
      for (int64_t r = k * per_chunk; r < std::min(rows, (k + 1) * per_chunk); ++r) {
        const int64_t off = v.row_offset(r);
        for (int64_t c = 0; c < v.c; ++c) {
          const std::array<double, K> x = at(c, off + c);
          for (int j = 0; j < K; ++j) acc[j * v.c + c] += x[j];
        }
      }
    }
  });
  for (int j = 0; j < K; ++j)
    for (int64_t c = 0; c < v.c; ++c) sums[j][c] = 0.0;
  for (int64_t k = 0; k < chunks; ++k)
    for (int j = 0; j < K; ++j)
      for (int64_t c = 0; c < v.c; ++c) sums[j][c] += partial[(k * K + j) * v.c + c];
}

// out[i] = g(c, in[i], aux[i]) elementwise, out/in/aux sharing the view's strides.
template <typename T, typename G>
void channel_map(const T* in, const T* aux, T* out, const View& v, G g) {
  if (!v.rows()) {
    at::parallel_for(0, v.n * v.c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t nc = lo; nc < hi; ++nc) {
        const int64_t c = nc % v.c, off = (nc / v.c) * v.sn + c * v.sc;
        for (int64_t s = 0; s < v.s; ++s) out[off + s] = g(c, in[off + s], aux ? aux[off + s] : T(0));
      }
    });
    return;
  }
  at::parallel_for(0, v.n * v.s, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, v.c)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t off = v.row_offset(r);
      for (int64_t c = 0; c < v.c; ++c) out[off + c] = g(c, in[off + c], aux ? aux[off + c] : T(0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x_in) {
  auto [x, v] = channel_view(x_in, "input");
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({v.c}, x.options().dtype(stat)), var = at::empty({v.c}, x.options().dtype(stat));
  const double count = static_cast<double>(v.n) * v.s;
  std::vector<double> mu(v.c), m2(v.c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cpu", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    channel_sums<1>(xp, static_cast<const scalar_t*>(nullptr), v, {mu.data()},
                    [](int64_t, double xv, double) { return std::array<double, 1>{xv}; });
    for (auto& m : mu) m = count > 0 ? m / count : 0.0;
    const double* mup = mu.data();
    channel_sums<1>(xp, static_cast<const scalar_t*>(nullptr), v, {m2.data()}, [mup](int64_t c, double xv, double) {
      const double d = xv - mup[c];
      return std::array<double, 1>{d * d};
    });
    stat_t* mp = mean.data_ptr<stat_t>();
    stat_t* vp = var.data_ptr<stat_t>();
    for (int64_t c = 0; c < v.c; ++c) {
      mp[c] = static_cast<stat_t>(mu[c]);
      vp[c] = static_cast<stat_t>(count > 0 ? m2[c] / count : 0.0);  // biased: what normalisation uses
    }
  });
  return {mean, var};
}

// Activation codes, shared with the Triton kernels: 0 none, 1 relu, 2 gelu, 3 silu. ReLU is applied
// in the normalising pass; GELU and SiLU by ATen's vectorised kernels on the pre-activation that
// pass writes (a scalar erf/exp per element here was 3-7x slower than torch's BN then GELU).
template <int Act, typename M>
inline M activate(M v) {
  if constexpr (Act == 1) return v > M(0) ? v : M(0);
  return v;
}

// Calls f(c, k, offset) for every element: k its logical (n, c, s) index, offset its address.
template <typename F>
void for_each_element(const View& v, F f) {
  if (!v.rows()) {
    at::parallel_for(0, v.n * v.c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t nc = lo; nc < hi; ++nc) {
        const int64_t c = nc % v.c, off = (nc / v.c) * v.sn + c * v.sc;
        for (int64_t s = 0; s < v.s; ++s) f(c, nc * v.s + s, off + s);
      }
    });
    return;
  }
  at::parallel_for(0, v.n * v.s, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, v.c)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t off = v.row_offset(r), n = r / v.s, s = r % v.s;
      for (int64_t c = 0; c < v.c; ++c) f(c, (n * v.c + c) * v.s + s, off + c);
    }
  });
}

// t in x's strides (one view walks both), or a contiguous pair.
void share_layout(at::Tensor& x, View& v, at::Tensor& t) {
  t = t.contiguous(x.suggest_memory_format());
  if (t.strides() != x.strides()) {
    x = x.contiguous();
    t = t.contiguous();
    v = view_of(x);
  }
}

// y = act(x * scale + shift + residual) per channel (scale = invstd w, shift = b - mean scale), in
// x's memory format; for ReLU also the packed mask of y > 0 (8 logical elements a byte).
std::tuple<at::Tensor, at::Tensor> batch_norm_act_apply_cpu(const at::Tensor& x_in, const at::Tensor& mean,
                                                            const at::Tensor& invstd,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            const std::optional<at::Tensor>& residual_in, int64_t act) {
  check_batch_norm_act(act, x_in, residual_in);
  if (act >= 2) {
    const at::Tensor pre = std::get<0>(batch_norm_act_apply_cpu(x_in, mean, invstd, weight, bias, residual_in, 0));
    return {act == 2 ? at::gelu(pre) : at::silu(pre), at::empty({0}, x_in.options().dtype(at::kByte))};
  }
  auto [x, v] = channel_view(x_in, "input");
  at::Tensor residual;
  if (residual_in) {
    residual = *residual_in;
    share_layout(x, v, residual);
  }
  at::Tensor y = at::empty_like(x);
  const int64_t total = x.numel();
  at::Tensor bits = at::zeros({act == 1 ? (total + 7) / 8 : 0}, x.options().dtype(at::kByte));
  const at::Tensor m = mean.to(at::kDouble), r = invstd.to(at::kDouble);
  const at::Tensor w = weight ? weight->to(at::kDouble) : at::ones({v.c}, x.options().dtype(at::kDouble));
  const at::Tensor b = bias ? bias->to(at::kDouble) : at::zeros({v.c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_apply_cpu", [&] {
    using mt = math_t<scalar_t>;
    const double *mp = m.const_data_ptr<double>(), *rp = r.const_data_ptr<double>(),
                 *wp = w.const_data_ptr<double>(), *bp = b.const_data_ptr<double>();
    std::vector<mt> scale(v.c), shift(v.c);
    for (int64_t c = 0; c < v.c; ++c) {
      const double k = rp[c] * wp[c];
      scale[c] = static_cast<mt>(k);
      shift[c] = static_cast<mt>(bp[c] - mp[c] * k);
    }
    const mt *sp = scale.data(), *hp = shift.data();
    const scalar_t* rs = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    auto run = [&](auto act_code) {
      constexpr int A = decltype(act_code)::value;
      channel_map<scalar_t>(x.const_data_ptr<scalar_t>(), rs, yp, v, [sp, hp, rs](int64_t c, scalar_t xv, scalar_t rv) {
        mt pre = static_cast<mt>(xv) * sp[c] + hp[c];
        if (rs) pre += static_cast<mt>(rv);
        return static_cast<scalar_t>(activate<A>(pre));
      });
    };
    if (act == 1) {
      run(std::integral_constant<int, 1>{});
    } else {
      run(std::integral_constant<int, 0>{});
    }
    if (act == 1) {  // torch's ReLU backward tests its output > 0; bytes in logical order, one task each
      uint8_t* bp8 = bits.data_ptr<uint8_t>();
      if (v.logical()) {  // memory order is logical order: eight neighbours a byte
        at::parallel_for(0, bits.numel(), 4096, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) {
            uint8_t byte = 0;
            for (int t = 0; t < 8; ++t)
              byte |= uint8_t((i * 8 + t < total && static_cast<mt>(yp[i * 8 + t]) > mt(0)) << t);
            bp8[i] = byte;
          }
        });
        return;
      }
      at::parallel_for(0, bits.numel(), 4096, [&](int64_t lo, int64_t hi) {
        int64_t k = lo * 8, s = k % v.s, c = (k / v.s) % v.c, n = k / (v.s * v.c);
        for (int64_t i = lo; i < hi; ++i) {
          uint8_t byte = 0;
          for (int t = 0; t < 8 && k < total; ++t, ++k) {
            if (static_cast<mt>(yp[n * v.sn + c * v.sc + s * v.ss]) > mt(0)) byte |= uint8_t(1u << t);
            if (++s == v.s) {  // step the logical index (n, c, s) without dividing
              s = 0;
              if (++c == v.c) c = 0, ++n;
            }
          }
          bp8[i] = byte;
        }
      });
    }
  });
  return {y, bits};
}

at::Tensor batch_norm_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  return std::get<0>(batch_norm_act_apply_cpu(x, mean, invstd, weight, bias, std::nullopt, 0));
}

// Training: dx = w invstd (dy - mean(dy) - xhat mean(dy xhat)); eval: dx = w invstd dy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const at::Tensor& mean, const at::Tensor& invstd,
                                                                 bool training) {
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "fusedtech: batch_norm grad has shape ", dy_in.sizes(), ", input ", x_in.sizes());
  auto [x, v] = channel_view(x_in, "input");
  at::Tensor dy = dy_in.contiguous(x.suggest_memory_format());
  if (dy.strides() != x.strides()) {  // one view walks x, dy and dx together
    x = x.contiguous();
    dy = dy.contiguous();
    v = view_of(x);
  }
  at::Tensor dx = at::empty_like(x);
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dw = at::empty({v.c}, x.options().dtype(stat)), db = at::empty({v.c}, x.options().dtype(stat));
  const at::Tensor m = mean.to(at::kDouble), r = invstd.to(at::kDouble);
  const at::Tensor w = weight ? weight->to(at::kDouble) : at::ones({v.c}, x.options().dtype(at::kDouble));
  const double count = static_cast<double>(v.n) * v.s;
  std::vector<double> sum_dy(v.c), sum_dy_xmu(v.c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_bwd_cpu", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using mt = math_t<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = dy.const_data_ptr<scalar_t>();
    const double *mp = m.const_data_ptr<double>(), *rp = r.const_data_ptr<double>(), *wp = w.const_data_ptr<double>();
    channel_sums<2>(gp, xp, v, {sum_dy.data(), sum_dy_xmu.data()},
                    [mp](int64_t c, double g, double xv) { return std::array<double, 2>{g, g * (xv - mp[c])}; });
    stat_t *dwp = dw.data_ptr<stat_t>(), *dbp = db.data_ptr<stat_t>();
    std::vector<mt> k1(v.c), k2(v.c), k3(v.c), mu(v.c);
    for (int64_t c = 0; c < v.c; ++c) {
      const double sum_dy_xhat = sum_dy_xmu[c] * rp[c];
      dwp[c] = static_cast<stat_t>(sum_dy_xhat);
      dbp[c] = static_cast<stat_t>(sum_dy[c]);
      const double k = wp[c] * rp[c];
      const double mean_dy = training && count > 0 ? sum_dy[c] / count : 0.0;
      const double mean_dy_xhat = training && count > 0 ? sum_dy_xhat / count : 0.0;
      // dx = k dy - k mean_dy - k mean_dy_xhat invstd (x - mean)
      k1[c] = static_cast<mt>(k);
      k2[c] = static_cast<mt>(k * mean_dy);
      k3[c] = static_cast<mt>(k * mean_dy_xhat * rp[c]);
      mu[c] = static_cast<mt>(mp[c]);
    }
    const mt *a = k1.data(), *bq = k2.data(), *cq = k3.data(), *up = mu.data();
    channel_map<scalar_t>(gp, xp, dx.data_ptr<scalar_t>(), v, [=](int64_t c, scalar_t g, scalar_t xv) {
      return static_cast<scalar_t>(a[c] * static_cast<mt>(g) - bq[c] - cq[c] * (static_cast<mt>(xv) - up[c]));
    });
  });
  return {dx, dw, db};
}

// The gradient at the pre-activation (ReLU: dy where its packed mask is set; GELU, SiLU: from the
// pre-activation recomputed as the forward wrote it, residual included), in x's dtype as torch's
// activation backward gives it, then BatchNorm's backward. Returns (dx, dw, db, dresidual or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_bwd_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& extra, bool has_residual, int64_t act, bool training) {
  check_batch_norm_act_bwd(act, dy_in, x_in, extra);
  at::Tensor g = dy_in;
  if (act >= 2) {  // the pre-activation recomputed in one pass, then ATen's activation backward
    const at::Tensor pre = std::get<0>(batch_norm_act_apply_cpu(x_in, mean, invstd, weight, bias, extra, 0));
    g = act == 2 ? at::gelu_backward(dy_in, pre) : at::silu_backward(dy_in, pre);
  } else if (act == 1) {
    auto [x, v] = channel_view(x_in, "input");
    at::Tensor dy = dy_in;
    share_layout(x, v, dy);
    g = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_grad_cpu", [&] {
      const scalar_t* gp = dy.const_data_ptr<scalar_t>();
      const uint8_t* bits = extra->const_data_ptr<uint8_t>();
      scalar_t* op = g.data_ptr<scalar_t>();
      if (v.logical()) {
        at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t lo, int64_t hi) {
          for (int64_t k = lo; k < hi; ++k) op[k] = (bits[k >> 3] >> (k & 7)) & 1 ? gp[k] : scalar_t(0);
        });
        return;
      }
      for_each_element(v, [&](int64_t, int64_t k, int64_t off) {
        op[off] = (bits[k >> 3] >> (k & 7)) & 1 ? gp[off] : scalar_t(0);
      });
    });
  }
  auto [dx, dw, db] = batch_norm_bwd_cpu(g, x_in, weight, mean, invstd, training);
  // The residual's gradient is the pre-activation's (a copy of dy without an activation: never an alias).
  at::Tensor dres = !has_residual ? at::empty({0}, dy_in.options()) : (act == 0 ? dy_in.clone() : g);
  return {dx, dw, db, dres};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_apply", &batch_norm_apply_cpu);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cpu);
  m.impl("batch_norm_act_apply", &batch_norm_act_apply_cpu);
  m.impl("batch_norm_act_bwd", &batch_norm_act_bwd_cpu);
}

}  // namespace fusedtech::cpu
