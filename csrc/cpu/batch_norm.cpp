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
#include "fusedtech/norm.h"
#include "lanes.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fusedtech::cpu {
namespace {

constexpr int64_t kMaxChunks = 256;  // channel rows: partial sums kept per chunk of rows

struct View {
  int64_t n, c, s;     // sizes
  int64_t sn, sc, ss;  // strides
  bool rows() const { return c == 1 || sc == 1; }  // channels contiguous within a row
  bool logical() const { return ss == 1 && sc == s && sn == c * s; }  // memory order = (n, c, s) order
  int64_t chunk_rows() const { return (n * s + kMaxChunks - 1) / kMaxChunks; }
  // Dense channels_last rows are evenly spaced: no division per row (40-odd cycles against a
  // row of C elements of work).
  int64_t row_offset(int64_t r) const { return sn == s * ss ? r * ss : (r / s) * sn + (r % s) * ss; }
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

// A per-channel vector (mean, invstd, weight, bias) as C doubles, `fill` where there is none, read
// in place whatever its floating dtype or stride: converting each with .to() allocated a tensor
// and went through the dispatcher, four times a call (most of a small BatchNorm's time).
std::vector<double> channel_values(const std::optional<at::Tensor>& t, int64_t c, double fill, const char* name) {
  std::vector<double> out(c, fill);
  if (!t) return out;
  TORCH_CHECK(t->numel() == c, "fusedtech: batch_norm ", name, " has ", t->numel(), " elements, expected ", c);
  TORCH_CHECK(t->device().is_cpu(), "fusedtech: batch_norm (cpu) got ", name, " on ", t->device());
  const at::Tensor v = t->dim() == 1 ? *t : t->reshape({c});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "batch_norm_channel_values", [&] {
    const scalar_t* p = v.const_data_ptr<scalar_t>();
    const int64_t stride = v.stride(0);
    for (int64_t i = 0; i < c; ++i) out[i] = static_cast<double>(p[i * stride]);
  });
  return out;
}

template <typename T>
inline double to_double(T v) {
  return static_cast<double>(static_cast<math_t<T>>(v));
}

// For each channel c, K sums over its elements i: sums[j][c] = sum of f(c, p[i], q[i])[j] (q may
// be null: f sees 0), via eight lanes per channel run (NCHW) or per-chunk partials (rows). One pass
// however many sums (BatchNorm's backward needs two). p and q share the view's strides. f is
// generic: it takes doubles, or eight of them at once (lanes8) for the runs' whole blocks.
template <int K, typename T, typename F>
void channel_sums(const T* p, const T* q, const View& v, std::array<double*, K> sums, F f) {
  auto at = [&](int64_t c, int64_t i) { return f(c, to_double(p[i]), q ? to_double(q[i]) : 0.0); };
  if (!v.rows()) {
    at::parallel_for(0, v.c, grain_for(v.n * v.s), [&](int64_t lo, int64_t hi) {
      const int64_t N = v.n, S = v.s, sn = v.sn, sc = v.sc;
      for (int64_t c = lo; c < hi; ++c) {
        std::array<lanes8, K> lanes;
        lanes.fill(zero8());
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = n * sn + c * sc;
          int64_t i = 0;
          for (; i + kLanes <= S; i += kLanes) {
            const auto r = f(c, load8(p + off + i), q ? load8(q + off + i) : zero8());
            for (int j = 0; j < K; ++j) lanes[j] += r[j];
          }
          for (int l = 0; i < S; ++i, ++l) {
            const std::array<double, K> r = at(c, off + i);
            for (int j = 0; j < K; ++j) lanes[j][l] += r[j];
          }
        }
        for (int j = 0; j < K; ++j) sums[j][c] = fold8(lanes[j]);
      }
    });
    return;
  }
  const int64_t rows = v.n * v.s, per_chunk = std::max<int64_t>(1, v.chunk_rows());
  const int64_t chunks = rows == 0 ? 0 : (rows + per_chunk - 1) / per_chunk;
  std::vector<double> partial(chunks * K * v.c, 0.0);
  at::parallel_for(0, chunks, grain_for(per_chunk * v.c), [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      double* acc = partial.data() + k * K * v.c;  // [K][C] for this chunk
      const int64_t last = std::min(rows, (k + 1) * per_chunk);
      int64_t r = k * per_chunk;
      // Two rows per pass over the partials: half their loads and stores (the loop was bound by
      // them), the pair added before it joins the partial.
      for (; r + 2 <= last; r += 2) {
        const int64_t o0 = v.row_offset(r), o1 = v.row_offset(r + 1);
        for (int64_t c = 0; c < v.c; ++c) {
          const std::array<double, K> x0 = at(c, o0 + c), x1 = at(c, o1 + c);
          for (int j = 0; j < K; ++j) acc[j * v.c + c] += x0[j] + x1[j];
        }
      }
      for (; r < last; ++r) {
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
    at::parallel_for(0, v.n * v.c, grain_for(v.s), [&](int64_t lo, int64_t hi) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x_in, double eps) {
  auto [x, v] = channel_view(x_in, "input");
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({v.c}, x.options().dtype(stat)), invstd = at::empty({v.c}, x.options().dtype(stat));
  at::Tensor unbiased = at::empty({v.c}, x.options().dtype(stat));
  const double count = static_cast<double>(v.n) * v.s;
  // One pass: per channel, the sums of x - shift and its square with shift = the channel's first
  // element (norm.h's shifted_moments). Two passes (mean, then squared deviations) read x twice.
  std::vector<double> shift(v.c, 0.0), s1(v.c), s2(v.c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cpu", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (count > 0) {
      for (int64_t c = 0; c < v.c; ++c) shift[c] = moment_shift(to_double(xp[c * v.sc]));
    }
    const double* sp = shift.data();
    channel_sums<2>(xp, static_cast<const scalar_t*>(nullptr), v, {s1.data(), s2.data()}, [sp](int64_t c, auto xv, auto) {
      const auto d = xv - sp[c];
      return std::array<decltype(xv), 2>{d, d * d};
    });
    stat_t *mp = mean.data_ptr<stat_t>(), *ip = invstd.data_ptr<stat_t>(), *up = unbiased.data_ptr<stat_t>();
    for (int64_t c = 0; c < v.c; ++c) {
      const Moments mo = count > 0 ? shifted_moments(shift[c], s1[c], s2[c], count) : Moments{0.0, 0.0};
      const double m2 = mo.m2;
      const double var = count > 0 ? m2 / count : 0.0;  // biased: what normalisation uses
      mp[c] = static_cast<stat_t>(mo.mean);
      ip[c] = static_cast<stat_t>(1.0 / std::sqrt(var + eps));
      up[c] = static_cast<stat_t>(count > 1 ? m2 / (count - 1) : var);
    }
  });
  return {mean, invstd, unbiased};
}

// Activation codes, shared with the Triton kernels: 0 none, 1 relu, 2 gelu, 3 silu. ReLU is applied
// in the normalising pass; GELU and SiLU by ATen's vectorised kernels on the pre-activation that
// pass writes (a scalar erf/exp per element here was 3-7x slower than torch's BN then GELU).
template <int Act, typename M>
inline M activate(M v) {
  if constexpr (Act == 1) return v > M(0) ? v : M(0);
  return v;
}

// ReLU's packed mask (bit k of the mask is logical element k = (n c + c) s + s: the order every
// backend agrees on). Helpers with restrict parameters and sizes by value, so the loops vectorise
// (a uint8 store may otherwise alias anything, the sizes included).

// The bytes [first, last) of the mask of a run of logical elements y[0..count): bit t of byte i is
// y[8 i + t] > 0. For fp32 with AVX2 one compare and movemask per byte; the portable loop's
// shift-or chain does not vectorise (it was 4x the normalising pass).
template <typename T>
void pack_positive(const T* __restrict__ y, uint8_t* __restrict__ bits, int64_t first, int64_t last, int64_t count) {
  using M = math_t<T>;
  int64_t i = first;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 zero = _mm256_setzero_ps();
    for (; i < last && 8 * i + 8 <= count; ++i)
      bits[i] = uint8_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(y + 8 * i), zero, _CMP_GT_OQ)));
  }
#endif
  for (; i < last; ++i) {
    uint8_t byte = 0;
    for (int64_t t = 0; t < 8 && 8 * i + t < count; ++t) byte |= uint8_t(static_cast<M>(y[8 * i + t]) > M(0)) << t;
    bits[i] = byte;
  }
}

// Channel rows (channels_last) with S % 8 == 0: byte `block` of every channel of image n comes from
// eight rows (n, 8 block + t) of C channels each, OR-ed bit by bit over the row (vectorises over
// channels); byte[c] then goes to its logical place, bit (n C + c) S + 8 block.
template <typename T>
void pack_positive_rows(const T* y, uint8_t* bits, int64_t n, int64_t block, int64_t C, int64_t S, int64_t sn,
                        int64_t ss, uint8_t* __restrict__ byte) {
  using M = math_t<T>;
  std::fill(byte, byte + C, 0);
  for (int t = 0; t < 8; ++t) {
    const T* __restrict__ row = y + n * sn + (8 * block + t) * ss;
    for (int64_t c = 0; c < C; ++c) byte[c] |= uint8_t(static_cast<M>(row[c]) > M(0)) << t;
  }
  for (int64_t c = 0; c < C; ++c) bits[((n * C + c) * S >> 3) + block] = byte[c];
}

template <typename T>
using bits_of = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

// out[j * stride] = g[j * stride] where bit (first_bit + j) of the mask is set, else +0, for j in
// [0, count). Branch-free, on the values' bits: the mask is random, and a branch per element
// mispredicted half the time (the ReLU backward took 5x the whole BatchNorm backward).
template <typename T>
void select_by_bits(const T* g, const uint8_t* __restrict__ bits, T* out, int64_t first_bit, int64_t count,
                    int64_t stride) {
  using U = bits_of<T>;
  const U* __restrict__ gu = reinterpret_cast<const U*>(g);
  U* __restrict__ ou = reinterpret_cast<U*>(out);
  int64_t j = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {  // a byte's eight bits become eight lane masks
    if (stride == 1 && first_bit % 8 == 0) {
      const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
      for (; j + 8 <= count; j += 8) {
        const __m256i set = _mm256_and_si256(_mm256_set1_epi32(bits[(first_bit + j) >> 3]), lane_bit);
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bit));
        _mm256_storeu_ps(out + j, _mm256_and_ps(_mm256_loadu_ps(g + j), keep));
      }
    }
  }
#endif
  for (; j < count; ++j) {
    const int64_t k = first_bit + j;
    ou[j * stride] = gu[j * stride] & static_cast<U>(U(0) - U((bits[k >> 3] >> (k & 7)) & 1));
  }
}

// The backward of pack_positive_rows: rows (n, 8 block + t) of g, masked by bit t of each channel's byte.
template <typename T>
void select_by_bits_rows(const T* g, const uint8_t* bits, T* out, int64_t n, int64_t block, int64_t C, int64_t S,
                         int64_t sn, int64_t ss, uint8_t* __restrict__ byte) {
  using U = bits_of<T>;
  for (int64_t c = 0; c < C; ++c) byte[c] = bits[((n * C + c) * S >> 3) + block];
  for (int t = 0; t < 8; ++t) {
    const int64_t off = n * sn + (8 * block + t) * ss;
    const U* __restrict__ gu = reinterpret_cast<const U*>(g + off);
    U* __restrict__ ou = reinterpret_cast<U*>(out + off);
    for (int64_t c = 0; c < C; ++c) ou[c] = gu[c] & static_cast<U>(U(0) - U((byte[c] >> t) & 1));
  }
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

// y = act((x - mean) * scale + bias + residual) per channel (scale = invstd w), in
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
  // Every byte of the mask is written by the packing below.
  at::Tensor bits = at::empty({act == 1 ? (total + 7) / 8 : 0}, x.options().dtype(at::kByte));
  const std::vector<double> m = channel_values(mean, v.c, 0.0, "mean"), r = channel_values(invstd, v.c, 1.0, "invstd");
  const std::vector<double> w = channel_values(weight, v.c, 1.0, "weight"), b = channel_values(bias, v.c, 0.0, "bias");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_apply_cpu", [&] {
    using mt = math_t<scalar_t>;
    const double *mp = m.data(), *rp = r.data(), *wp = w.data(), *bp = b.data();
    // (x - mean) * k + bias, not x * k + (bias - mean * k): x - mean is exact when |mean| >> std
    // (Sterbenz), where x * k rounds away what the subtraction then needs (torch's FMA hides some of
    // it; without contraction it was 2.5x torch's error at mean 1000, std 0.01).
    std::vector<mt> centre(v.c), scale(v.c), shift(v.c);
    for (int64_t c = 0; c < v.c; ++c) {
      centre[c] = static_cast<mt>(mp[c]);
      scale[c] = static_cast<mt>(rp[c] * wp[c]);
      shift[c] = static_cast<mt>(bp[c]);
    }
    const mt *cp = centre.data(), *sp = scale.data(), *hp = shift.data();
    const scalar_t* rs = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    auto run = [&](auto act_code) {
      constexpr int A = decltype(act_code)::value;
      channel_map<scalar_t>(x.const_data_ptr<scalar_t>(), rs, yp, v, [cp, sp, hp, rs](int64_t c, scalar_t xv, scalar_t rv) {
        mt pre = (static_cast<mt>(xv) - cp[c]) * sp[c] + hp[c];
        if (rs) pre += static_cast<mt>(rv);
        return static_cast<scalar_t>(activate<A>(pre));
      });
    };
    if (act == 1) {
      run(std::integral_constant<int, 1>{});
    } else {
      run(std::integral_constant<int, 0>{});
    }
    if (act == 1) {  // torch's ReLU backward tests its output > 0; the mask in logical order
      uint8_t* bp8 = bits.data_ptr<uint8_t>();
      if (v.logical()) {  // memory order is logical order: eight neighbours a byte
        at::parallel_for(0, bits.numel(), 4096, [&](int64_t lo, int64_t hi) { pack_positive(yp, bp8, lo, hi, total); });
        return;
      }
      if (v.rows() && v.s % 8 == 0) {  // channels_last: eight rows give every channel one byte
        at::parallel_for(0, v.n * (v.s / 8), std::max<int64_t>(1, 2048 / std::max<int64_t>(1, v.c)), [&](int64_t lo, int64_t hi) {
          std::vector<uint8_t> byte(v.c);
          for (int64_t task = lo; task < hi; ++task)
            pack_positive_rows(yp, bp8, task / (v.s / 8), task % (v.s / 8), v.c, v.s, v.sn, v.ss, byte.data());
        });
        return;
      }
      // Other layouts: each byte gathers its eight logical elements (division-free index steps).
      at::parallel_for(0, bits.numel(), 4096, [&](int64_t lo, int64_t hi) {
        const int64_t S = v.s, C = v.c, sn = v.sn, sc = v.sc, ss = v.ss;
        int64_t k = lo * 8, s = k % S, c = (k / S) % C, n = k / (S * C);
        for (int64_t i = lo; i < hi; ++i) {
          uint8_t byte = 0;
          for (int t = 0; t < 8 && k < total; ++t, ++k) {
            if (static_cast<mt>(yp[n * sn + c * sc + s * ss]) > mt(0)) byte |= uint8_t(1u << t);
            if (++s == S) {
              s = 0;
              if (++c == C) c = 0, ++n;
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
// dx_over_dy: dy is a temporary of the caller's, so dx may be written over it (elementwise, in place).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_impl(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const at::Tensor& mean, const at::Tensor& invstd,
                                                                  bool training, bool dx_over_dy) {
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "fusedtech: batch_norm grad has shape ", dy_in.sizes(), ", input ", x_in.sizes());
  auto [x, v] = channel_view(x_in, "input");
  at::Tensor dy = dy_in.contiguous(x.suggest_memory_format());
  if (dy.strides() != x.strides()) {  // one view walks x, dy and dx together
    x = x.contiguous();
    dy = dy.contiguous();
    v = view_of(x);
  }
  at::Tensor dx = dx_over_dy && dy.is_same(dy_in) ? dy : at::empty_like(x);
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dw = at::empty({v.c}, x.options().dtype(stat)), db = at::empty({v.c}, x.options().dtype(stat));
  const std::vector<double> m = channel_values(mean, v.c, 0.0, "mean"), r = channel_values(invstd, v.c, 1.0, "invstd");
  const std::vector<double> w = channel_values(weight, v.c, 1.0, "weight");
  const double count = static_cast<double>(v.n) * v.s;
  std::vector<double> sum_dy(v.c), sum_dy_xmu(v.c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_bwd_cpu", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using mt = math_t<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = dy.const_data_ptr<scalar_t>();
    const double *mp = m.data(), *rp = r.data(), *wp = w.data();
    channel_sums<2>(gp, xp, v, {sum_dy.data(), sum_dy_xmu.data()},
                    [mp](int64_t c, auto g, auto xv) { return std::array<decltype(g), 2>{g, g * (xv - mp[c])}; });
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
    if (!training) {  // eval: dx = weight invstd dy does not read x (no 0 * inf where x is NaN/inf)
      channel_map<scalar_t>(gp, xp, dx.data_ptr<scalar_t>(), v, [=](int64_t c, scalar_t g, scalar_t) {
        return static_cast<scalar_t>(a[c] * static_cast<mt>(g));
      });
      return;
    }
    channel_map<scalar_t>(gp, xp, dx.data_ptr<scalar_t>(), v, [=](int64_t c, scalar_t g, scalar_t xv) {
      return static_cast<scalar_t>(a[c] * static_cast<mt>(g) - bq[c] - cq[c] * (static_cast<mt>(xv) - up[c]));
    });
  });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const at::Tensor& mean, const at::Tensor& invstd,
                                                                 bool training) {
  return batch_norm_bwd_impl(dy, x, weight, mean, invstd, training, false);
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
      if (v.logical()) {  // whole bytes per task: eight elements each
        at::parallel_for(0, (x.numel() + 7) / 8, 2048, [&](int64_t lo, int64_t hi) {
          const int64_t end = std::min(hi * 8, x.numel());
          select_by_bits(gp + lo * 8, bits, op + lo * 8, lo * 8, end - lo * 8, 1);
        });
        return;
      }
      if (v.rows() && v.s % 8 == 0) {  // channels_last: as the forward packed it
        at::parallel_for(0, v.n * (v.s / 8), std::max<int64_t>(1, 2048 / std::max<int64_t>(1, v.c)), [&](int64_t lo, int64_t hi) {
          std::vector<uint8_t> byte(v.c);
          for (int64_t task = lo; task < hi; ++task)
            select_by_bits_rows(gp, bits, op, task / (v.s / 8), task % (v.s / 8), v.c, v.s, v.sn, v.ss, byte.data());
        });
        return;
      }
      // Other layouts (channel runs with a stride, rows with S % 8 != 0): one (n, c) per step, its
      // S bits consecutive, its elements ss apart.
      at::parallel_for(0, v.n * v.c, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, v.s)), [&](int64_t lo, int64_t hi) {
        for (int64_t nc = lo; nc < hi; ++nc) {
          const int64_t off = (nc / v.c) * v.sn + (nc % v.c) * v.sc;
          select_by_bits(gp + off, bits, op + off, nc * v.s, v.s, v.ss);
        }
      });
    });
  }
  // Without a residual the masked gradient is ours alone: dx is written over it (one buffer fewer;
  // a fresh one costs its page faults on every call).
  auto [dx, dw, db] = batch_norm_bwd_impl(g, x_in, weight, mean, invstd, training, act == 1 && !has_residual);
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
