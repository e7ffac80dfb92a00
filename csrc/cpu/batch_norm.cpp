// BatchNorm over dim 1 of an (N, C, *) tensor on CPU, in NCHW or channels_last memory alike: the
// tensor is walked as (N, C, S) through its strides. Statistics in double, one channel per task,
// elements summed in a fixed order: deterministic whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>

namespace fusedtech::cpu {
namespace {

struct View {
  int64_t n, c, s;     // sizes
  int64_t sn, sc, ss;  // strides
};

// The (N, C, S) view of x, if its trailing dims form one uniformly strided run (true for
// contiguous and channels_last tensors); otherwise of a contiguous copy.
std::pair<at::Tensor, View> channel_view(const at::Tensor& x_in, const char* name) {
  TORCH_CHECK(x_in.dim() >= 2, "fusedtech: batch_norm ", name, " must have at least 2 dims, got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "fusedtech: batch_norm (cpu) got ", name, " on ", x_in.device());
  at::Tensor x = x_in;
  auto uniform = [](const at::Tensor& t) {
    for (int64_t d = 2; d + 1 < t.dim(); ++d) {
      if (t.size(d) != 1 && t.stride(d) != t.stride(d + 1) * t.size(d + 1)) return false;
    }
    return t.is_non_overlapping_and_dense();
  };
  if (!uniform(x)) x = x.contiguous();
  View v{x.size(0), x.size(1), 1, x.stride(0), x.stride(1), 1};
  for (int64_t d = 2; d < x.dim(); ++d) v.s *= x.size(d);
  if (x.dim() > 2) v.ss = x.stride(x.dim() - 1);
  return {x, v};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x_in) {
  auto [x, v] = channel_view(x_in, "input");
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({v.c}, x.options().dtype(stat)), var = at::empty({v.c}, x.options().dtype(stat));
  const double count = static_cast<double>(v.n) * v.s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cpu", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    stat_t* mp = mean.data_ptr<stat_t>();
    stat_t* vp = var.data_ptr<stat_t>();
    at::parallel_for(0, v.c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        double sum = 0.0;
        for (int64_t n = 0; n < v.n; ++n)
          for (int64_t s = 0; s < v.s; ++s) sum += static_cast<double>(xp[n * v.sn + c * v.sc + s * v.ss]);
        const double mu = count > 0 ? sum / count : 0.0;
        double m2 = 0.0;
        for (int64_t n = 0; n < v.n; ++n)
          for (int64_t s = 0; s < v.s; ++s) {
            const double d = static_cast<double>(xp[n * v.sn + c * v.sc + s * v.ss]) - mu;
            m2 += d * d;
          }
        mp[c] = static_cast<stat_t>(mu);
        vp[c] = static_cast<stat_t>(count > 0 ? m2 / count : 0.0);  // biased: what normalisation uses
      }
    });
  });
  return {mean, var};
}

// y = (x - mean) * invstd * w + b, per channel; in x's memory format.
at::Tensor batch_norm_apply_cpu(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  auto [x, v] = channel_view(x_in, "input");
  at::Tensor y = at::empty_like(x);
  const at::Tensor m = mean.to(at::kDouble), r = invstd.to(at::kDouble);
  const at::Tensor w = weight ? weight->to(at::kDouble) : at::ones({v.c}, x.options().dtype(at::kDouble));
  const at::Tensor b = bias ? bias->to(at::kDouble) : at::zeros({v.c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_apply_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const double *mp = m.const_data_ptr<double>(), *rp = r.const_data_ptr<double>(),
                 *wp = w.const_data_ptr<double>(), *bp = b.const_data_ptr<double>();
    at::parallel_for(0, v.c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const double scale = rp[c] * wp[c], shift = bp[c] - mp[c] * scale;
        for (int64_t n = 0; n < v.n; ++n)
          for (int64_t s = 0; s < v.s; ++s) {
            const int64_t i = n * v.sn + c * v.sc + s * v.ss;
            yp[i] = static_cast<scalar_t>(static_cast<double>(xp[i]) * scale + shift);
          }
      }
    });
  });
  return y;
}

// Training: dx = w invstd (dy - mean(dy) - xhat mean(dy xhat)); eval: dx = w invstd dy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const at::Tensor& mean, const at::Tensor& invstd,
                                                                 bool training) {
  auto [x, v] = channel_view(x_in, "input");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "fusedtech: batch_norm grad has shape ", dy_in.sizes(), ", input ", x_in.sizes());
  const at::Tensor dy = dy_in.contiguous(x.suggest_memory_format());
  auto [dyv, vd] = channel_view(dy, "grad");
  at::Tensor dx = at::empty_like(x);
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dw = at::empty({v.c}, x.options().dtype(stat)), db = at::empty({v.c}, x.options().dtype(stat));
  const at::Tensor m = mean.to(at::kDouble), r = invstd.to(at::kDouble);
  const at::Tensor w = weight ? weight->to(at::kDouble) : at::ones({v.c}, x.options().dtype(at::kDouble));
  const double count = static_cast<double>(v.n) * v.s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_bwd_cpu", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = dyv.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const double *mp = m.const_data_ptr<double>(), *rp = r.const_data_ptr<double>(), *wp = w.const_data_ptr<double>();
    stat_t *dwp = dw.data_ptr<stat_t>(), *dbp = db.data_ptr<stat_t>();
    at::parallel_for(0, v.c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        double sum_dy = 0.0, sum_dy_xhat = 0.0;
        for (int64_t n = 0; n < v.n; ++n)
          for (int64_t s = 0; s < v.s; ++s) {
            const double g = static_cast<double>(gp[n * vd.sn + c * vd.sc + s * vd.ss]);
            sum_dy += g;
            sum_dy_xhat += g * (static_cast<double>(xp[n * v.sn + c * v.sc + s * v.ss]) - mp[c]) * rp[c];
          }
        dwp[c] = static_cast<stat_t>(sum_dy_xhat);
        dbp[c] = static_cast<stat_t>(sum_dy);
        const double k = wp[c] * rp[c];
        const double mean_dy = training && count > 0 ? sum_dy / count : 0.0;
        const double mean_dy_xhat = training && count > 0 ? sum_dy_xhat / count : 0.0;
        for (int64_t n = 0; n < v.n; ++n)
          for (int64_t s = 0; s < v.s; ++s) {
            const int64_t i = n * v.sn + c * v.sc + s * v.ss;
            const double g = static_cast<double>(gp[n * vd.sn + c * vd.sc + s * vd.ss]);
            const double xhat = (static_cast<double>(xp[i]) - mp[c]) * rp[c];
            dxp[i] = static_cast<scalar_t>(training ? k * (g - mean_dy - xhat * mean_dy_xhat) : k * g);
          }
      }
    });
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_apply", &batch_norm_apply_cpu);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cpu);
}

}  // namespace fusedtech::cpu
