// LayerNorm / RMSNorm forward and backward on CPU tensors: rows in parallel, statistics and
// accumulation in double for every input dtype (float64 inputs need it for gradcheck). Row sums go
// over eight lanes (element j to lane j % 8, lanes added in order) so that they vectorise; a
// single running sum was latency-bound, 4x slower than torch's forward. dweight/dbias are reduced
// over a fixed number of row blocks, then summed in order: the same result whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "fusedtech/norm.h"
#include "fusedtech/philox.h"
#include "lanes.h"

namespace fusedtech::cpu {
namespace {

// dweight/dbias partial sums: one per block of at least kRowsPerBlock rows, at most kRowBlocks
// blocks (a function of the shape only, so is the summation order). Few rows per block made the
// double partials as large as the input (256 x 4096: 64 blocks of 4 rows).
constexpr int64_t kRowBlocks = 64;
constexpr int64_t kRowsPerBlock = 32;

// K sums over j < n of f(j)[k] in one pass: element j goes to lane j % 8 (f8(j) gives the eight
// of j .. j + 7 at once), lanes added in order at the end: the order depends on n only.
template <int K, typename F8, typename F>
inline std::array<double, K> row_sums(int64_t n, F8 f8, F f) {
  std::array<lanes8, K> acc;
  acc.fill(zero8());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const std::array<lanes8, K> r = f8(j);
    for (int k = 0; k < K; ++k) acc[k] += r[k];
  }
  for (int l = 0; j < n; ++j, ++l) {
    const std::array<double, K> r = f(j);
    for (int k = 0; k < K; ++k) acc[k][l] += r[k];
  }
  std::array<double, K> out;
  for (int k = 0; k < K; ++k) out[k] = fold8(acc[k]);
  return out;
}

template <typename F8, typename F>
inline double row_sum(int64_t n, F8 f8, F f) {
  return row_sums<1>(
      n, [&](int64_t j) { return std::array<lanes8, 1>{f8(j)}; }, [&](int64_t j) { return std::array<double, 1>{f(j)}; })[0];
}

// weight (or ones) and bias (or zeros) as n doubles: the element loops need no branch.
at::Tensor as_double(const std::optional<at::Tensor>& t, int64_t n, double fill, const at::Tensor& like) {
  return t ? t->to(at::kDouble).contiguous() : at::full({n}, fill, like.options().dtype(at::kDouble));
}

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

template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One row: mean and rstd from sums in double, then y = norm(x) with the elementwise math in float
// (double for double) as torch's.
template <typename scalar_t, typename mt = math_t<scalar_t>>
void norm_row(const scalar_t* xr, scalar_t* yr, int64_t n, const mt* wf, const mt* bf, bool rms, double eps, mt& mean,
              mt& rstd) {
  const double mu = rms ? 0.0
                        : row_sum(n, [xr](int64_t j) { return load8(xr + j); },
                                  [xr](int64_t j) { return static_cast<double>(xr[j]); }) / n;
  const double var = row_sum(
      n,
      [xr, mu](int64_t j) {
        const lanes8 d = load8(xr + j) - mu;
        return d * d;
      },
      [xr, mu](int64_t j) {
        const double d = static_cast<double>(xr[j]) - mu;
        return d * d;
      });
  const double rs = 1.0 / std::sqrt(var / n + eps);
  const mt muf = static_cast<mt>(mu), rsf = static_cast<mt>(rs);
  for (int64_t j = 0; j < n; ++j)
    yr[j] = static_cast<scalar_t>(norm_forward<mt>(static_cast<mt>(xr[j]), muf, rsf, wf[j], bf[j]));
  mean = static_cast<mt>(mu);
  rstd = static_cast<mt>(rs);
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
  const at::Tensor w = as_double(weight, n, 1.0, x), b = as_double(bias, n, 0.0, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    using mt = math_t<scalar_t>;
    const at::Tensor wm = w.to(c10::CppTypeToScalarType<mt>::value), bm = b.to(c10::CppTypeToScalarType<mt>::value);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    mt *mp = mean.data_ptr<mt>(), *rp = rstd.data_ptr<mt>();
    at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r)
        norm_row(xp + r * n, yp + r * n, n, wm.const_data_ptr<mt>(), bm.const_data_ptr<mt>(), rms, eps, mp[r], rp[r]);
    });
  });
  return {y, mean, rstd};
}

// One block of rows of the backward: dx, and the block's dweight/dbias partials. FromOutput: x is
// the forward's output y, and xhat = (y - b) * (1 / w) per column (winv, b), the mean unused.
template <bool FromOutput, typename scalar_t, typename mt>
void bwd_rows(int64_t r0, int64_t r1, int64_t n, bool rms, const scalar_t* xp, const scalar_t* gp, scalar_t* dxp,
              const double* wp, const mt* wf, const double* winvp, const mt* winvf, const double* bp, const mt* bf,
              const mt* mp, const mt* rp, double* dwb, double* dbb) {
  std::fill_n(dwb, n, 0.0);
  std::fill_n(dbb, n, 0.0);
  for (int64_t r = r0; r < r1; ++r) {
    const double mu = (rms || FromOutput) ? 0.0 : mp[r], rs = rp[r];
    const scalar_t *xr = xp + r * n, *gr = gp + r * n;
    // c1 = mean(xhat * w dy), c2 = mean(w dy), one pass over the row.
    const auto [sum_c1, sum_c2] = row_sums<2>(
        n,
        [=](int64_t j) {
          const lanes8 wdy = load8(gr + j) * load8(wp + j);
          const lanes8 xhat = FromOutput ? xhat_from_output(load8(xr + j), load8(bp + j), load8(winvp + j))
                                         : (load8(xr + j) - mu) * rs;
          return std::array<lanes8, 2>{xhat * wdy, wdy};
        },
        [=](int64_t j) {
          const double wdy = static_cast<double>(gr[j]) * wp[j];
          const double xhat = FromOutput ? xhat_from_output(static_cast<double>(xr[j]), bp[j], winvp[j])
                                         : (static_cast<double>(xr[j]) - mu) * rs;
          return std::array<double, 2>{xhat * wdy, wdy};
        });
    const double c1 = sum_c1 / n, c2 = rms ? 0.0 : sum_c2 / n;
    scalar_t* dxr = dxp + r * n;
    const mt muf = static_cast<mt>(mu), rsf = static_cast<mt>(rs);
    const mt c1f = static_cast<mt>(c1), c2f = static_cast<mt>(c2);
    for (int64_t j = 0; j < n; ++j) {
      const mt g = static_cast<mt>(gr[j]);
      const mt xhat = FromOutput ? xhat_from_output<mt>(static_cast<mt>(xr[j]), bf[j], winvf[j])
                                 : (static_cast<mt>(xr[j]) - muf) * rsf;
      dxr[j] = static_cast<scalar_t>(norm_backward<mt>(g * wf[j], xhat, c1f, c2f, rsf));
      dwb[j] += static_cast<double>(g * xhat);
      dbb[j] += static_cast<double>(g);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 const at::Tensor& mean, const at::Tensor& rstd,
                                                                 bool rms, bool from_output) {
  check_inputs(x, weight, bias);
  TORCH_CHECK(dy_in.sizes() == x.sizes(), "fusedtech: grad has shape ", dy_in.sizes(), " but input has ", x.sizes());
  const at::Tensor dy = dy_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dx = at::empty_like(x);
  const int64_t blocks = std::max<int64_t>(1, std::min(kRowBlocks, rows / kRowsPerBlock));
  const int64_t per_block = (rows + blocks - 1) / std::max<int64_t>(blocks, 1);
  // Each block zeroes its own partials (in its thread, just before it fills them): zeroing them all
  // up front was a tenth of the backward's time at 2048 x 512.
  at::Tensor dw_part = at::empty({blocks, n}, x.options().dtype(at::kDouble));
  at::Tensor db_part = at::empty({blocks, n}, x.options().dtype(at::kDouble));
  const at::Tensor w = as_double(weight, n, 1.0, x);
  if (rows == 0 || n == 0) {  // no rows: zero dweight and dbias
    dw_part.zero_();
    db_part.zero_();
  } else {
    // From the output: the weight's reciprocal and the bias, per column (in double for the row
    // sums, in the element math's type for dx; the reciprocal of the rounded weight, as the oracle).
    const at::Tensor b = from_output ? as_double(bias, n, 0.0, x) : w;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cpu", [&] {
      // Row sums and dweight/dbias partials in double; the elementwise math in float (double for double).
      using mt = math_t<scalar_t>;
      constexpr auto mt_type = c10::CppTypeToScalarType<mt>::value;
      const at::Tensor wm = w.to(mt_type), bm = b.to(mt_type);
      const at::Tensor winvm = from_output ? wm.reciprocal() : wm;
      const at::Tensor winv = from_output ? winvm.to(at::kDouble) : w;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gp = dy.const_data_ptr<scalar_t>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      const double *wp = w.const_data_ptr<double>(), *winvp = winv.const_data_ptr<double>(), *bp = b.const_data_ptr<double>();
      const mt *wf = wm.const_data_ptr<mt>(), *winvf = winvm.const_data_ptr<mt>(), *bf = bm.const_data_ptr<mt>();
      const mt* mp = mean.const_data_ptr<mt>();
      const mt* rp = rstd.const_data_ptr<mt>();
      double* dwp = dw_part.data_ptr<double>();
      double* dbp = db_part.data_ptr<double>();
      at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t blk = lo; blk < hi; ++blk) {
          const int64_t r0 = blk * per_block, r1 = std::min(rows, (blk + 1) * per_block);
          (from_output ? bwd_rows<true, scalar_t, mt> : bwd_rows<false, scalar_t, mt>)(
              r0, r1, n, rms, xp, gp, dxp, wp, wf, winvp, winvf, bp, bf, mp, rp, dwp + blk * n, dbp + blk * n);
        }
      });
    });
  }
  // Absent gradients are (distinct) empty tensors: an op's outputs may not alias one another.
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = x.options().dtype(stat);
  return {dx, weight ? dw_part.sum(0).to(stat) : at::empty({0}, opts),
          bias ? db_part.sum(0).to(stat) : at::empty({0}, opts)};
}

// LayerNorm fed by dropout(x) + residual, one row at a time: the row of the sum is written (the
// next block's residual, and what backward needs) and normalised while it is in cache. The mask is
// the dropout kernel's: word i % 4 of Philox block i / 4 for element i. The sum is rounded to x's
// dtype as stored, dropout(x) first as the dropout op rounds it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, bool rms, const at::Tensor& seed) {
  check_inputs(x, weight, bias);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() && residual.scalar_type() == x.scalar_type(),
              "fusedtech: dropout_add_layer_norm residual must be contiguous, of x's shape and dtype, got ",
              residual.sizes(), " ", residual.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fusedtech: dropout probability has to be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "fusedtech: seed must be a one-element int64 tensor");
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor y = at::empty_like(x), sum = at::empty_like(x);
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::zeros({rows}, x.options().dtype(stat)), rstd = at::zeros({rows}, x.options().dtype(stat));
  if (rows == 0 || n == 0) return {y, sum, mean, rstd};
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t threshold = static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0));
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  const at::Tensor w = as_double(weight, n, 1.0, x), b = as_double(bias, n, 0.0, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_add_norm_fwd_cpu", [&] {
    using mt = math_t<scalar_t>;
    const at::Tensor wm = w.to(c10::CppTypeToScalarType<mt>::value), bm = b.to(c10::CppTypeToScalarType<mt>::value);
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *rp = residual.const_data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *sp = sum.data_ptr<scalar_t>();
    mt *meanp = mean.data_ptr<mt>(), *rstdp = rstd.data_ptr<mt>();
    constexpr int64_t kDrawChunk = 1024;
    at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
      uint32_t draws[kDrawChunk];
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t first = r * n;
        for (int64_t j0 = 0; j0 < n; j0 += kDrawChunk) {  // this row's draws, a chunk at a time
          const int64_t count = std::min(kDrawChunk, n - j0);
          philox_draws(key, first + j0, count, draws);
          for (int64_t k = 0; k < count; ++k) {
            const int64_t i = first + j0 + k;
            const scalar_t dropped = static_cast<scalar_t>(dropout_keep(static_cast<float>(xp[i]), draws[k], threshold, scale));
            sp[i] = static_cast<scalar_t>(static_cast<mt>(dropped) + static_cast<mt>(rp[i]));
          }
        }
        norm_row(sp + first, yp + first, n, wm.const_data_ptr<mt>(), bm.const_data_ptr<mt>(), rms, eps, meanp[r], rstdp[r]);
      }
    });
  });
  return {y, sum, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) {
  m.impl("dropout_add_norm_fwd", &dropout_add_norm_fwd_cpu);
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace fusedtech::cpu
