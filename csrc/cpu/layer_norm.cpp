// LayerNorm / RMSNorm forward and backward on CPU tensors: rows in parallel, row statistics in
// double for every input dtype (float64 inputs need it for gradcheck). Row sums go over eight
// lanes times two accumulators (element j to lane j % 8 of accumulator j % 16 / 8, added in order)
// so that they vectorise and do not wait on one add chain; a single running sum was latency-bound,
// 4x slower than torch's forward. dweight/dbias are reduced over a fixed number of row blocks, each
// in the element math's type (float; double for double) as torch accumulates, then the blocks are
// summed in order in double: the same result whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
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

// K sums over j < n of f(j)[k] in one pass: element j goes to lane j % 8 of one of two
// accumulators (j % 16 < 8: the first), which are added lane-wise, then the lanes in order, at the
// end: the order depends on n only. Two accumulators, so that consecutive adds do not wait on each
// other (one was latency-bound). f8(j) gives the eight of j .. j + 7 at once.
template <int K, typename F8, typename F>
inline std::array<double, K> row_sums(int64_t n, F8 f8, F f) {
  std::array<lanes8, K> acc, acc2;
  acc.fill(zero8());
  acc2.fill(zero8());
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    const std::array<lanes8, K> r = f8(j), r2 = f8(j + kLanes);
    for (int k = 0; k < K; ++k) {
      acc[k] += r[k];
      acc2[k] += r2[k];
    }
  }
  for (int k = 0; k < K; ++k) acc[k] += acc2[k];
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

// weight (or `fill` where there is none) as n contiguous values of the math type: the tensor
// itself when it already is (no copy: every allocation and conversion is a dispatcher call, and
// at a small size those were most of the op's time), else a converted copy.
template <typename mt>
at::Tensor as_math(const std::optional<at::Tensor>& t, int64_t n, double fill, const at::Tensor& like) {
  constexpr auto type = c10::CppTypeToScalarType<mt>::value;
  if (!t) return at::full({n}, fill, like.options().dtype(type));
  if (t->scalar_type() == type && t->is_contiguous()) return *t;
  return t->to(type).contiguous();
}

// out[j] = the sum over blocks of part[block][j], blocks added in order into block 0 (the order is
// the shape's), then rounded to out's dtype: no dispatcher calls for a sum and a conversion.
template <typename part_t, typename stat_t>
void sum_blocks(const part_t* part, int64_t blocks, int64_t n, stat_t* out) {
  std::vector<double> total(part, part + n);
  for (int64_t blk = 1; blk < blocks; ++blk)
    for (int64_t j = 0; j < n; ++j) total[j] += part[blk * n + j];
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<stat_t>(total[j]);
}

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "fusedtech: layer_norm (cpu) got input on ", x.device());
  check_norm_args(x, weight, bias, "layer_norm");
}

// One row: mean and rstd from one pass of sums in double, then y = norm(x) with the elementwise math
// in float (double for double) as torch's. The sums are of x - x[0] (norm.h's shifted_moments; RMS
// takes the plain sum of squares). Two passes over the row instead of three (mean, variance, y).
template <typename scalar_t, typename mt = math_t<scalar_t>>
void norm_row(const scalar_t* xr, scalar_t* __restrict__ yr, int64_t n, const mt* wf, const mt* bf, bool rms, double eps,
              mt& mean, mt& rstd) {
  const double shift = rms ? 0.0 : moment_shift(static_cast<double>(xr[0]));
  const auto [s1, s2] = row_sums<2>(
      n,
      [xr, shift](int64_t j) {
        const lanes8 d = load8(xr + j) - shift;
        return std::array<lanes8, 2>{d, d * d};
      },
      [xr, shift](int64_t j) {
        const double d = static_cast<double>(xr[j]) - shift;
        return std::array<double, 2>{d, d * d};
      });
  const Moments mo = shifted_moments(shift, s1, s2, n);
  const double mu = rms ? 0.0 : mo.mean;
  const double var = rms ? s2 / n : mo.m2 / n;
  const double rs = 1.0 / std::sqrt(var + eps);
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
  at::Tensor mean = at::empty({rows}, x.options().dtype(stat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(stat));
  if (rows == 0 || n == 0) return {y, mean.zero_(), rstd.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    using mt = math_t<scalar_t>;
    const at::Tensor wm = as_math<mt>(weight, n, 1.0, x), bm = as_math<mt>(bias, n, 0.0, x);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const mt *wf = wm.const_data_ptr<mt>(), *bf = bm.const_data_ptr<mt>();
    mt *mp = mean.data_ptr<mt>(), *rp = rstd.data_ptr<mt>();
    at::parallel_for(0, rows, grain_for(n), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) norm_row(xp + r * n, yp + r * n, n, wf, bf, rms, eps, mp[r], rp[r]);
    });
  });
  return {y, mean, rstd};
}

// One block of rows of the backward: dx, and the block's dweight/dbias partials (in mt). The
// row sums go over double lanes, the elementwise math in mt (float; double for double), with the
// weight (and, from the output, the bias and the weight's reciprocal) per column in mt.
// FromOutput: x is the forward's output y, xhat = (y - b) * (1 / w), the mean unused.
template <bool FromOutput, typename scalar_t, typename mt>
void bwd_rows(int64_t r0, int64_t r1, int64_t n, bool rms, const scalar_t* xp, const scalar_t* gp, scalar_t* dxp,
              const mt* wf, const mt* winvf, const mt* bf, const mt* mp, const mt* rp, mt* __restrict__ dwb,
              mt* __restrict__ dbb) {
  std::fill_n(dwb, n, mt(0));
  std::fill_n(dbb, n, mt(0));
  for (int64_t r = r0; r < r1; ++r) {
    const double mu = (rms || FromOutput) ? 0.0 : mp[r], rs = rp[r];
    const scalar_t *xr = xp + r * n, *gr = gp + r * n;
    // c1 = mean(xhat * w dy), c2 = mean(w dy), one pass over the row.
    const auto [sum_c1, sum_c2] = row_sums<2>(
        n,
        [=](int64_t j) {
          const lanes8 wdy = load8(gr + j) * load8(wf + j);
          const lanes8 xhat = FromOutput ? xhat_from_output(load8(xr + j), load8(bf + j), load8(winvf + j))
                                         : (load8(xr + j) - mu) * rs;
          return std::array<lanes8, 2>{xhat * wdy, wdy};
        },
        [=](int64_t j) {
          const double wdy = static_cast<double>(gr[j]) * wf[j];
          const double xhat = FromOutput ? xhat_from_output<double>(xr[j], bf[j], winvf[j])
                                         : (static_cast<double>(xr[j]) - mu) * rs;
          return std::array<double, 2>{xhat * wdy, wdy};
        });
    const double c1 = sum_c1 / n, c2 = rms ? 0.0 : sum_c2 / n;
    scalar_t* __restrict__ dxr = dxp + r * n;
    const mt muf = static_cast<mt>(mu), rsf = static_cast<mt>(rs);
    const mt c1f = static_cast<mt>(c1), c2f = static_cast<mt>(c2);
    for (int64_t j = 0; j < n; ++j) {
      const mt g = static_cast<mt>(gr[j]);
      const mt xhat = FromOutput ? xhat_from_output<mt>(static_cast<mt>(xr[j]), bf[j], winvf[j])
                                 : (static_cast<mt>(xr[j]) - muf) * rsf;
      dxr[j] = static_cast<scalar_t>(norm_backward<mt>(g * wf[j], xhat, c1f, c2f, rsf));
      dwb[j] += g * xhat;
      dbb[j] += g;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 const at::Tensor& mean, const at::Tensor& rstd,
                                                                 bool rms, bool from_output) {
  check_inputs(x, weight, bias);
  check_norm_bwd_args(dy_in, x, mean, rstd, !rms && !from_output);
  const at::Tensor dy = dy_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dx = at::empty_like(x);
  const int64_t blocks = std::max<int64_t>(1, std::min(kRowBlocks, rows / kRowsPerBlock));
  const int64_t per_block = (rows + blocks - 1) / std::max<int64_t>(blocks, 1);
  // dweight and dbias partials, one row each per block; each block zeroes its own (in its thread,
  // just before it fills them: zeroing them all up front was a tenth of the time at 2048 x 512).
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dw = at::empty({weight ? n : 0}, x.options().dtype(stat));
  at::Tensor db = at::empty({bias ? n : 0}, x.options().dtype(stat));
  if (rows == 0 || n == 0) {  // no rows: zero dweight and dbias
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    using mt = math_t<scalar_t>;
    const at::Tensor wm = as_math<mt>(weight, n, 1.0, x);
    // From the output: the bias and the weight's reciprocal per column (of the rounded weight, as the oracle).
    const at::Tensor bm = from_output ? as_math<mt>(bias, n, 0.0, x) : wm;
    const at::Tensor winvm = from_output && weight ? wm.reciprocal() : wm;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const mt *wf = wm.const_data_ptr<mt>(), *winvf = winvm.const_data_ptr<mt>(), *bf = bm.const_data_ptr<mt>();
    const mt *mp = mean.const_data_ptr<mt>(), *rp = rstd.const_data_ptr<mt>();
    at::Tensor part = at::empty({2, blocks, n}, x.options().dtype(c10::CppTypeToScalarType<mt>::value));
    mt* dwp = part.data_ptr<mt>();
    mt* dbp = dwp + blocks * n;
    at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t r0 = blk * per_block, r1 = std::min(rows, (blk + 1) * per_block);
        (from_output ? bwd_rows<true, scalar_t, mt> : bwd_rows<false, scalar_t, mt>)(
            r0, r1, n, rms, xp, gp, dxp, wf, winvf, bf, mp, rp, dwp + blk * n, dbp + blk * n);
      }
    });
    if (weight) sum_blocks(dwp, blocks, n, dw.data_ptr<mt>());
    if (bias) sum_blocks(dbp, blocks, n, db.data_ptr<mt>());
  });
  // Absent gradients are (distinct) empty tensors: an op's outputs may not alias one another.
  return {dx, dw, db};
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
  at::Tensor mean = at::empty({rows}, x.options().dtype(stat)), rstd = at::empty({rows}, x.options().dtype(stat));
  if (rows == 0 || n == 0) return {y, sum, mean.zero_(), rstd.zero_()};
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t threshold = static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_add_norm_fwd_cpu", [&] {
    using mt = math_t<scalar_t>;
    const mt scale = dropout_scale<mt>(p);
    const at::Tensor wm = as_math<mt>(weight, n, 1.0, x), bm = as_math<mt>(bias, n, 0.0, x);
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *rp = residual.const_data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *sp = sum.data_ptr<scalar_t>();
    mt *meanp = mean.data_ptr<mt>(), *rstdp = rstd.data_ptr<mt>();
    constexpr int64_t kDrawChunk = 1024;
    at::parallel_for(0, rows, grain_for(n), [&](int64_t lo, int64_t hi) {
      uint32_t draws[kDrawChunk];
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t first = r * n;
        for (int64_t j0 = 0; j0 < n; j0 += kDrawChunk) {  // this row's draws, a chunk at a time
          const int64_t count = std::min(kDrawChunk, n - j0);
          philox_draws(key, first + j0, count, draws);
          for (int64_t k = 0; k < count; ++k) {
            const int64_t i = first + j0 + k;
            const scalar_t dropped = static_cast<scalar_t>(dropout_keep<mt>(static_cast<mt>(xp[i]), draws[k], threshold, scale));
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
