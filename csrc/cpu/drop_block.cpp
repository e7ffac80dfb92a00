// DropBlock on CPU tensors (the oracle, fusedtech/reference/drop_block.py, states the mask). Per
// tile of each (n, c) plane: the centres' Philox draws, then the block growth as two
// one-dimensional passes (a window OR along each row, then down each column), O(block_size) per
// element instead of block_size^2. The keep mask is written with the tensor's strides, so NCHW and channels_last
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

// The keep mask is made in output tiles of at most kTileRows x kTileCols elements, each from the
// centres of its block windows, (rows + b - 1) x (cols + b - 1): the scratch of a thread is bounded
// by the tile and b, not by the plane (whole-plane scratch was 7 bytes per element of a plane per
// thread: a 4 GiB input needed more than 19 GiB). Halo centres are drawn again by each tile that
// reads them, (b - 1) / kTileRows more draws at most.
constexpr int64_t kTileRows = 128, kTileCols = 1024;

// A tile's scratch, rows of padded = cols + b - 1 bytes laid end to end: centres (zero outside the
// plane's centre grid, b - 1 zero bytes of slack at the end), row_or[k] = OR_d centres[k + d],
// dropped[k] = OR_d row_or[k + d * padded]; both window ORs run over the whole flat tile at once
// (long loops that vectorise even when rows are short). The last b - 1 bytes of each row mix in the
// next row and are never read back.
struct TileScratch {
  TileScratch(int64_t H, int64_t W, int64_t b)
      : draws(std::min(W, kTileCols) + b - 1),
        centres((std::min(H, kTileRows) + b - 1) * (std::min(W, kTileCols) + b - 1) + b, 0),
        row_or((std::min(H, kTileRows) + b - 1) * (std::min(W, kTileCols) + b - 1)),
        dropped(std::min(H, kTileRows) * (std::min(W, kTileCols) + b - 1)) {}
  std::vector<uint32_t> draws;
  std::vector<uint8_t> centres, row_or, dropped;
};

// out[k] = in[k] | in[k + step] | ... (count terms): restrict on parameters (GCC ignores it on
// locals) lets these vectorise.
inline void window_or(uint8_t* __restrict__ out, const uint8_t* __restrict__ in, int64_t n, int64_t step, int64_t count) {
  for (int64_t k = 0; k < n; ++k) out[k] = in[k];
  for (int64_t d = 1; d < count; ++d)
    for (int64_t k = 0; k < n; ++k) out[k] |= in[k + d * step];
}

// Writes the keep mask of the tile of rows [h0, h0 + rows) and columns [w0, w0 + cols) of a plane
// (keep points at the plane, element strides sh, sw) and returns how many it keeps. Sizes come by
// value: behind references every uint8 store could alias them and nothing would vectorise.
int64_t keep_tile(uint64_t seed, uint64_t threshold, int64_t plane, int64_t H, int64_t W, int64_t b, int64_t h0,
                  int64_t rows, int64_t w0, int64_t cols, uint8_t* keep, int64_t sh, int64_t sw, TileScratch& scratch) {
  const int64_t centre_h = H - b + 1, centre_w = W - b + 1, padded = cols + b - 1;
  // Centre (ci, cj) sits at tile row ci - (h0 - b + 1), column cj - (w0 - b + 1).
  const int64_t top = h0 - b + 1, left = w0 - b + 1;
  const int64_t cj_lo = std::max<int64_t>(left, 0), cj_hi = std::min(w0 + cols, centre_w);
  uint8_t* centres = scratch.centres.data();
  std::fill(centres, centres + (rows + b - 1) * padded + b, uint8_t(0));
  for (int64_t r = 0; r < rows + b - 1; ++r) {
    const int64_t ci = top + r;
    if (ci < 0 || ci >= centre_h || cj_hi <= cj_lo) continue;
    philox_draws(seed, (plane * centre_h + ci) * centre_w + cj_lo, cj_hi - cj_lo, scratch.draws.data());
    uint8_t* out = centres + r * padded + (cj_lo - left);
    const uint32_t* draw = scratch.draws.data();
    for (int64_t j = 0; j < cj_hi - cj_lo; ++j) out[j] = draw[j] < threshold;
  }
  window_or(scratch.row_or.data(), centres, (rows + b - 1) * padded, 1, b);
  window_or(scratch.dropped.data(), scratch.row_or.data(), rows * padded, padded, b);
  int64_t kept = 0;
  for (int64_t h = 0; h < rows; ++h) {
    const uint8_t* row = scratch.dropped.data() + h * padded;
    uint8_t* dst = keep + (h0 + h) * sh + w0 * sw;
    if (sw == 1) {  // NCHW: a row of the mask is contiguous
      for (int64_t w = 0; w < cols; ++w) {
        const uint8_t k = !row[w];
        dst[w] = k;
        kept += k;
      }
    } else {
      for (int64_t w = 0; w < cols; ++w) {
        const uint8_t k = !row[w];
        dst[w * sw] = k;
        kept += k;
      }
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
  // One task per (plane, tile): a single large plane still spreads over the threads.
  const int64_t tile_rows = (H + kTileRows - 1) / kTileRows, tile_cols = (W + kTileCols - 1) / kTileCols;
  const int64_t tiles = tile_rows * tile_cols;
  std::vector<int64_t> kept_per_task(N * C * tiles);
  at::parallel_for(0, N * C * tiles, 1, [&](int64_t lo, int64_t hi) {
    TileScratch scratch(H, W, b);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t plane = task / tiles, tile = task % tiles;
      const int64_t h0 = (tile / tile_cols) * kTileRows, w0 = (tile % tile_cols) * kTileCols;
      kept_per_task[task] = keep_tile(s, threshold, plane, H, W, b, h0, std::min(kTileRows, H - h0), w0,
                                      std::min(kTileCols, W - w0), kp + (plane / C) * sn + (plane % C) * sc, sh, sw,
                                      scratch);
    }
  });
  int64_t kept = 0;
  for (int64_t k : kept_per_task) kept += k;
  return {keep, at::scalar_tensor(kept, x.options().dtype(at::kLong))};
}

// x * (scale where keep, else 0) over the storage of x and keep (dense, the same strides): a product, so a
// dropped NaN or inf is NaN, as torchvision's x * mask * scale.
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
      for (int64_t k = lo; k < hi; ++k) yp[k] = static_cast<scalar_t>(static_cast<opmath_t>(xp[k]) * (kp[k] ? sc : opmath_t(0)));
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
