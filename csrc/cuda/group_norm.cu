// GroupNorm (+ activation) forward and backward on CUDA tensors, read in place in either dense layout
// (the CPU kernels' two: runs, NCHW, where each (n, c) is S contiguous elements and a group C / G * S;
// rows, channels_last, where each (n, s) is C contiguous channels). Bandwidth-bound, so every kernel
// reads memory in order across a warp, 16 bytes a thread where alignment allows (V elements).
//   runs: work comes in lines (a group or a run, cut into slices of at least kMinSlice elements
//     when there are too few to fill the GPU), TX threads a line, TY lines a block;
//   rows: a block takes TY rows at a time of one n, thread tx a fixed vector of channels (so its
//     per-channel values are loaded once), over a slice of the S rows.
// Reductions have no atomics: per-thread partials, fixed trees within a block, each block's partial
// written to its own slot, the slots merged in order by a later kernel: deterministic. Statistics
// are Welford / Chan (group_norm.h) in fp32; the backward's sums of dz * xhat and dz are per (n, c),
// from which dweight, dbias (over n) and the dx coefficients c1, c2 (over a group) follow.
// Written and compiled for sm_80 / sm_90; first run on a GPU pending.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"
#include "fusedtech/group_norm.h"

namespace fusedtech::cuda {
namespace {

constexpr int kThreads = 256;
// Slicing aims at about this many blocks (a function of the shape, not of the GPU: the same
// partials, so the same bits, on every GPU), each slice at least kMinSlice elements.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinSlice = 2048;

struct Shape {
  int64_t n, c, s, g;
  __host__ __device__ int64_t cg() const { return c / g; }
  __host__ __device__ int64_t group_size() const { return c / g * s; }
};

using Stat = Welford<float>;

// ---- loads, stores, reductions -------------------------------------------------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = static_cast<float>(pk.v[j]);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int j = 0; j < V; ++j) pk.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

struct Merge {
  __device__ Stat operator()(const Stat& a, const Stat& b) const { return welford_merge(a, b); }
};
struct Add {
  __device__ float2 operator()(const float2& a, const float2& b) const { return {a.x + b.x, a.y + b.y}; }
};

__device__ __forceinline__ Stat shfl_down(const Stat& a, int offset, int width) {
  return {__shfl_down_sync(0xffffffffu, a.n, offset, width), __shfl_down_sync(0xffffffffu, a.mean, offset, width),
          __shfl_down_sync(0xffffffffu, a.m2, offset, width)};
}
__device__ __forceinline__ float2 shfl_down(const float2& a, int offset, int width) {
  return {__shfl_down_sync(0xffffffffu, a.x, offset, width), __shfl_down_sync(0xffffffffu, a.y, offset, width)};
}

// The reduction of v over the blockDim.x (a power of two) threads of each line (threadIdx.y), a
// fixed tree: within warps by shuffles, then the line's warps in order. Valid in threadIdx.x == 0.
// Every thread of the block must call it.
template <typename R, typename Op>
__device__ R line_reduce(R v, R* shared, Op op) {
  const int tx = threadIdx.x, width = min(static_cast<int>(blockDim.x), 32);
  for (int offset = width / 2; offset > 0; offset >>= 1) v = op(v, shfl_down(v, offset, width));
  if (blockDim.x <= 32) return v;
  const int warps = blockDim.x / 32, warp = threadIdx.y * warps + tx / 32;  // TX > 32: TY <= 8, whole warps
  if (tx % 32 == 0) shared[warp] = v;
  __syncthreads();
  if (tx == 0)
    for (int k = 1; k < warps; ++k) v = op(v, shared[warp + k]);
  return v;
}

// Rows: the reduction of each thread's V values over threadIdx.y (the block's rows), a fixed tree
// in shared memory (kThreads * V values). Valid in threadIdx.y == 0. Every thread must call it.
template <int V, typename R, typename Op>
__device__ void column_reduce(R (&v)[V], R* shared, Op op) {
  const int tx = threadIdx.x, ty = threadIdx.y, tX = blockDim.x, tY = blockDim.y;
#pragma unroll
  for (int j = 0; j < V; ++j) shared[(ty * tX + tx) * V + j] = v[j];
  __syncthreads();
  int span = 1;
  while (span < tY) span <<= 1;
  for (int stride = span / 2; stride > 0; stride >>= 1) {
    if (ty < stride && ty + stride < tY) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        R& mine = shared[(ty * tX + tx) * V + j];
        mine = op(mine, shared[((ty + stride) * tX + tx) * V + j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = shared[tx * V + j];
}

// ---- work split ----------------------------------------------------------------------------------

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs: `count` lines of `len` elements (multiples of v), each cut into `split` slices of `chunk`.
struct LinePlan {
  int64_t split, chunk, lines, blocks;
  int tx, ty;
};

LinePlan line_plan(int64_t count, int64_t len, int v) {
  LinePlan p;
  p.split = std::clamp<int64_t>(cdiv(kTargetBlocks, count), 1, std::max<int64_t>(1, len / kMinSlice));
  p.chunk = cdiv(cdiv(len, p.split), v) * v;
  p.split = cdiv(len, p.chunk);
  int tx = 1;
  while (tx < kThreads && tx < cdiv(p.chunk, v)) tx <<= 1;
  p.tx = tx;
  p.ty = kThreads / tx;
  p.lines = count * p.split;
  p.blocks = cdiv(p.lines, p.ty);
  TORCH_CHECK(p.blocks < (int64_t{1} << 31), "fusedtech: group_norm input too large for one launch");
  return p;
}

// Rows: blocks (n, row slice, channel tile); tx over a tile of up to 32 channel vectors (a warp
// reads 32 consecutive vectors of a row, or whole narrow rows), ty over rows. A slice has at least
// min_rows rows: reductions ask for kReductionRows, so that their per-slice partials stay few.
struct RowPlan {
  int64_t tiles, split, rows_per, blocks;
  int tx, ty;
};

constexpr int64_t kReductionRows = 64;

RowPlan row_plan(const Shape& sh, int v, int64_t min_rows) {
  RowPlan p;
  const int64_t cv = sh.c / v;
  p.tx = static_cast<int>(std::min<int64_t>(cv, 32));
  p.ty = kThreads / p.tx;
  p.tiles = cdiv(cv, p.tx);
  min_rows = std::max<int64_t>(min_rows, 4 * p.ty);  // four rows a thread at least
  p.split = std::clamp<int64_t>(cdiv(kTargetBlocks, sh.n * p.tiles), 1, std::max<int64_t>(1, sh.s / min_rows));
  p.rows_per = cdiv(sh.s, p.split);
  p.split = cdiv(sh.s, p.rows_per);
  p.blocks = sh.n * p.split * p.tiles;
  TORCH_CHECK(p.blocks < (int64_t{1} << 31), "fusedtech: group_norm input too large for one launch");
  return p;
}

// A rows block's coordinates: its n, its rows [r0, r1), this thread's channel vector (cv < C / V).
struct RowBlock {
  int64_t n, slice, r0, r1, cv;
  bool active;
};

__device__ RowBlock row_block(const Shape& sh, const RowPlan& p, int v) {
  const int64_t tile = blockIdx.x % p.tiles, ns = blockIdx.x / p.tiles;
  RowBlock rb;
  rb.n = ns / p.split;
  rb.slice = ns % p.split;
  rb.r0 = rb.slice * p.rows_per;
  rb.r1 = min(sh.s, rb.r0 + p.rows_per);
  rb.cv = tile * blockDim.x + threadIdx.x;
  rb.active = rb.cv < sh.c / v;
  return rb;
}

// ---- statistics ----------------------------------------------------------------------------------

// The exact (count, mean, m2) of V values (their mean, then the squared deviations from it).
template <int V>
__device__ __forceinline__ Stat pack_stat(const float (&v)[V]) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < V; ++j) s += v[j];
  const float mean = s * (1.f / V);
  float m2 = 0.f;
#pragma unroll
  for (int j = 0; j < V; ++j) m2 += (v[j] - mean) * (v[j] - mean);
  return {static_cast<float>(V), mean, m2};
}

// Runs: line l = slice l % split of group l / split; one pack (V values) merged at a time.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) stats_runs_kernel(const T* __restrict__ x, Stat* __restrict__ part,
                                                              LinePlan p, int64_t m) {
  __shared__ Stat shared[kThreads / 32];
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  Stat st{0.f, 0.f, 0.f};
  if (l < p.lines) {
    const T* xg = x + (l / p.split) * m;
    const int64_t begin = (l % p.split) * p.chunk, end = min(m, begin + p.chunk);
#pragma unroll 4
    for (int64_t j = begin + threadIdx.x * V; j < end; j += static_cast<int64_t>(blockDim.x) * V) {
      float v[V];
      load_pack<V>(xg + j, v);
      st = welford_merge(st, pack_stat<V>(v));
    }
  }
  st = line_reduce(st, shared, Merge{});
  if (threadIdx.x == 0 && l < p.lines) part[l] = st;
}

// Rows: per channel, Welford down the block's rows (the V channels of a thread share the count and
// its reciprocal), merged over the block's rows; partial (slice, channel) of group (n, g) written at
// part[(n G + g) * split * cg + slice * cg + channel within the group].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) stats_rows_kernel(const T* __restrict__ x, Stat* __restrict__ part,
                                                              Shape sh, RowPlan p) {
  __shared__ Stat shared[kThreads * V];
  const RowBlock rb = row_block(sh, p, V);
  Stat st[V];
#pragma unroll
  for (int j = 0; j < V; ++j) st[j] = {0.f, 0.f, 0.f};
  if (rb.active) {
    const T* xr = x + rb.n * sh.s * sh.c + rb.cv * V;
    float count = 0.f;
#pragma unroll 4
    for (int64_t r = rb.r0 + threadIdx.y; r < rb.r1; r += blockDim.y) {
      float v[V];
      load_pack<V>(xr + r * sh.c, v);
      count += 1.f;
      const float inv = 1.f / count;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        st[j].n = count;
        welford_step(st[j], v[j], inv);
      }
    }
  }
  column_reduce<V>(st, shared, Merge{});
  if (threadIdx.y == 0 && rb.active) {
    const int64_t cg = sh.cg(), per_group = p.split * cg;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = rb.cv * V + j, g = c / cg;
      part[(rb.n * sh.g + g) * per_group + rb.slice * cg + (c - g * cg)] = st[j];
    }
  }
}

// One block per group: its partials merged in order (thread t takes t, t + kThreads, ...; then a
// fixed tree), then mean and 1 / sqrt(biased variance + eps).
__global__ void __launch_bounds__(kThreads) stats_combine_kernel(const Stat* __restrict__ part, int64_t per_group,
                                                                 float eps, float* __restrict__ mean,
                                                                 float* __restrict__ rstd) {
  __shared__ Stat shared[kThreads / 32];
  const Stat* pg = part + static_cast<int64_t>(blockIdx.x) * per_group;
  Stat st{0.f, 0.f, 0.f};
  for (int64_t k = threadIdx.x; k < per_group; k += kThreads) st = welford_merge(st, pg[k]);
  st = line_reduce(st, shared, Merge{});
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = st.mean;
    // Correctly rounded sqrt and divide (rsqrtf is off by up to 2 ulp), as the LayerNorm kernels.
    rstd[blockIdx.x] = 1.f / sqrtf(st.m2 / st.n + eps);
  }
}

// ---- elementwise: forward output, backward sums, dx ----------------------------------------------

// A channel's values: group statistics, weight and bias, and (backward) the dx coefficients.
struct ChannelParams {
  float mean, rstd, w, b, c1, c2;
};

struct Pointers {
  const float *mean, *rstd, *w, *b, *c1, *c2;  // mean .. c2: [N, G]; w, b: [C] or null
};

__device__ __forceinline__ ChannelParams channel_params(const Pointers& q, const Shape& sh, int64_t n, int64_t c) {
  const int64_t i = n * sh.g + c / sh.cg();
  return {q.mean[i], q.rstd[i], q.w ? q.w[c] : 1.f, q.b ? q.b[c] : 0.f, q.c1 ? q.c1[i] : 0.f, q.c2 ? q.c2[i] : 0.f};
}

// The kinds of elementwise pass: FWD writes y; SUMS accumulates dz * xhat and dz; DX writes dx.
enum Pass { FWD, SUMS, DX };

template <int ACT, Pass P>
__device__ __forceinline__ void element(float xv, float g, const ChannelParams& k, float& out, float2& acc) {
  if constexpr (P == FWD) {
    out = gn_activate<ACT>(norm_forward(xv, k.mean, k.rstd, k.w, k.b));
  } else {
    const float xhat = (xv - k.mean) * k.rstd;
    const float dz = gn_activation_grad<ACT>(g, xhat * k.w + k.b);
    if constexpr (P == SUMS) {
      acc.x += dz * xhat;
      acc.y += dz;
    } else {
      out = norm_backward(dz * k.w, xhat, k.c1, k.c2, k.rstd);
    }
  }
}

// Runs: line l = slice l % split of run (n, c) = l / split. FWD: y = out; SUMS: part[l] = the
// line's sums; DX: dx = out.
template <typename T, int V, int ACT, Pass P>
__global__ void __launch_bounds__(kThreads) runs_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                                        T* __restrict__ out, float2* __restrict__ part, Pointers q,
                                                        Shape sh, LinePlan p) {
  __shared__ float2 shared[kThreads / 32];
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  float2 acc{0.f, 0.f};
  if (l < p.lines) {
    const int64_t nc = l / p.split, begin = (l % p.split) * p.chunk, end = min(sh.s, begin + p.chunk);
    const ChannelParams k = channel_params(q, sh, nc / sh.c, nc % sh.c);
    const int64_t base = nc * sh.s;
#pragma unroll 4
    for (int64_t j = begin + threadIdx.x * V; j < end; j += static_cast<int64_t>(blockDim.x) * V) {
      float xv[V], g[V], o[V];
      load_pack<V>(x + base + j, xv);
      if constexpr (P != FWD) load_pack<V>(dy + base + j, g);
#pragma unroll
      for (int i = 0; i < V; ++i) element<ACT, P>(xv[i], P == FWD ? 0.f : g[i], k, o[i], acc);
      if constexpr (P != SUMS) store_pack<V>(out + base + j, o);
    }
  }
  if constexpr (P == SUMS) {
    acc = line_reduce(acc, shared, Add{});
    if (threadIdx.x == 0 && l < p.lines) part[l] = acc;
  }
}

// Rows: the thread's V channels' values loaded once; SUMS: part[(n split + slice) C + c] = the
// channel's sums over the block's rows.
template <typename T, int V, int ACT, Pass P>
__global__ void __launch_bounds__(kThreads) rows_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                                        T* __restrict__ out, float2* __restrict__ part, Pointers q,
                                                        Shape sh, RowPlan p) {
  __shared__ float2 shared[P == SUMS ? kThreads * V : 1];
  const RowBlock rb = row_block(sh, p, V);
  float2 acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = {0.f, 0.f};
  if (rb.active) {
    ChannelParams k[V];
#pragma unroll
    for (int j = 0; j < V; ++j) k[j] = channel_params(q, sh, rb.n, rb.cv * V + j);
    const int64_t base = rb.n * sh.s * sh.c + rb.cv * V;
#pragma unroll 4
    for (int64_t r = rb.r0 + threadIdx.y; r < rb.r1; r += blockDim.y) {
      float xv[V], g[V], o[V];
      load_pack<V>(x + base + r * sh.c, xv);
      if constexpr (P != FWD) load_pack<V>(dy + base + r * sh.c, g);
#pragma unroll
      for (int j = 0; j < V; ++j) element<ACT, P>(xv[j], P == FWD ? 0.f : g[j], k[j], o[j], acc[j]);
      if constexpr (P != SUMS) store_pack<V>(out + base + r * sh.c, o);
    }
  }
  if constexpr (P == SUMS) {
    column_reduce<V>(acc, shared, Add{});
    if (threadIdx.y == 0 && rb.active) {
#pragma unroll
      for (int j = 0; j < V; ++j) part[(rb.n * p.split + rb.slice) * sh.c + rb.cv * V + j] = acc[j];
    }
  }
}

// Per (n, c): its slices' sums added in order (slice k at part[first + k * step]).
__global__ void bwd_run_sums_kernel(const float2* __restrict__ part, float2* __restrict__ sums, Shape sh,
                                    int64_t split, bool rows) {
  const int64_t nc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (nc >= sh.n * sh.c) return;
  const int64_t n = nc / sh.c, c = nc % sh.c;
  const int64_t first = rows ? n * split * sh.c + c : nc * split, step = rows ? sh.c : 1;
  float2 s{0.f, 0.f};
  for (int64_t k = 0; k < split; ++k) s = Add{}(s, part[first + k * step]);
  sums[nc] = s;
}

// Threads [0, C): dweight, dbias = the per-(n, c) sums over n in order. Threads [C, C + N G): c1,
// c2 of group i = the group's means of w dz xhat and w dz.
__global__ void bwd_coefficients_kernel(const float2* __restrict__ sums, const float* __restrict__ w,
                                        float* __restrict__ dw, float* __restrict__ db, float* __restrict__ c1,
                                        float* __restrict__ c2, Shape sh) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < sh.c) {
    float2 s{0.f, 0.f};
    for (int64_t n = 0; n < sh.n; ++n) s = Add{}(s, sums[n * sh.c + t]);
    dw[t] = s.x;
    db[t] = s.y;
    return;
  }
  const int64_t i = t - sh.c;
  if (i >= sh.n * sh.g) return;
  const int64_t cg = sh.cg(), first = (i / sh.g) * sh.c + (i % sh.g) * cg;
  float s1 = 0.f, s2 = 0.f;
  for (int64_t j = 0; j < cg; ++j) {
    const float wc = w ? w[(i % sh.g) * cg + j] : 1.f;
    s1 += wc * sums[first + j].x;
    s2 += wc * sums[first + j].y;
  }
  const float count = static_cast<float>(sh.group_size());
  c1[i] = s1 / count;
  c2[i] = s2 / count;
}

// ---- launchers -----------------------------------------------------------------------------------

struct Input {
  Shape sh;
  bool rows;
};

Input input_of(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.is_cuda(), "fusedtech: group_norm (cuda) got input on ", x.device());
  TORCH_CHECK(x.dim() >= 2, "fusedtech: group_norm input must be (N, C, *), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fusedtech: group_norm (cuda) input must be float32, float16 or bfloat16, got ", dt);
  Input in{{x.size(0), x.size(1), 1, groups}, false};
  for (int64_t d = 2; d < x.dim(); ++d) in.sh.s *= x.size(d);
  TORCH_CHECK(groups > 0 && in.sh.c >= groups && in.sh.c % groups == 0,
              "fusedtech: group_norm num_groups must divide the ", in.sh.c, " channels of input, got ", groups);
  TORCH_CHECK(in.sh.s > 0, "fusedtech: group_norm input must have a spatial size of at least 1, got shape ",
              x.sizes());
  const bool channels_last = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                             (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  TORCH_CHECK(x.is_contiguous() || channels_last,
              "fusedtech: group_norm input must be contiguous or channels_last(_3d), got shape ", x.sizes(),
              " with strides ", x.strides());
  // With S == 1 both layouts are the same memory (and x is contiguous); runs of one element keep every
  // thread busy, where rows would leave all but a block's first row of threads idle.
  in.rows = !x.is_contiguous();
  return in;
}

at::Tensor channel_floats(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t) return at::Tensor();
  TORCH_CHECK(t->device() == x.device(), "fusedtech: group_norm ", name, " is on ", t->device(), " but input is on ",
              x.device());
  TORCH_CHECK(t->numel() == x.size(1), "fusedtech: group_norm ", name, " has ", t->numel(), " elements, expected ",
              x.size(1));
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fusedtech: group_norm ", name, " must be floating point, got ",
              t->scalar_type());
  return t->reshape({x.size(1)}).to(at::kFloat).contiguous();
}

const float* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// 16 bytes a thread when every tensor is 16-byte aligned and the lines are whole vectors.
int vector_width(const Input& in, size_t elem, std::initializer_list<const at::Tensor*> ts) {
  const int v = static_cast<int>(16 / elem);
  for (const at::Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return 1;
  return (in.rows ? in.sh.c : in.sh.s) % v == 0 ? v : 1;
}

// f(std::integral_constant<int, V>) for V = 16 / sizeof(T) or 1.
template <typename T, typename F>
void with_width(int v, F f) {
  if (v > 1) {
    f(std::integral_constant<int, 16 / sizeof(T)>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// The elementwise pass P over every element: runs or rows kernel.
template <typename T, int V, int ACT, Pass P>
void launch_elementwise(const Input& in, const T* x, const T* dy, T* out, float2* part, const Pointers& q,
                        const LinePlan& lp, const RowPlan& rp, cudaStream_t stream) {
  if (in.rows) {
    rows_kernel<T, V, ACT, P><<<static_cast<unsigned>(rp.blocks), dim3(rp.tx, rp.ty), 0, stream>>>(x, dy, out, part, q,
                                                                                                in.sh, rp);
  } else {
    runs_kernel<T, V, ACT, P><<<static_cast<unsigned>(lp.blocks), dim3(lp.tx, lp.ty), 0, stream>>>(x, dy, out, part, q,
                                                                                                in.sh, lp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cuda(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   int64_t num_groups, double eps, int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 3, "fusedtech: group_norm activation code must be 0..3, got ", act);
  const Input in = input_of(x, num_groups);
  const Shape& sh = in.sh;
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = channel_floats(weight, x, "weight"), b = channel_floats(bias, x, "bias");
  at::Tensor y = at::empty_like(x);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({sh.n, sh.g}, opts), rstd = at::empty({sh.n, sh.g}, opts);
  if (sh.n == 0) return {y, mean, rstd};
  auto stream = at::cuda::getCurrentCUDAStream();
  FT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_fwd_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    with_width<scalar_t>(vector_width(in, sizeof(scalar_t), {&x, &y}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const LinePlan lp = line_plan(sh.n * sh.c, sh.s, V);
      const RowPlan rp = in.rows ? row_plan(sh, V, 1) : RowPlan{}, rs = in.rows ? row_plan(sh, V, kReductionRows) : rp;
      // Statistics: partials, then each group's merged in order.
      int64_t per_group;
      at::Tensor part;
      if (in.rows) {
        per_group = rs.split * sh.cg();
        part = at::empty({sh.n * sh.g * per_group * 3}, opts);
        stats_rows_kernel<scalar_t, V><<<static_cast<unsigned>(rs.blocks), dim3(rs.tx, rs.ty), 0, stream>>>(
            xp, reinterpret_cast<Stat*>(part.data_ptr<float>()), sh, rs);
      } else {
        const LinePlan sp = line_plan(sh.n * sh.g, sh.group_size(), V);
        per_group = sp.split;
        part = at::empty({sp.lines * 3}, opts);
        stats_runs_kernel<scalar_t, V><<<static_cast<unsigned>(sp.blocks), dim3(sp.tx, sp.ty), 0, stream>>>(
            xp, reinterpret_cast<Stat*>(part.data_ptr<float>()), sp, sh.group_size());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      stats_combine_kernel<<<static_cast<unsigned>(sh.n * sh.g), kThreads, 0, stream>>>(
          reinterpret_cast<const Stat*>(part.const_data_ptr<float>()), per_group, static_cast<float>(eps),
          mean.data_ptr<float>(), rstd.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const Pointers q{mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), ptr(w), ptr(b), nullptr, nullptr};
      with_activation(act, [&](auto a) {
        launch_elementwise<scalar_t, V, decltype(a)::value, FWD>(in, xp, nullptr, y.data_ptr<scalar_t>(), nullptr, q,
                                                                 lp, rp, stream);
      });
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                                   int64_t num_groups, int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 3, "fusedtech: group_norm activation code must be 0..3, got ", act);
  const Input in = input_of(x, num_groups);
  const Shape& sh = in.sh;
  TORCH_CHECK(dy.device() == x.device(), "fusedtech: group_norm grad (dy) is on ", dy.device(), " but input is on ",
              x.device());
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "fusedtech: group_norm grad (dy) is ",
              dy.scalar_type(), " ", dy.sizes(), " but input is ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(same_layout(dy, x), "fusedtech: group_norm grad (dy) must have the input's strides ", x.strides(),
              ", got ", dy.strides());
  for (const auto& [t, name] : {std::pair{&mean_in, "mean"}, std::pair{&rstd_in, "rstd"}}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == at::kFloat && t->numel() == sh.n * sh.g,
                "fusedtech: group_norm ", name, " must be Float [", sh.n, ", ", sh.g, "] on ", x.device(), ", got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = channel_floats(weight, x, "weight"), b = channel_floats(bias, x, "bias");
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::zeros({sh.c}, opts), db = at::zeros({sh.c}, opts);
  if (sh.n == 0) return {dx, dw, db};
  at::Tensor c1 = at::empty({sh.n, sh.g}, opts), c2 = at::empty({sh.n, sh.g}, opts);
  at::Tensor sums = at::empty({sh.n * sh.c * 2}, opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  FT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_bwd_cuda", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = dy.const_data_ptr<scalar_t>();
    with_width<scalar_t>(vector_width(in, sizeof(scalar_t), {&x, &dy, &dx}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const LinePlan lp = line_plan(sh.n * sh.c, sh.s, V);
      const RowPlan rp = in.rows ? row_plan(sh, V, 1) : RowPlan{}, rs = in.rows ? row_plan(sh, V, kReductionRows) : rp;
      const int64_t split = in.rows ? rs.split : lp.split;
      at::Tensor part = at::empty({sh.n * sh.c * split * 2}, opts);
      float2* pp = reinterpret_cast<float2*>(part.data_ptr<float>());
      float2* sp = reinterpret_cast<float2*>(sums.data_ptr<float>());
      const Pointers q_sums{mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), ptr(w), ptr(b), nullptr,
                            nullptr};
      Pointers q = q_sums;
      q.c1 = c1.const_data_ptr<float>();
      q.c2 = c2.const_data_ptr<float>();
      with_activation(act, [&](auto a) {
        constexpr int ACT = decltype(a)::value;
        launch_elementwise<scalar_t, V, ACT, SUMS>(in, xp, gp, nullptr, pp, q_sums, lp, rs, stream);
        bwd_run_sums_kernel<<<static_cast<unsigned>(cdiv(sh.n * sh.c, kThreads)), kThreads, 0, stream>>>(
            pp, sp, sh, split, in.rows);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        bwd_coefficients_kernel<<<static_cast<unsigned>(cdiv(sh.c + sh.n * sh.g, kThreads)), kThreads, 0, stream>>>(
            sp, ptr(w), dw.data_ptr<float>(), db.data_ptr<float>(), c1.data_ptr<float>(), c2.data_ptr<float>(), sh);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_elementwise<scalar_t, V, ACT, DX>(in, xp, gp, dx.data_ptr<scalar_t>(), nullptr, q, lp, rp, stream);
      });
    });
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CUDA, m) {
  m.impl("group_norm_fwd", &group_norm_fwd_cuda);
  m.impl("group_norm_bwd", &group_norm_bwd_cuda);
}

}  // namespace fusedtech::cuda
