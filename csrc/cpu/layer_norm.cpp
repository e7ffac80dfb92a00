// LayerNorm / RMSNorm forward and backward on CPU tensors: rows in parallel, statistics and
// accumulation in double for every input dtype (cheap on a CPU, and float64 inputs need it for
// gradcheck). dweight/dbias are reduced over a fixed number of row blocks, then summed in order:
// the same result whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "fusedtech/norm.h"

namespace fusedtech::cpu {
namespace {

constexpr int64_t kRowBlocks = 64;  // fixed: the dweight/dbias summation order depends on it only

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fusedtech: layer_norm expects a contiguous 2-D (rows, n) input, got ",
              x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "fusedtech: layer_norm (cpu) got input on ", x.device());
  for (const auto& [t, name] : {std::pair{weight, "weight"}, std::pair{bias, "bias"}}) {
    if (!t) continue;
    TORCH_CHECK(t->numel() == x.size(1), "fusedtech: ", name, " has ", t->numel(), " elements, expected ", x.size(1));
    TORCH_CHECK(t->device() == x.device(), "fusedtech: ", name, " is on ", t->device(), " but input is on ", x.device());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias, double eps,
                                                                 bool rms) {
  check_inputs(x, weight, bias);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor y = at::empty_like(x);
  // Statistics are saved in fp32 (float64 for float64 input).
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::zeros({rows}, x.options().dtype(stat));
  at::Tensor rstd = at::zeros({rows}, x.options().dtype(stat));
  if (rows == 0 || n == 0) return {y, mean, rstd};
  const at::Tensor w = weight ? weight->to(at::kDouble).contiguous() : at::Tensor();
  const at::Tensor b = bias ? bias->to(at::kDouble).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const double* wp = weight ? w.const_data_ptr<double>() : nullptr;
    const double* bp = bias ? b.const_data_ptr<double>() : nullptr;
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    stat_t* mp = mean.data_ptr<stat_t>();
    stat_t* rp = rstd.data_ptr<stat_t>();
    at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* xr = xp + r * n;
        double mu = 0.0;
        if (!rms) {
          for (int64_t j = 0; j < n; ++j) mu += static_cast<double>(xr[j]);
          mu /= n;
        }
        double var = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          const double d = static_cast<double>(xr[j]) - mu;
          var += d * d;
        }
        const double rs = 1.0 / std::sqrt(var / n + eps);
        for (int64_t j = 0; j < n; ++j) {
          yp[r * n + j] = static_cast<scalar_t>(
              norm_forward<double>(static_cast<double>(xr[j]), mu, rs, wp ? wp[j] : 1.0, bp ? bp[j] : 0.0));
        }
        mp[r] = static_cast<stat_t>(mu);
        rp[r] = static_cast<stat_t>(rs);
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const at::Tensor& mean, const at::Tensor& rstd,
                                                                 bool rms, bool has_bias) {
  check_inputs(x, weight, std::nullopt);
  TORCH_CHECK(dy_in.sizes() == x.sizes(), "fusedtech: grad has shape ", dy_in.sizes(), " but input has ", x.sizes());
  const at::Tensor dy = dy_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dx = at::empty_like(x);
  const int64_t blocks = std::max<int64_t>(1, std::min(kRowBlocks, rows));
  const int64_t per_block = (rows + blocks - 1) / std::max<int64_t>(blocks, 1);
  at::Tensor dw_part = at::zeros({blocks, n}, x.options().dtype(at::kDouble));
  at::Tensor db_part = at::zeros({blocks, n}, x.options().dtype(at::kDouble));
  const at::Tensor w = weight ? weight->to(at::kDouble).contiguous() : at::Tensor();
  if (rows > 0 && n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gp = dy.const_data_ptr<scalar_t>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      const double* wp = weight ? w.const_data_ptr<double>() : nullptr;
      using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const stat_t* mp = mean.const_data_ptr<stat_t>();
      const stat_t* rp = rstd.const_data_ptr<stat_t>();
      double* dwp = dw_part.data_ptr<double>();
      double* dbp = db_part.data_ptr<double>();
      at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t blk = lo; blk < hi; ++blk) {
          for (int64_t r = blk * per_block; r < std::min(rows, (blk + 1) * per_block); ++r) {
            const double mu = rms ? 0.0 : mp[r], rs = rp[r];
            double c1 = 0.0, c2 = 0.0;
            for (int64_t j = 0; j < n; ++j) {
              const double xhat = (static_cast<double>(xp[r * n + j]) - mu) * rs;
              const double wdy = static_cast<double>(gp[r * n + j]) * (wp ? wp[j] : 1.0);
              c1 += xhat * wdy;
              c2 += wdy;
            }
            c1 /= n;
            c2 = rms ? 0.0 : c2 / n;
            for (int64_t j = 0; j < n; ++j) {
              const double g = static_cast<double>(gp[r * n + j]);
              const double xhat = (static_cast<double>(xp[r * n + j]) - mu) * rs;
              dxp[r * n + j] = static_cast<scalar_t>(norm_backward<double>(g * (wp ? wp[j] : 1.0), xhat, c1, c2, rs));
              dwp[blk * n + j] += g * xhat;
              dbp[blk * n + j] += g;
            }
          }
        }
      });
    });
  }
  // Absent gradients are (distinct) empty tensors: an op's outputs may not alias one another.
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = x.options().dtype(stat);
  return {dx, weight ? dw_part.sum(0).to(stat) : at::empty({0}, opts),
          has_bias ? db_part.sum(0).to(stat) : at::empty({0}, opts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace fusedtech::cpu
