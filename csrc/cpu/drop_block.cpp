// DropBlock on CPU tensors (the oracle, fusedtech/reference/drop_block.py, states the mask). Per
// (n, c) plane: the centres' Philox draws, then the block growth as two one-dimensional passes (a
// window OR along each row, then down each column), O(block_size) per element instead of
// block_size^2. The keep mask is written with the tensor's strides, so NCHW and channels_last
// inputs are applied in storage order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "fusedtech/philox.h"

namespace fusedtech::cpu {
namespace {

// One plane's scratch, rows of padded_w = W + b - 1 bytes laid end to end. Each row of centres is
// stored shifted right by b - 1 between zero borders, and row_or has b - 1 zero rows above and
// below; then both window ORs run over the whole flat plane at once (long loops that vectorise
// even when rows are short): row_or[k] = OR_d centres[k + d], dropped[k] = OR_d row_or[k + d *
// padded_w]. Columns w >= W of a row only ever see zero borders, so they come out kept: exactly
// H * (b - 1) extra.
struct PlaneScratch {
  PlaneScratch(int64_t H, int64_t W, int64_t b)
      : draws((H - b + 1) * (W - b + 1)),
        centres((H - b + 1) * (W + b - 1) + b, 0),
        row_or((H + 2 * (b - 1)) * (W + b - 1), 0),
        keep(H * (W + b - 1)) {}
  std::vector<uint32_t> draws;
  std::vector<uint8_t> centres, row_or, keep;
};

// out[k] = in[k] | in[k + step] | ... (count terms): restrict on parameters (GCC ignores it on
// locals) lets these vectorise.
inline void window_or(uint8_t* __restrict__ out, const uint8_t* __restrict__ in, int64_t n, int64_t step, int64_t count) {
  for (int64_t k = 0; k < n; ++k) out[k] = in[k];
  for (int64_t d = 1; d < count; ++d)
    for (int64_t k = 0; k < n; ++k) out[k] |= in[k + d * step];
}

// p[k] = !p[k]; returns how many are set.
inline int64_t negate_count(uint8_t* __restrict__ p, int64_t n) {
  int64_t set = 0;
  for (int64_t k = 0; k < n; ++k) {
    p[k] = !p[k];
    set += p[k];
  }
  return set;
}

// Writes one plane's keep mask (element strides sh, sw) and returns how many it keeps. Sizes come
// by value: behind references every uint8 store could alias them and nothing would vectorise.
int64_t keep_plane(uint64_t seed, uint64_t threshold, int64_t plane, int64_t H, int64_t W, int64_t b, uint8_t* keep,
                   int64_t sh, int64_t sw, PlaneScratch& scratch) {
  const int64_t centre_h = H - b + 1, centre_w = W - b + 1, padded_w = W + b - 1;
  philox_draws(seed, plane * centre_h * centre_w, centre_h * centre_w, scratch.draws.data());
  for (int64_t i = 0; i < centre_h; ++i) {
    uint8_t* out = scratch.centres.data() + i * padded_w + (b - 1);
    const uint32_t* draw = scratch.draws.data() + i * centre_w;
    for (int64_t j = 0; j < centre_w; ++j) out[j] = draw[j] < threshold;
  }
  uint8_t* row_or = scratch.row_or.data() + (b - 1) * padded_w;
  window_or(row_or, scratch.centres.data(), centre_h * padded_w, 1, b);
  window_or(scratch.keep.data(), scratch.row_or.data(), H * padded_w, padded_w, b);
  const int64_t kept = negate_count(scratch.keep.data(), H * padded_w) - H * (b - 1);
  for (int64_t h = 0; h < H; ++h) {
    const uint8_t* row = scratch.keep.data() + h * padded_w;
    if (sw == 1) {
      std::copy(row, row + W, keep + h * sh);
    } else {
      for (int64_t w = 0; w < W; ++w) keep[h * sh + w * sw] = row[w];
    }
  }
  return kept;
}

// keep (uint8 with x's shape and strides, 1 = kept) and the number kept (int64, 0-d).
std::tuple<at::Tensor, at::Tensor> drop_block_keep_cpu(const at::Tensor& x, const at::Tensor& seed, double gamma,
                                                       int64_t block_size) {
  TORCH_CHECK(x.device().is_cpu(), "fusedtech: drop_block2d (cpu) got input on ", x.device());
  check_drop_block_keep(x, seed, gamma, block_size);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), b = block_size;
  at::Tensor keep = at::empty_like(x, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {keep, at::zeros({}, x.options().dtype(at::kLong))};
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  const uint64_t threshold = static_cast<uint64_t>(std::floor(gamma * 4294967296.0));  // 2^32: every centre
  const int64_t sn = keep.stride(0), sc = keep.stride(1), sh = keep.stride(2), sw = keep.stride(3);
  uint8_t* kp = keep.data_ptr<uint8_t>();
  std::vector<int64_t> kept_per_plane(N * C);
  at::parallel_for(0, N * C, 1, [&](int64_t lo, int64_t hi) {
    PlaneScratch scratch(H, W, b);
    for (int64_t plane = lo; plane < hi; ++plane)
      kept_per_plane[plane] = keep_plane(s, threshold, plane, H, W, b, kp + (plane / C) * sn + (plane % C) * sc, sh, sw, scratch);
  });
  int64_t kept = 0;
  for (int64_t k : kept_per_plane) kept += k;
  return {keep, at::scalar_tensor(kept, x.options().dtype(at::kLong))};
}

// x * scale where keep, else 0, over the storage of x and keep (dense, the same strides).
at::Tensor drop_block_apply_cpu(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu(), "fusedtech: drop_block2d (cpu) got input on ", x.device());
  check_drop_block_apply(x, keep, scale);
  at::Tensor y = at::empty_like(x);
  const uint8_t* kp = keep.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "drop_block_apply_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const opmath_t sc = static_cast<opmath_t>(scale.item<double>());  // exact: the scale's own value
    at::parallel_for(0, x.numel(), 16384, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) yp[k] = static_cast<scalar_t>(kp[k] ? static_cast<opmath_t>(xp[k]) * sc : opmath_t(0));
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) {
  m.impl("drop_block_keep", &drop_block_keep_cpu);
  m.impl("drop_block_apply", &drop_block_apply_cpu);
}

}  // namespace fusedtech::cpu
