// BatchNorm over dim 1 of (N, C, *) on CUDA tensors, NCHW or channels_last through one strided
// (N, C, S) view, and BatchNormAct2d's residual add and activation; the structure of the Triton
// kernels (triton_kernels/batch_norm.py), so both split the work the same way:
//   statistics: blocks (channel, slice) each merge their slice with Welford/Chan in a fixed tree,
//     then one thread per channel merges the slices in order: deterministic;
//   normalise: eight logical elements per thread, so ReLU's mask byte is written whole;
//   backward: blocks (channel, slice) sum the pre-activation gradient g and g * xhat, the slices
//     are summed in order by torch, then dx (and the residual's gradient) elementwise.
// Activation codes: 0 none, 1 relu, 2 gelu, 3 silu. Written and compiled for sm_80/sm_90; first
// run on a GPU pending (the GPU tests exercise it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedtech/common.h"

#include <algorithm>
#include <tuple>

namespace fusedtech::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlockElements = 1024;  // slices are multiples of this (as the Triton kernels' BLOCK)
constexpr int64_t kTargetPrograms = 4 * 132;

struct View {
  int64_t n, c, s;     // sizes
  int64_t sn, sc, ss;  // strides
  __device__ int64_t address(int64_t k) const {  // logical index (n, c, s) -> memory offset
    return (k / (s * c)) * sn + ((k / s) % c) * sc + (k % s) * ss;
  }
  __device__ int64_t channel_address(int64_t j, int64_t ch) const {  // j-th element of channel ch
    return (j / s) * sn + ch * sc + (j % s) * ss;
  }
};

struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ Welford merge(Welford a, Welford b) {
  const float n = a.n + b.n;
  if (n == 0.f) return {0.f, 0.f, 0.f};
  const float delta = b.mean - a.mean, fb = b.n / n;
  // (delta * fb) * (delta * a.n): an empty side gives 0 * finite, where delta * delta can overflow
  // (|mean| > 1.8e19) and make inf * 0 = NaN.
  return {n, a.mean + delta * fb, a.m2 + b.m2 + (delta * fb) * (delta * a.n)};
}

template <int ACT>
__device__ __forceinline__ float activate(float v) {
  if constexpr (ACT == 1) return v > 0.f ? v : 0.f;
  if constexpr (ACT == 2) return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
  if constexpr (ACT == 3) return v / (1.f + expf(-v));
  return v;
}

// The gradient at the pre-activation: ReLU from its mask bit (logical element k); GELU and SiLU
// from the pre-activation recomputed as the forward computed it.
template <int ACT, bool LOAD_RES, typename T>
__device__ __forceinline__ float grad_pre(float g, float x, int64_t k, int64_t a, float mean, float invstd, float w,
                                          float b, const uint8_t* bits, const T* res) {
  if constexpr (ACT == 1) {
    return (bits[k >> 3] >> (k & 7)) & 1 ? g : 0.f;
  } else if constexpr (ACT >= 2) {
    float pre = (x - mean) * invstd;
    pre = pre * w;
    pre = pre + b;
    if constexpr (LOAD_RES) pre += static_cast<float>(res[a]);
    if constexpr (ACT == 2) {
      const float cdf = 0.5f * (1.f + erff(pre * 0.7071067811865476f));
      return g * (cdf + pre * expf(-0.5f * pre * pre) * 0.3989422804014327f);
    } else {
      const float sig = 1.f / (1.f + expf(-pre));
      return g * (sig * (1.f + pre * (1.f - sig)));
    }
  }
  return g;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) stats_kernel(const T* __restrict__ x, float* __restrict__ part, View v,
                                                         int64_t chunk, int64_t split) {
  __shared__ Welford shared[kThreads];
  const int64_t c = blockIdx.x, p = blockIdx.y, ns = v.n * v.s;
  const int64_t begin = p * chunk, end = begin + chunk < ns ? begin + chunk : ns;
  Welford st{0.f, 0.f, 0.f};
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const float xv = static_cast<float>(x[v.channel_address(j, c)]);
    st.n += 1.f;
    const float d = xv - st.mean;
    st.mean += d / st.n;
    st.m2 += d * (xv - st.mean);
  }
  shared[threadIdx.x] = st;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {  // a fixed tree: deterministic
    if (threadIdx.x < stride) shared[threadIdx.x] = merge(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float* out = part + (c * split + p) * 3;
    out[0] = shared[0].n;
    out[1] = shared[0].mean;
    out[2] = shared[0].m2;
  }
}

__global__ void stats_combine_kernel(const float* __restrict__ part, float* __restrict__ mean,
                                     float* __restrict__ invstd, float* __restrict__ unbiased, int64_t channels,
                                     int64_t split, float eps) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  Welford st{0.f, 0.f, 0.f};
  for (int64_t p = 0; p < split; ++p) {
    const float* in = part + (c * split + p) * 3;
    st = merge(st, Welford{in[0], in[1], in[2]});
  }
  const float var = st.n > 0.f ? st.m2 / st.n : 0.f;  // biased: what normalisation uses
  mean[c] = st.mean;
  invstd[c] = 1.f / sqrtf(var + eps);
  unbiased[c] = st.n > 1.f ? st.m2 / (st.n - 1.f) : var;
}

template <typename T, int ACT, bool HAS_RES>
__global__ void __launch_bounds__(kThreads) apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                         const float* __restrict__ mean, const float* __restrict__ invstd,
                                                         const float* __restrict__ w, const float* __restrict__ b,
                                                         const T* __restrict__ res, uint8_t* __restrict__ bits, View v,
                                                         int64_t total) {
  const int64_t groups = (total + 7) / 8;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; gi < groups;
       gi += static_cast<int64_t>(gridDim.x) * kThreads) {
    unsigned byte = 0;
    for (int t = 0; t < 8; ++t) {
      const int64_t k = gi * 8 + t;
      if (k >= total) break;
      const int64_t c = (k / v.s) % v.c, a = v.address(k);
      float pre = (static_cast<float>(x[a]) - mean[c]) * invstd[c];
      pre = pre * (w ? w[c] : 1.f);
      pre = pre + (b ? b[c] : 0.f);
      if constexpr (HAS_RES) pre += static_cast<float>(res[a]);
      const T out = static_cast<T>(activate<ACT>(pre));
      y[a] = out;
      if (ACT == 1 && static_cast<float>(out) > 0.f) byte |= 1u << t;
    }
    if constexpr (ACT == 1) bits[gi] = static_cast<uint8_t>(byte);
  }
}

template <typename T, int ACT, bool LOAD_RES>
__global__ void __launch_bounds__(kThreads) bwd_reduce_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                              const float* __restrict__ mean,
                                                              const float* __restrict__ invstd,
                                                              const float* __restrict__ w, const float* __restrict__ b,
                                                              const T* __restrict__ res, const uint8_t* __restrict__ bits,
                                                              float* __restrict__ part, View v, int64_t chunk,
                                                              int64_t split) {
  __shared__ float shared[2][kThreads];
  const int64_t c = blockIdx.x, p = blockIdx.y, ns = v.n * v.s;
  const int64_t begin = p * chunk, end = begin + chunk < ns ? begin + chunk : ns;
  const float m = mean[c], r = invstd[c], wc = w ? w[c] : 1.f, bc = b ? b[c] : 0.f;
  float sum_g = 0.f, sum_gx = 0.f;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const int64_t a = v.channel_address(j, c), k = (j / v.s) * (v.c * v.s) + c * v.s + j % v.s;
    const float xv = static_cast<float>(x[a]);
    const float g = grad_pre<ACT, LOAD_RES>(static_cast<float>(dy[a]), xv, k, a, m, r, wc, bc, bits, res);
    sum_g += g;
    sum_gx += g * (xv - m) * r;
  }
  shared[0][threadIdx.x] = sum_g;
  shared[1][threadIdx.x] = sum_gx;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      shared[0][threadIdx.x] += shared[0][threadIdx.x + stride];
      shared[1][threadIdx.x] += shared[1][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    part[c * split + p] = shared[0][0];
    part[(v.c + c) * split + p] = shared[1][0];
  }
}

template <typename T, int ACT, bool LOAD_RES, bool WRITE_DRES, bool TRAINING>
__global__ void __launch_bounds__(kThreads) bwd_apply_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                             T* __restrict__ dx, T* __restrict__ dres,
                                                             const float* __restrict__ mean,
                                                             const float* __restrict__ invstd,
                                                             const float* __restrict__ w, const float* __restrict__ b,
                                                             const T* __restrict__ res, const uint8_t* __restrict__ bits,
                                                             const float* __restrict__ sum_g,
                                                             const float* __restrict__ sum_gx, View v, int64_t total,
                                                             float count) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = (k / v.s) % v.c, a = v.address(k);
    const float xv = static_cast<float>(x[a]), m = mean[c], r = invstd[c], wc = w ? w[c] : 1.f;
    const float g = grad_pre<ACT, LOAD_RES>(static_cast<float>(dy[a]), xv, k, a, m, r, wc, b ? b[c] : 0.f, bits, res);
    if constexpr (WRITE_DRES) dres[a] = static_cast<T>(g);
    const float scale = r * wc;
    if constexpr (TRAINING) {
      const float xhat = (xv - m) * r;
      dx[a] = static_cast<T>(scale * (g - sum_g[c] / count - xhat * (sum_gx[c] / count)));
    } else {
      dx[a] = static_cast<T>(scale * g);
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------

// The step between consecutive elements of the trailing (spatial) dims, when those with extent form
// one uniformly strided run; -1 when they do not. Size-1 dims are skipped: their strides are
// arbitrary (torch calls (2, 8, 16, 1) with strides (128, 16, 1, 16) contiguous), so the last dim's
// stride is not the step.
int64_t spatial_step(const at::Tensor& x) {
  int64_t step = 1, inner = -1;  // inner: the innermost dim with extent seen so far
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) == 1) continue;
    if (inner < 0) {
      step = x.stride(d);
    } else if (x.stride(d) != x.stride(inner) * x.size(inner)) {
      return -1;
    }
    inner = d;
  }
  return step;
}

// x in a layout the kernels walk (contiguous or channels_last, else a contiguous copy) and its view.
std::pair<at::Tensor, View> channel_view(const at::Tensor& x_in, const char* name) {
  TORCH_CHECK(x_in.is_cuda(), "fusedtech: batch_norm (cuda) got ", name, " on ", x_in.device());
  TORCH_CHECK(x_in.dim() >= 2, "fusedtech: batch_norm ", name, " must have at least 2 dims, got ", x_in.sizes());
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fusedtech: batch_norm (cuda) supports float32, float16 and bfloat16 ", name, ", got ", dt);
  at::Tensor x = x_in;
  int64_t step = spatial_step(x);
  if (step < 0 || !(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast))) {
    x = x.contiguous();
    step = spatial_step(x);
  }
  View v{x.size(0), x.size(1), 1, x.stride(0), x.stride(1), step};
  for (int64_t d = 2; d < x.dim(); ++d) v.s *= x.size(d);
  return {x, v};
}

at::Tensor like(const at::Tensor& t, const at::Tensor& x) {  // t with x's strides
  if (t.strides() == x.strides()) return t;
  at::Tensor out = at::empty_like(x);
  out.copy_(t);
  return out;
}

std::pair<int64_t, int64_t> split_of(int64_t ns, int64_t channels) {  // (slices per channel, elements per slice)
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t split = std::max<int64_t>(1, std::min(cdiv(ns, kBlockElements), cdiv(kTargetPrograms, std::max<int64_t>(channels, 1))));
  const int64_t chunk = cdiv(cdiv(ns, split), kBlockElements) * kBlockElements;
  return {cdiv(ns, chunk), chunk};
}

int grid_for(int64_t items) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, 65535 * 8)));
}

at::Tensor float_or_undefined(const std::optional<at::Tensor>& t) {
  return t ? t->to(at::kFloat).contiguous() : at::Tensor();
}

template <typename F>
void with_bool(bool value, F f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& x_in, double eps) {
  auto [x, v] = channel_view(x_in, "input");
  c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(at::kFloat);
  const int64_t ns = v.n * v.s;
  if (v.c == 0 || ns == 0)  // an empty batch: zero statistics, as the other backends
    return {at::zeros({v.c}, opts), at::full({v.c}, 1.0 / std::sqrt(eps), opts), at::zeros({v.c}, opts)};
  at::Tensor mean = at::empty({v.c}, opts), invstd = at::empty({v.c}, opts), unbiased = at::empty({v.c}, opts);
  const auto [split, chunk] = split_of(ns, v.c);
  at::Tensor part = at::empty({v.c, split, 3}, x.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cuda", [&] {
    stats_kernel<scalar_t><<<dim3(static_cast<unsigned>(v.c), static_cast<unsigned>(split)), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), part.data_ptr<float>(), v, chunk, split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  stats_combine_kernel<<<grid_for(v.c), kThreads, 0, stream>>>(part.const_data_ptr<float>(), mean.data_ptr<float>(),
                                                               invstd.data_ptr<float>(), unbiased.data_ptr<float>(),
                                                               v.c, split, static_cast<float>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, invstd, unbiased};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_apply_cuda(const at::Tensor& x_in, const at::Tensor& mean,
                                                             const at::Tensor& invstd,
                                                             const std::optional<at::Tensor>& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             const std::optional<at::Tensor>& residual_in, int64_t act) {
  check_batch_norm_act(act, x_in, residual_in);
  auto [x, v] = channel_view(x_in, "input");
  check_channel_vectors(x, mean, invstd, weight, bias);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor residual;
  if (residual_in) {
    residual = like(*residual_in, x);
  }
  at::Tensor y = at::empty_like(x);
  const int64_t total = x.numel();
  at::Tensor bits = at::empty({act == 1 ? (total + 7) / 8 : 0}, x.options().dtype(at::kByte));
  if (total == 0) return {y, bits};
  const at::Tensor m = mean.to(at::kFloat).contiguous(), r = invstd.to(at::kFloat).contiguous();
  const at::Tensor w = float_or_undefined(weight), b = float_or_undefined(bias);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_apply_cuda", [&] {
    with_activation(act, [&](auto a) {
      with_bool(residual.defined(), [&](auto has_res) {
        apply_kernel<scalar_t, decltype(a)::value, decltype(has_res)::value><<<grid_for((total + 7) / 8), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), m.const_data_ptr<float>(), r.const_data_ptr<float>(),
            w.defined() ? w.const_data_ptr<float>() : nullptr, b.defined() ? b.const_data_ptr<float>() : nullptr,
            residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
            act == 1 ? bits.data_ptr<uint8_t>() : nullptr, v, total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {y, bits};
}

at::Tensor batch_norm_apply_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  return std::get<0>(batch_norm_act_apply_cuda(x, mean, invstd, weight, bias, std::nullopt, 0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_bwd_cuda(
    const at::Tensor& dy_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& extra, bool has_residual, int64_t act, bool training) {
  check_batch_norm_act_bwd(act, dy_in, x_in, extra);
  auto [x, v] = channel_view(x_in, "input");
  check_channel_vectors(x, mean, invstd, weight, bias);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = like(dy_in, x);
  const bool load_res = act >= 2 && extra.has_value();
  const at::Tensor res = load_res ? like(*extra, x) : at::Tensor();
  const at::Tensor bits = act == 1 ? extra->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dres = has_residual ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor sum_g = at::zeros({v.c}, x.options().dtype(at::kFloat)), sum_gx = at::zeros({v.c}, x.options().dtype(at::kFloat));
  const int64_t ns = v.n * v.s, total = x.numel();
  if (total == 0) return {dx, sum_gx, sum_g, dres};
  const at::Tensor m = mean.to(at::kFloat).contiguous(), r = invstd.to(at::kFloat).contiguous();
  const at::Tensor w = float_or_undefined(weight), b = float_or_undefined(bias);
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const auto [split, chunk] = split_of(ns, v.c);
  at::Tensor part = at::empty({2, v.c, split}, x.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_bwd_cuda", [&] {
    const scalar_t* rs = load_res ? res.const_data_ptr<scalar_t>() : nullptr;
    const uint8_t* bp8 = act == 1 ? bits.const_data_ptr<uint8_t>() : nullptr;
    with_activation(act, [&](auto a) {
      with_bool(load_res, [&](auto lr) {
        constexpr int A = decltype(a)::value;
        constexpr bool LR = decltype(lr)::value;
        bwd_reduce_kernel<scalar_t, A, LR><<<dim3(static_cast<unsigned>(v.c), static_cast<unsigned>(split)), kThreads, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), m.const_data_ptr<float>(),
            r.const_data_ptr<float>(), wp, bp, rs, bp8, part.data_ptr<float>(), v, chunk, split);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  // Slices summed in a fixed order (torch's reduction over the last dim): deterministic.
  const at::Tensor sums = part.sum(-1);
  sum_g = sums[0].contiguous();
  sum_gx = sums[1].contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_bwd_apply_cuda", [&] {
    const scalar_t* rs = load_res ? res.const_data_ptr<scalar_t>() : nullptr;
    const uint8_t* bp8 = act == 1 ? bits.const_data_ptr<uint8_t>() : nullptr;
    with_activation(act, [&](auto a) {
      with_bool(load_res, [&](auto lr) {
        with_bool(has_residual, [&](auto wd) {
          with_bool(training, [&](auto tr) {
            bwd_apply_kernel<scalar_t, decltype(a)::value, decltype(lr)::value, decltype(wd)::value, decltype(tr)::value>
                <<<grid_for(total), kThreads, 0, stream>>>(
                    dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                    has_residual ? dres.data_ptr<scalar_t>() : nullptr, m.const_data_ptr<float>(),
                    r.const_data_ptr<float>(), wp, bp, rs, bp8, sum_g.const_data_ptr<float>(),
                    sum_gx.const_data_ptr<float>(), v, total, static_cast<float>(ns));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  });
  return {dx, sum_gx, sum_g, dres};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean, const at::Tensor& invstd,
                                                                   bool training) {
  auto [dx, dw, db, dres] = batch_norm_act_bwd_cuda(dy, x, weight, std::nullopt, mean, invstd, std::nullopt, false, 0,
                                                    training);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CUDA, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_apply", &batch_norm_apply_cuda);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cuda);
  m.impl("batch_norm_act_apply", &batch_norm_act_apply_cuda);
  m.impl("batch_norm_act_bwd", &batch_norm_act_bwd_cuda);
}

}  // namespace fusedtech::cuda
