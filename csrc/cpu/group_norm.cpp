// GroupNorm (+ activation) forward and backward on CPU tensors, read in place in either dense layout:
//   runs (NCHW, any number of spatial dims): each (n, c) is a contiguous run of S elements, so a
//     group (n, g) is one contiguous run of C / G * S;
//   rows (channels_last / channels_last_3d, and any (N, C) input): each (n, s) is a contiguous row of
//     the C channels, group g the slice [g C / G, (g + 1) C / G) of it.
// Reductions are cut into pieces fixed by the shape alone (runs: kPiece elements; rows: blocks of
// rows) and each piece gives its own partial, merged in piece order: the results are bitwise the
// same on any thread count, whichever way the work is spread. Statistics: each piece's (count, mean,
// m2) from two passes (its sum, then the sums of d = x - mean and d^2, in the element math's type),
// the pieces Chan-merged in double (group_norm.h). The backward's per-(n, c) sums likewise: the
// element math's type within a piece, double across pieces. Element math is float (double for
// double) through at::vec, for torch's vectorised exp and erf: a libm call per element would make
// GELU and SiLU several times slower than torch's own.

// at::vec picks its implementation from these macros (ATen defines them per kernel file); this file
// is built for the machine it runs on (-march), so the widest the compiler targets is chosen.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "fusedtech/group_norm.h"
#include "lanes.h"

namespace fusedtech::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kPiece = 2048;          // runs: elements a piece (in L1 for its second pass)
constexpr int64_t kBlock = 16384;         // rows: elements a block of rows, at most
constexpr int64_t kBlockRows = 64;        // rows: rows a block, at most (per-channel sums stay short)
constexpr int64_t kGroupInCache = 1 << 20;  // runs: bytes of a group's inputs that stay in L2 between passes

// group_norm.h's ScalarMath for at::vec vectors.
struct VecMath {
  template <typename A>
  static Vectorized<A> exp(const Vectorized<A>& v) { return v.exp(); }
  template <typename A>
  static Vectorized<A> erf(const Vectorized<A>& v) { return v.erf(); }
  template <typename A>
  static Vectorized<A> relu(const Vectorized<A>& v) { return at::vec::maximum(v, Vectorized<A>(A(0))); }  // keeps NaN
  template <typename A>
  static Vectorized<A> where_positive(const Vectorized<A>& pre, const Vectorized<A>& g) {
    return g & (pre > Vectorized<A>(A(0)));  // all-ones lanes where pre > 0 (not where it is NaN)
  }
};

struct Layout {
  int64_t n, c, s, g;  // batch, channels, spatial positions, groups
  bool rows;           // rows (channels_last, or S == 1) or runs (NCHW)
  int64_t cg() const { return c / g; }
  int64_t group_size() const { return c / g * s; }
  int64_t pieces(int64_t run) const { return (run + kPiece - 1) / kPiece; }
  int64_t block_rows() const { return std::clamp<int64_t>(kBlock / c, 1, kBlockRows); }
  int64_t blocks() const { return (s + block_rows() - 1) / block_rows(); }  // row blocks of one n
  // Runs: one task per group, its reduction then its elementwise pass while the group is in cache,
  // when there are groups enough for the threads. Either way the same pieces, merged in the same
  // order: the choice changes no bit.
  bool group_tasks(int64_t bytes_per_element) const {
    return !rows && n * g >= 2 * at::get_num_threads() && group_size() * bytes_per_element <= kGroupInCache;
  }
};

Layout layout_of(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.device().is_cpu(), "fusedtech: group_norm (cpu) got input on ", x.device());
  TORCH_CHECK(x.dim() >= 2, "fusedtech: group_norm input must be (N, C, *), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "fusedtech: group_norm (cpu) input must be float32, float16, bfloat16 or float64, got ", dt);
  Layout v{x.size(0), x.size(1), 1, groups, false};
  for (int64_t d = 2; d < x.dim(); ++d) v.s *= x.size(d);
  TORCH_CHECK(groups > 0 && v.c >= groups && v.c % groups == 0, "fusedtech: group_norm num_groups must divide the ",
              v.c, " channels of input, got ", groups);
  TORCH_CHECK(v.s > 0, "fusedtech: group_norm input must have a spatial size of at least 1, got shape ", x.sizes());
  const bool channels_last = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                             (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  TORCH_CHECK(x.is_contiguous() || channels_last,
              "fusedtech: group_norm input must be contiguous or channels_last(_3d), got shape ", x.sizes(),
              " with strides ", x.strides());
  // With S == 1 both layouts are the same memory; rows of C go faster than runs of one element.
  v.rows = v.s == 1 || !x.is_contiguous();
  return v;
}

// weight or bias as C values of the element math's type (`fill` where there is none), read in place
// whatever its floating dtype or stride.
template <typename A>
std::vector<A> channel_values(const std::optional<at::Tensor>& t, const at::Tensor& x, A fill, const char* name) {
  const int64_t c = x.size(1);
  std::vector<A> out(c, fill);
  if (!t) return out;
  TORCH_CHECK(t->device() == x.device(), "fusedtech: group_norm ", name, " is on ", t->device(), " but input is on ",
              x.device());
  TORCH_CHECK(t->numel() == c, "fusedtech: group_norm ", name, " has ", t->numel(), " elements, expected ", c);
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fusedtech: group_norm ", name, " must be floating point, got ",
              t->scalar_type());
  const at::Tensor v = t->reshape({c});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "group_norm_channel_values", [&] {
    const scalar_t* p = v.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c; ++i) out[i] = static_cast<A>(p[i * v.stride(0)]);
  });
  return out;
}

// ---- vectors -------------------------------------------------------------------------------------

// bfloat16 and float16 go to and from float kV lanes at a time, in vector registers: a scalar
// conversion per element (through a buffer) made the reduced dtypes ~4x slower than float32.

template <typename T>
constexpr bool kReduced = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;

constexpr int64_t kFloatLanes = Vectorized<float>::size();
typedef uint16_t u16xV __attribute__((vector_size(kFloatLanes * sizeof(uint16_t))));
typedef uint32_t u32xV __attribute__((vector_size(kFloatLanes * sizeof(uint32_t))));
typedef int32_t i32xV __attribute__((vector_size(kFloatLanes * sizeof(int32_t))));
typedef float f32xV __attribute__((vector_size(kFloatLanes * sizeof(float))));

// kV elements at p, widened (exactly) to float.
template <typename T>
inline Vectorized<float> widen(const T* p) {
  Vectorized<float> out;
  at::vec::load_to_float(p, out);
  return out;
}

// v rounded to T (to nearest, ties to even: as T's own conversion from float), kV lanes.
template <typename T>
inline u16xV narrow(const Vectorized<float>& v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    // c10's round_to_nearest_even, lane-wise: NaN to 0x7FC0, else (u + 0x7FFF + lsb) >> 16.
    f32xV f;
    v.store(reinterpret_cast<float*>(&f));
    u32xV u;
    std::memcpy(&u, &f, sizeof(u));
    const u32xV r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    const i32xV nan = f != f;
    return __builtin_convertvector(nan ? u32xV{} + 0x7FC0u : r, u16xV);
  } else {
    // float16: the hardware conversion (round to nearest even, as c10::Half's).
    const Vectorized<at::Half> h = at::vec::convert_from_float<at::Half>(v, v);
    u16xV out;
    h.store(reinterpret_cast<at::Half*>(&out), kFloatLanes);
    return out;
  }
}

// The first k elements of p as a vector of A, the other lanes 0.
template <typename A, typename T>
inline Vectorized<A> load(const T* p, int64_t k) {
  using Vec = Vectorized<A>;
  if constexpr (std::is_same_v<T, A>) {
    return k == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, k);
  } else if constexpr (std::is_same_v<A, float> && kReduced<T>) {
    if (k == Vec::size()) return widen(p);
    T buf[Vec::size()];
    std::memset(static_cast<void*>(buf), 0, sizeof(buf));  // +0 in either dtype
    std::memcpy(static_cast<void*>(buf), p, k * sizeof(T));
    return widen(static_cast<const T*>(buf));
  } else {
    A buf[Vec::size()] = {};
    for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<A>(p[i]);
    return Vec::loadu(buf);
  }
}

// The first k lanes of v into p, rounded to T.
template <typename A, typename T>
inline void store(const Vectorized<A>& v, T* p, int64_t k) {
  if constexpr (std::is_same_v<T, A>) {
    if (k == Vectorized<A>::size()) {
      v.store(p);
    } else {
      v.store(p, k);
    }
  } else if constexpr (std::is_same_v<A, float> && kReduced<T>) {
    const u16xV r = narrow<T>(v);
    std::memcpy(static_cast<void*>(p), &r, k * sizeof(T));
  } else {
    A buf[Vectorized<A>::size()];
    v.store(buf);
    for (int64_t i = 0; i < k; ++i) p[i] = static_cast<T>(buf[i]);
  }
}

// The lanes of v added in lane order, in double.
template <typename A>
inline double fold(const Vectorized<A>& v) {
  A buf[Vectorized<A>::size()];
  v.store(buf);
  double s = 0.0;
  for (int64_t l = 0; l < Vectorized<A>::size(); ++l) s += buf[l];
  return s;
}

// ---- statistics ----------------------------------------------------------------------------------

// A set's (count, mean, m2) from m0, a first estimate of its mean, and the sums of d = x - m0 and
// d^2. With m0 within rounding of the mean, x - m0 loses nothing to cancellation (it is exact for x
// near m0) and sum(d) is tiny, so sum(d^2) - sum(d)^2 / n has none of E[x^2] - E[x]^2's loss at a
// large |mean| / std.
inline Welford<double> centred_moments(double count, double m0, double sum_d, double sum_d2) {
  const double m2 = sum_d2 - sum_d * (sum_d / count);
  return {count, m0 + sum_d / count, m2 < 0.0 ? 0.0 : m2};  // clamps a rounding residue; NaN stays NaN
}

// The (count, mean, m2) of p[0, n), in two passes: the sum, then the sums of d and d^2 about its
// mean (from L1; meanwhile the next piece, p[n, 2 n), is prefetched). Two vector accumulators each,
// so that consecutive adds do not wait on each other; element i goes to lane i % kV of accumulator
// i / kV % 2: the order is n's alone.
template <typename T>
Welford<double> run_moments(const T* p, int64_t n) {
  using A = math_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t kV = Vec::size();
  const Vec zero(A(0));
  Vec s0 = zero, s1 = zero;
  int64_t i = 0;
  for (; i + 2 * kV <= n; i += 2 * kV) {
    s0 += load<A>(p + i, kV);
    s1 += load<A>(p + i + kV, kV);
  }
  for (; i < n; i += kV) s0 += load<A>(p + i, std::min(kV, n - i));  // zero past the end
  const A m0 = static_cast<A>(fold(s0 + s1) / n);
  const Vec mv(m0);
  Vec d0 = zero, d1 = zero, q0 = zero, q1 = zero;
  for (i = 0; i + 2 * kV <= n; i += 2 * kV) {
    __builtin_prefetch(p + n + i);
    const Vec a = load<A>(p + i, kV) - mv, b = load<A>(p + i + kV, kV) - mv;
    d0 += a;
    q0 += a * a;
    d1 += b;
    q1 += b * b;
  }
  for (; i < n; i += kV) {
    const int64_t k = std::min(kV, n - i);
    const Vec a = Vec::set(zero, load<A>(p + i, k) - mv, k);
    d0 += a;
    q0 += a * a;
  }
  return centred_moments(static_cast<double>(n), m0, fold(d0 + d1), fold(q0 + q1));
}

// Per-channel sums down rows [r0, r1) (of C elements each) for channels [c, c + NV kV), k in the
// last vector: of x into s1, or (Second) of d = x - centre into s1 and d^2 into s2. One register
// per vector of channels, NV of them so that the adds down the rows overlap.
template <int NV, bool Second, typename T, typename A>
inline void column_sums(const T* p, int64_t r0, int64_t r1, int64_t C, int64_t c, int64_t k, const A* centre, A* s1,
                        A* s2) {
  using Vec = Vectorized<A>;
  constexpr int64_t kV = Vec::size();
  auto lanes = [k](int j) { return j == NV - 1 ? k : kV; };
  Vec m[NV], a1[NV], a2[NV];
  for (int j = 0; j < NV; ++j) {
    if constexpr (Second) m[j] = load<A>(centre + c + j * kV, lanes(j));
    a1[j] = a2[j] = Vec(A(0));
  }
  for (int64_t r = r0; r < r1; ++r)
    for (int j = 0; j < NV; ++j) {
      Vec d = load<A>(p + r * C + c + j * kV, lanes(j));
      if constexpr (Second) d = d - m[j];
      a1[j] += d;
      if constexpr (Second) a2[j] += d * d;
    }
  for (int j = 0; j < NV; ++j) {
    store(a1[j], s1 + c + j * kV, lanes(j));
    if constexpr (Second) store(a2[j], s2 + c + j * kV, lanes(j));
  }
}

template <bool Second, typename T, typename A>
void all_column_sums(const T* p, int64_t r0, int64_t r1, int64_t C, const A* centre, A* s1, A* s2) {
  constexpr int64_t kV = Vectorized<A>::size();
  int64_t c = 0;
  for (; c + 4 * kV <= C; c += 4 * kV) column_sums<4, Second>(p, r0, r1, C, c, kV, centre, s1, s2);
  for (; c < C; c += kV) column_sums<1, Second>(p, r0, r1, C, c, std::min(kV, C - c), centre, s1, s2);
}

// Each group's (count, mean, m2) over rows [r0, r1) of one n's (S, C) rows, as run_moments: per-
// channel sums (at most kBlockRows rows, so they stay short), the group means, per-channel sums of
// d and d^2 about their group's mean, then those added per group in double. scratch: 3 C values.
template <typename T, typename A>
void block_moments(const T* p, int64_t r0, int64_t r1, const Layout& v, A* scratch, Welford<double>* out) {
  const int64_t C = v.c, cg = v.cg();
  A *sum = scratch, *sq = scratch + C, *centre = scratch + 2 * C;
  all_column_sums<false>(p, r0, r1, C, centre, sum, sq);
  const double count = static_cast<double>((r1 - r0) * cg);
  for (int64_t g = 0; g < v.g; ++g) {
    double s = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s += sum[c];
    std::fill_n(centre + g * cg, cg, static_cast<A>(s / count));
  }
  all_column_sums<true>(p, r0, r1, C, centre, sum, sq);
  for (int64_t g = 0; g < v.g; ++g) {
    double sd = 0.0, s2 = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) sd += sum[c], s2 += sq[c];
    out[g] = centred_moments(count, centre[g * cg], sd, s2);
  }
}

// mean and 1 / sqrt(biased variance + eps) of a merged group.
template <typename stat_t>
void finish(const Welford<double>& st, double eps, stat_t& mean, stat_t& rstd) {
  mean = static_cast<stat_t>(st.mean);
  rstd = static_cast<stat_t>(1.0 / std::sqrt(st.m2 / st.n + eps));
}

// A group's pieces merged in order.
template <typename stat_t>
void finish_group(const Welford<double>* parts, int64_t count, double eps, stat_t& mean, stat_t& rstd) {
  Welford<double> st{0.0, 0.0, 0.0};
  for (int64_t k = 0; k < count; ++k) st = welford_merge(st, parts[k]);
  finish(st, eps, mean, rstd);
}

// The pieces of run group i (kPiece elements each, the last shorter) into parts[0, pieces).
template <typename T>
void run_group_parts(const T* x, const Layout& v, int64_t i, Welford<double>* parts) {
  const int64_t m = v.group_size();
  for (int64_t k = 0; k < v.pieces(m); ++k)
    parts[k] = run_moments(x + i * m + k * kPiece, std::min(kPiece, m - k * kPiece));
}

// mean and rstd [N, G] of x, every piece's partial first (in parallel), then each group's merged.
template <typename T, typename stat_t>
void group_stats(const T* x, const Layout& v, double eps, stat_t* mean, stat_t* rstd) {
  const int64_t ng = v.n * v.g;
  if (!v.rows) {
    const int64_t m = v.group_size(), per_group = v.pieces(m);
    std::vector<Welford<double>> parts(ng * per_group);  // [group][piece]
    at::parallel_for(0, ng * per_group, grain_for(std::min(m, kPiece)), [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t first = (item % per_group) * kPiece;
        parts[item] = run_moments(x + (item / per_group) * m + first, std::min(kPiece, m - first));
      }
    });
    at::parallel_for(0, ng, std::max<int64_t>(1, 1024 / per_group), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) finish_group(parts.data() + i * per_group, per_group, eps, mean[i], rstd[i]);
    });
    return;
  }
  const int64_t blocks = v.blocks(), br = v.block_rows();
  std::vector<Welford<double>> parts(v.n * blocks * v.g);  // [n][block][g]
  at::parallel_for(0, v.n * blocks, grain_for(br * v.c), [&](int64_t lo, int64_t hi) {
    std::vector<math_t<T>> scratch(3 * v.c);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t r0 = (item % blocks) * br;
      block_moments(x + (item / blocks) * v.s * v.c, r0, std::min(v.s, r0 + br), v, scratch.data(),
                    parts.data() + item * v.g);
    }
  });
  // Each n's groups merged block by block: every group's blocks in block order.
  at::parallel_for(0, v.n, std::max<int64_t>(1, 1024 / (blocks * v.g)), [&](int64_t lo, int64_t hi) {
    std::vector<Welford<double>> st(v.g);
    for (int64_t n = lo; n < hi; ++n) {
      std::fill(st.begin(), st.end(), Welford<double>{0.0, 0.0, 0.0});
      for (int64_t k = 0; k < blocks; ++k) {
        const Welford<double>* part = parts.data() + (n * blocks + k) * v.g;
        for (int64_t g = 0; g < v.g; ++g) st[g] = welford_merge(st[g], part[g]);
      }
      for (int64_t g = 0; g < v.g; ++g) finish(st[g], eps, mean[n * v.g + g], rstd[n * v.g + g]);
    }
  });
}

// ---- elementwise spans ---------------------------------------------------------------------------

// A span's per-element parameters. Rows: arrays indexed by the element's channel (the span is a
// row of C); runs: one value each (the span is one (n, c)).
template <typename A>
struct Params {
  const A *mean, *rstd, *w, *b, *c1, *c2;
};

template <bool Rows, typename A>
inline Vectorized<A> param(const A* p, int64_t i, int64_t k) {
  if constexpr (Rows) {
    return load<A>(p + i, k);
  } else {
    return Vectorized<A>(*p);
  }
}

// y = act(((x - mean) * rstd) * w + b), rounded once to T.
template <int Act, bool Rows, typename T, typename A>
void forward_span(const T* x, T* y, int64_t len, const Params<A>& q) {
  constexpr int64_t kV = Vectorized<A>::size();
  for (int64_t i = 0; i < len; i += kV) {
    const int64_t k = std::min(kV, len - i);
    const auto pre = norm_forward(load<A>(x + i, k), param<Rows>(q.mean, i, k), param<Rows>(q.rstd, i, k),
                                  param<Rows>(q.w, i, k), param<Rows>(q.b, i, k));
    store(gn_activate<Act, VecMath>(pre), y + i, k);
  }
}

// xhat, and dz: the gradient at the pre-activation xhat * w + b recomputed from x.
template <int Act, bool Rows, typename T, typename A>
inline void xhat_dz(const T* x, const T* dy, int64_t i, int64_t k, const Params<A>& q, Vectorized<A>& xhat,
                    Vectorized<A>& dz) {
  xhat = (load<A>(x + i, k) - param<Rows>(q.mean, i, k)) * param<Rows>(q.rstd, i, k);
  dz = gn_activation_grad<Act, VecMath>(load<A>(dy + i, k), xhat * param<Rows>(q.w, i, k) + param<Rows>(q.b, i, k));
}

// Rows: sum_dzx[c] += dz * xhat and sum_dz[c] += dz per channel of the row. Runs: the span's sums,
// over the vector's lanes (element i in lane i % kV), added in lane order in double.
template <int Act, bool Rows, typename T, typename A, typename S>
void grad_sums_span(const T* x, const T* dy, int64_t len, const Params<A>& q, S* sum_dzx, S* sum_dz) {
  using Vec = Vectorized<A>;
  constexpr int64_t kV = Vec::size();
  const Vec zero(A(0));
  Vec acc_dzx = zero, acc_dz = zero;
  for (int64_t i = 0; i < len; i += kV) {
    const int64_t k = std::min(kV, len - i);
    Vec xhat, dz;
    xhat_dz<Act, Rows>(x, dy, i, k, q, xhat, dz);
    if constexpr (Rows) {
      store(load<A>(sum_dzx + i, k) + dz * xhat, sum_dzx + i, k);
      store(load<A>(sum_dz + i, k) + dz, sum_dz + i, k);
    } else {
      acc_dzx += Vec::set(zero, dz * xhat, k);  // lanes past the span's end add nothing
      acc_dz += Vec::set(zero, dz, k);
    }
  }
  if constexpr (!Rows) {
    *sum_dzx = fold(acc_dzx);
    *sum_dz = fold(acc_dz);
  }
}

// dx = (w dz - (xhat c1 + c2)) rstd.
template <int Act, bool Rows, typename T, typename A>
void dx_span(const T* x, const T* dy, T* dx, int64_t len, const Params<A>& q) {
  constexpr int64_t kV = Vectorized<A>::size();
  for (int64_t i = 0; i < len; i += kV) {
    const int64_t k = std::min(kV, len - i);
    Vectorized<A> xhat, dz;
    xhat_dz<Act, Rows>(x, dy, i, k, q, xhat, dz);
    store(norm_backward(dz * param<Rows>(q.w, i, k), xhat, param<Rows>(q.c1, i, k), param<Rows>(q.c2, i, k),
                        param<Rows>(q.rstd, i, k)),
          dx + i, k);
  }
}

// [N, G] values as [N, C] (each channel its group's), in the element math's type.
template <typename A, typename S>
std::vector<A> per_channel(const S* by_group, const Layout& v) {
  std::vector<A> out(v.n * v.c);
  for (int64_t i = 0; i < v.n * v.c; ++i) out[i] = static_cast<A>(by_group[(i / v.c) * v.g + (i % v.c) / v.cg()]);
  return out;
}

// f(offset, length, params) for every run (n, c), or every row (n, s); the statistics come expanded
// to [N, C] (c1, c2 null in the forward), w and b as C values.
template <typename A, typename F>
void for_each_span(const Layout& v, const A* mean_nc, const A* rstd_nc, const A* w, const A* b, const A* c1_nc,
                   const A* c2_nc, F f) {
  if (!v.rows) {
    at::parallel_for(0, v.n * v.c, grain_for(v.s), [&](int64_t lo, int64_t hi) {
      for (int64_t nc = lo; nc < hi; ++nc) {
        const int64_t c = nc % v.c;
        f(nc * v.s, v.s, Params<A>{mean_nc + nc, rstd_nc + nc, w + c, b + c, c1_nc ? c1_nc + nc : nullptr,
                                   c2_nc ? c2_nc + nc : nullptr});
      }
    });
    return;
  }
  at::parallel_for(0, v.n * v.s, grain_for(v.c), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t nc = (r / v.s) * v.c;
      f(r * v.c, v.c,
        Params<A>{mean_nc + nc, rstd_nc + nc, w, b, c1_nc ? c1_nc + nc : nullptr, c2_nc ? c2_nc + nc : nullptr});
    }
  });
}

void check_activation(int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 3, "fusedtech: group_norm activation code must be 0..3, got ", act);
}

// ---- forward -------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cpu(const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 int64_t num_groups, double eps, int64_t act) {
  check_activation(act);
  const Layout v = layout_of(x, num_groups);
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({v.n, v.g}, x.options().dtype(stat));
  at::Tensor rstd = at::empty({v.n, v.g}, x.options().dtype(stat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_fwd_cpu", [&] {
    using A = math_t<scalar_t>;
    const std::vector<A> w = channel_values<A>(weight, x, A(1), "weight"), b = channel_values<A>(bias, x, A(0), "bias");
    if (v.n == 0) return;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    A *mp = mean.data_ptr<A>(), *rp = rstd.data_ptr<A>();
    with_activation(act, [&](auto a) {
      constexpr int Act = decltype(a)::value;
      if (v.group_tasks(sizeof(scalar_t))) {  // each group's statistics, then its output from L2
        at::parallel_for(0, v.n * v.g, grain_for(v.group_size()), [&](int64_t lo, int64_t hi) {
          std::vector<Welford<double>> parts(v.pieces(v.group_size()));
          for (int64_t i = lo; i < hi; ++i) {
            run_group_parts(xp, v, i, parts.data());
            finish_group(parts.data(), static_cast<int64_t>(parts.size()), eps, mp[i], rp[i]);
            for (int64_t nc = i * v.cg(); nc < (i + 1) * v.cg(); ++nc) {
              const int64_t c = nc % v.c;
              forward_span<Act, false>(xp + nc * v.s, yp + nc * v.s, v.s,
                                       Params<A>{mp + i, rp + i, &w[c], &b[c], nullptr, nullptr});
            }
          }
        });
        return;
      }
      group_stats(xp, v, eps, mp, rp);
      const std::vector<A> mean_nc = per_channel<A>(mp, v), rstd_nc = per_channel<A>(rp, v);
      const A* none = nullptr;
      for_each_span(v, mean_nc.data(), rstd_nc.data(), w.data(), b.data(), none, none,
                    [&](int64_t off, int64_t len, const Params<A>& q) {
                      if (v.rows) {
                        forward_span<Act, true>(xp + off, yp + off, len, q);
                      } else {
                        forward_span<Act, false>(xp + off, yp + off, len, q);
                      }
                    });
    });
  });
  return {y, mean, rstd};
}

// ---- backward ------------------------------------------------------------------------------------

// The sums of dz * xhat and dz over piece k of run nc, into out[0], out[1].
template <int Act, typename T, typename A>
void piece_grad_sums(const T* xp, const T* gp, const Layout& v, int64_t nc, int64_t k, const Params<A>& q,
                     double* out) {
  const int64_t off = nc * v.s + k * kPiece;
  grad_sums_span<Act, false>(xp + off, gp + off, std::min(kPiece, v.s - k * kPiece), q, out, out + 1);
}

// Runs: the sums per (n, c), every piece's first (in parallel), then each run's added in order.
template <int Act, typename T, typename A>
void run_grad_sums(const T* xp, const T* gp, const Layout& v, const A* mean_nc, const A* rstd_nc, const A* w,
                   const A* b, double* sum_dzx, double* sum_dz) {
  const int64_t per_run = v.pieces(v.s);
  std::vector<double> parts(2 * v.n * v.c * per_run);  // [n c][piece][dzx, dz]
  at::parallel_for(0, v.n * v.c * per_run, grain_for(std::min(v.s, kPiece)), [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t nc = item / per_run, c = nc % v.c;
      piece_grad_sums<Act>(xp, gp, v, nc, item % per_run,
                           Params<A>{mean_nc + nc, rstd_nc + nc, w + c, b + c, nullptr, nullptr}, &parts[2 * item]);
    }
  });
  for (int64_t nc = 0; nc < v.n * v.c; ++nc) {
    sum_dzx[nc] = sum_dz[nc] = 0.0;
    for (int64_t k = 0; k < per_run; ++k) {
      sum_dzx[nc] += parts[2 * (nc * per_run + k)];
      sum_dz[nc] += parts[2 * (nc * per_run + k) + 1];
    }
  }
}

// Rows: the sums per (n, c), over blocks of rows (in A, per channel), the blocks added in order.
template <int Act, typename T, typename A>
void row_grad_sums(const T* xp, const T* gp, const Layout& v, const A* mean_nc, const A* rstd_nc, const A* w,
                   const A* b, double* sum_dzx, double* sum_dz) {
  const int64_t blocks = v.blocks(), br = v.block_rows();
  std::vector<A> parts(2 * v.n * blocks * v.c);  // [n][block][dzx, dz][c]
  at::parallel_for(0, v.n * blocks, grain_for(br * v.c), [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t n = item / blocks, r0 = (item % blocks) * br, r1 = std::min(v.s, r0 + br);
      A* acc = parts.data() + 2 * item * v.c;
      std::fill_n(acc, 2 * v.c, A(0));
      const Params<A> q{mean_nc + n * v.c, rstd_nc + n * v.c, w, b, nullptr, nullptr};
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = (n * v.s + r) * v.c;
        grad_sums_span<Act, true>(xp + off, gp + off, v.c, q, acc, acc + v.c);
      }
    }
  });
  std::fill_n(sum_dzx, v.n * v.c, 0.0);
  std::fill_n(sum_dz, v.n * v.c, 0.0);
  for (int64_t n = 0; n < v.n; ++n)
    for (int64_t k = 0; k < blocks; ++k) {
      const A* part = parts.data() + 2 * (n * blocks + k) * v.c;
      for (int64_t c = 0; c < v.c; ++c) {
        sum_dzx[n * v.c + c] += part[c];
        sum_dz[n * v.c + c] += part[v.c + c];
      }
    }
}

// c1, c2 of group i: the group means of w dz xhat and w dz, from the per-(n, c) sums.
template <typename A>
void group_c1_c2(const Layout& v, int64_t i, const A* w, const double* sum_dzx, const double* sum_dz, A& c1, A& c2) {
  double s1 = 0.0, s2 = 0.0;
  for (int64_t nc = i * v.cg(); nc < (i + 1) * v.cg(); ++nc) {
    s1 += static_cast<double>(w[nc % v.c]) * sum_dzx[nc];
    s2 += static_cast<double>(w[nc % v.c]) * sum_dz[nc];
  }
  const double count = static_cast<double>(v.group_size());
  c1 = static_cast<A>(s1 / count);
  c2 = static_cast<A>(s2 / count);
}

void check_bwd_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                    int64_t num_groups) {
  TORCH_CHECK(dy.device() == x.device(), "fusedtech: group_norm grad (dy) is on ", dy.device(), " but input is on ",
              x.device());
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "fusedtech: group_norm grad (dy) is ",
              dy.scalar_type(), " ", dy.sizes(), " but input is ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(same_layout(dy, x), "fusedtech: group_norm grad (dy) must have the input's strides ", x.strides(),
              ", got ", dy.strides());
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == stat && t->numel() == x.size(0) * num_groups,
                "fusedtech: group_norm ", name, " must be ", stat, " [", x.size(0), ", ", num_groups, "] on ",
                x.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                                 int64_t num_groups, int64_t act) {
  check_activation(act);
  const Layout v = layout_of(x, num_groups);
  check_bwd_args(dy, x, mean_in, rstd_in, num_groups);
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty({v.c}, x.options().dtype(stat)), db = at::empty({v.c}, x.options().dtype(stat));
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_bwd_cpu", [&] {
    using A = math_t<scalar_t>;
    const std::vector<A> w = channel_values<A>(weight, x, A(1), "weight"), b = channel_values<A>(bias, x, A(0), "bias");
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const A *mp = mean.const_data_ptr<A>(), *rp = rstd.const_data_ptr<A>();
    std::vector<double> sum_dzx(v.n * v.c), sum_dz(v.n * v.c);
    // dweight, dbias: the per-(n, c) sums over n, in order.
    auto finish_weight_grads = [&] {
      A *dwp = dw.data_ptr<A>(), *dbp = db.data_ptr<A>();
      for (int64_t c = 0; c < v.c; ++c) {
        double s_dzx = 0.0, s_dz = 0.0;
        for (int64_t n = 0; n < v.n; ++n) s_dzx += sum_dzx[n * v.c + c], s_dz += sum_dz[n * v.c + c];
        dwp[c] = static_cast<A>(s_dzx);
        dbp[c] = static_cast<A>(s_dz);
      }
    };
    with_activation(act, [&](auto a) {
      constexpr int Act = decltype(a)::value;
      if (v.group_tasks(2 * sizeof(scalar_t))) {  // each group's sums, then its dx from L2
        at::parallel_for(0, v.n * v.g, grain_for(v.group_size()), [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) {
            for (int64_t nc = i * v.cg(); nc < (i + 1) * v.cg(); ++nc) {
              const int64_t c = nc % v.c;
              sum_dzx[nc] = sum_dz[nc] = 0.0;
              for (int64_t k = 0; k < v.pieces(v.s); ++k) {  // in order, as run_grad_sums adds them
                double part[2];
                piece_grad_sums<Act>(xp, gp, v, nc, k, Params<A>{mp + i, rp + i, &w[c], &b[c], nullptr, nullptr}, part);
                sum_dzx[nc] += part[0];
                sum_dz[nc] += part[1];
              }
            }
            A c1, c2;
            group_c1_c2(v, i, w.data(), sum_dzx.data(), sum_dz.data(), c1, c2);
            for (int64_t nc = i * v.cg(); nc < (i + 1) * v.cg(); ++nc) {
              const int64_t c = nc % v.c;
              dx_span<Act, false>(xp + nc * v.s, gp + nc * v.s, dxp + nc * v.s, v.s,
                                  Params<A>{mp + i, rp + i, &w[c], &b[c], &c1, &c2});
            }
          }
        });
        return;
      }
      const std::vector<A> mean_nc = per_channel<A>(mp, v), rstd_nc = per_channel<A>(rp, v);
      (v.rows ? row_grad_sums<Act, scalar_t, A> : run_grad_sums<Act, scalar_t, A>)(
          xp, gp, v, mean_nc.data(), rstd_nc.data(), w.data(), b.data(), sum_dzx.data(), sum_dz.data());
      std::vector<A> c1(v.n * v.g), c2(v.n * v.g);
      for (int64_t i = 0; i < v.n * v.g; ++i) group_c1_c2(v, i, w.data(), sum_dzx.data(), sum_dz.data(), c1[i], c2[i]);
      const std::vector<A> c1_nc = per_channel<A>(c1.data(), v), c2_nc = per_channel<A>(c2.data(), v);
      for_each_span(v, mean_nc.data(), rstd_nc.data(), w.data(), b.data(), c1_nc.data(), c2_nc.data(),
                    [&](int64_t off, int64_t len, const Params<A>& q) {
                      if (v.rows) {
                        dx_span<Act, true>(xp + off, gp + off, dxp + off, len, q);
                      } else {
                        dx_span<Act, false>(xp + off, gp + off, dxp + off, len, q);
                      }
                    });
    });
    finish_weight_grads();
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) {
  m.impl("group_norm_fwd", &group_norm_fwd_cpu);
  m.impl("group_norm_bwd", &group_norm_bwd_cpu);
}

}  // namespace fusedtech::cpu
