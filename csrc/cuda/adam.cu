// Fused multi-tensor Adam/AdamW step on CUDA tensors: one launch per 32 tensors / 320 chunks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedtech/adam.h"
#include "multi_tensor_apply.cuh"
#include "quantization.cuh"

namespace fusedtech::cuda {
namespace {

constexpr int kDepth = 6;  // param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master
using Meta = TensorListMeta<kDepth>;

struct AdamArgs {
  AdamHyper h;
  double lr, beta1, beta2, weight_decay;
  const float* lr_ptr;      // Tensor lr on the device, or null
  const float* grad_scale;  // GradScaler's scale, or null
  const float* found_inf;   // GradScaler's flag, or null
};

template <typename P, typename S>
__device__ __forceinline__ void adam_element(int64_t i, P* p, const P* g, S* m, S* v, S* vmax,
                                             float* master, float inv_scale, const AdamHyper& h,
                                             const AdamTensorScalars& s) {
  float pf = master ? master[i] : static_cast<float>(p[i]);
  float mf = static_cast<float>(m[i]);
  float vf = static_cast<float>(v[i]);
  float vmaxf = h.amsgrad ? static_cast<float>(vmax[i]) : 0.0f;
  adam_update(pf, static_cast<float>(g[i]) * inv_scale, mf, vf, vmaxf, h, s);
  if (master) master[i] = pf;
  p[i] = static_cast<P>(pf);
  m[i] = static_cast<S>(mf);
  v[i] = static_cast<S>(vf);
  if (h.amsgrad) vmax[i] = static_cast<S>(vmaxf);
}

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) adam_kernel(Meta meta, AdamArgs a) {
  if (a.found_inf && *a.found_inf != 0.0f) return;  // GradScaler found inf/nan: skip the step
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t end = min(meta.numel[t], begin + kChunkElements);
  P* p = static_cast<P*>(meta.addr[0][t]);
  const P* g = static_cast<const P*>(meta.addr[1][t]);
  S* m = static_cast<S*>(meta.addr[2][t]);
  S* v = static_cast<S*>(meta.addr[3][t]);
  S* vmax = static_cast<S*>(meta.addr[4][t]);
  float* master = static_cast<float*>(meta.addr[5][t]);

  // Once per block, in double, like torch's Python-float bias corrections.
  const double lr = a.lr_ptr ? static_cast<double>(*a.lr_ptr) : a.lr;
  const AdamTensorScalars s =
      adam_tensor_scalars(lr, a.beta1, a.beta2, a.weight_decay, *meta.step[t]);
  const float inv_scale = a.grad_scale ? 1.0f / *a.grad_scale : 1.0f;
  const AdamHyper h = a.h;

  // Vector body when every operand of this tensor is aligned (chunk starts are multiples of kILP,
  // so the base address decides), then a scalar tail; otherwise scalar throughout.
  const bool vec = aligned_for_vec<kILP>(p) && aligned_for_vec<kILP>(g) &&
                   aligned_for_vec<kILP>(m) && aligned_for_vec<kILP>(v) &&
                   (!h.amsgrad || aligned_for_vec<kILP>(vmax)) &&
                   (!master || aligned_for_vec<kILP>(master));
  int64_t scalar_from = begin;
  if (vec) {
    const int64_t nvec = (end - begin) / kILP;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t i = begin + j * kILP;
      Vec<P, kILP> pv = *reinterpret_cast<const Vec<P, kILP>*>(p + i);
      const Vec<P, kILP> gv = *reinterpret_cast<const Vec<P, kILP>*>(g + i);
      Vec<S, kILP> mv = *reinterpret_cast<const Vec<S, kILP>*>(m + i);
      Vec<S, kILP> vv = *reinterpret_cast<const Vec<S, kILP>*>(v + i);
      Vec<S, kILP> xv;
      Vec<float, kILP> wv;
      if (h.amsgrad) xv = *reinterpret_cast<const Vec<S, kILP>*>(vmax + i);
      if (master) wv = *reinterpret_cast<const Vec<float, kILP>*>(master + i);
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        float pf = master ? wv.v[k] : static_cast<float>(pv.v[k]);
        float mf = static_cast<float>(mv.v[k]);
        float vf = static_cast<float>(vv.v[k]);
        float xf = h.amsgrad ? static_cast<float>(xv.v[k]) : 0.0f;
        adam_update(pf, static_cast<float>(gv.v[k]) * inv_scale, mf, vf, xf, h, s);
        wv.v[k] = pf;
        pv.v[k] = static_cast<P>(pf);
        mv.v[k] = static_cast<S>(mf);
        vv.v[k] = static_cast<S>(vf);
        xv.v[k] = static_cast<S>(xf);
      }
      *reinterpret_cast<Vec<P, kILP>*>(p + i) = pv;
      *reinterpret_cast<Vec<S, kILP>*>(m + i) = mv;
      *reinterpret_cast<Vec<S, kILP>*>(v + i) = vv;
      if (h.amsgrad) *reinterpret_cast<Vec<S, kILP>*>(vmax + i) = xv;
      if (master) *reinterpret_cast<Vec<float, kILP>*>(master + i) = wv;
    }
    scalar_from = begin + nvec * kILP;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += blockDim.x) {
    adam_element(i, p, g, m, v, vmax, master, inv_scale, h, s);
  }
}

const float* optional_scalar(const std::optional<at::Tensor>& t, const char* name,
                             const at::Device& device) {
  if (!t) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1,
              "fusedtech: ", name, " must be a one-element float32 tensor on ", device, ", got ",
              t->scalar_type(), " on ", t->device());
  return t->data_ptr<float>();
}

// What both launchers hand their kernels, from the op's arguments.
AdamArgs adam_args(double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                   double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const at::Device& device) {
  AdamArgs args;
  args.h = adam_hyper(beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize);
  args.lr = lr;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.weight_decay = weight_decay;
  args.lr_ptr = optional_scalar(lr_tensor, "lr", device);
  args.grad_scale = optional_scalar(grad_scale, "grad_scale", device);
  args.found_inf = optional_scalar(found_inf, "found_inf", device);
  return args;
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList master_params, at::TensorList steps, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                    double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    std::optional<int64_t> stochastic_round_seed) {
  if (params.empty()) return;
  TORCH_CHECK(!stochastic_round_seed,
              "fusedtech: the cuda backend's adam_step has no stochastic rounding; the triton backend has");
  check_param_list(params);
  const bool has_master = !master_params.empty();
  const auto pdtype = params[0].scalar_type();
  const auto sdtype = has_master ? at::kFloat : pdtype;
  check_like_params(params, grads, "grads", pdtype);
  check_like_params(params, exp_avgs, "exp_avgs", sdtype);
  check_like_params(params, exp_avg_sqs, "exp_avg_sqs", sdtype);
  if (amsgrad) check_like_params(params, max_exp_avg_sqs, "max_exp_avg_sqs", sdtype);
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  check_steps(params, steps);
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fusedtech: adam_step (cuda) got params on ", device);
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].device() == device, "fusedtech: steps[", i, "] is on ",
                steps[i].device(), " but params are on ", device);
  }
  c10::cuda::CUDAGuard guard(device);

  const AdamArgs args = adam_args(lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                                  grad_scale, found_inf, device);

  const std::array<at::TensorList, kDepth> lists{
      params, grads, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList(),
      master_params};
  const auto stream = at::cuda::getCurrentCUDAStream();
  FT_DISPATCH_FLOAT_TYPES(pdtype, "adam_step_cuda", [&] {
    using P = scalar_t;
    auto run = [&](auto state_tag) {
      using S = decltype(state_tag);
      multi_tensor_apply<kDepth>(lists, steps, [&](const Meta& meta, int blocks) {
        adam_kernel<P, S><<<blocks, kThreads, 0, stream>>>(meta, args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (has_master) run(float{}); else run(P{});
  });
}

// Quantized states (fusedtech/quantization.h): a block of 256 threads walks its chunk one
// quantization block at a time, a thread an element: dequantize, adam_update, then each state's new
// absmax by a block reduction and its codes. Operands: param, grad, then codes and absmax of exp_avg,
// exp_avg_sq, max_exp_avg_sq, then master (16 tensors a launch keep the arguments under 4 KiB).
constexpr int kQuantDepth = 9;
constexpr int kQuantTensors = 16;
using QuantMeta = TensorListMeta<kQuantDepth, kQuantTensors>;

struct QuantTables {
  const float* first;   // signed: exp_avg
  const float* second;  // unsigned: exp_avg_sq, max_exp_avg_sq
};

template <typename P, bool AMSGRAD, bool MASTER>
__global__ void __launch_bounds__(kQuantThreads) adam_quantized_kernel(QuantMeta meta, AdamArgs a, QuantTables q) {
  if (a.found_inf && *a.found_inf != 0.0f) return;
  __shared__ float first[256], first_mids[255], second[256], second_mids[255], scratch[8];
  load_table(q.first, first, first_mids);
  load_table(q.second, second, second_mids);
  const BlockChunk c = block_chunk(meta);
  P* p = static_cast<P*>(meta.addr[0][c.t]);
  const P* g = static_cast<const P*>(meta.addr[1][c.t]);
  uint8_t* m_codes = static_cast<uint8_t*>(meta.addr[2][c.t]);
  float* m_absmax = static_cast<float*>(meta.addr[3][c.t]);
  uint8_t* v_codes = static_cast<uint8_t*>(meta.addr[4][c.t]);
  float* v_absmax = static_cast<float*>(meta.addr[5][c.t]);
  uint8_t* x_codes = static_cast<uint8_t*>(meta.addr[6][c.t]);
  float* x_absmax = static_cast<float*>(meta.addr[7][c.t]);
  float* master = static_cast<float*>(meta.addr[8][c.t]);
  const double lr = a.lr_ptr ? static_cast<double>(*a.lr_ptr) : a.lr;
  const AdamTensorScalars s = adam_tensor_scalars(lr, a.beta1, a.beta2, a.weight_decay, *meta.step[c.t]);
  const float inv_scale = a.grad_scale ? 1.0f / *a.grad_scale : 1.0f;
  const AdamHyper h = a.h;
  for (int64_t start = c.begin; start < c.end; start += kQuantBlock) {  // chunks begin on block boundaries
    const int64_t i = start + threadIdx.x, blk = start / kQuantBlock;
    const bool live = i < c.end;
    float pf = 0.0f, mf = 0.0f, vf = 0.0f, xf = 0.0f;
    if (live) {
      pf = MASTER ? master[i] : static_cast<float>(p[i]);
      mf = dequantize_code(m_codes[i], first, m_absmax[blk]);
      vf = dequantize_code(v_codes[i], second, v_absmax[blk]);
      if (AMSGRAD) xf = dequantize_code(x_codes[i], second, x_absmax[blk]);
      adam_update(pf, static_cast<float>(g[i]) * inv_scale, mf, vf, xf, h, s);
      if (MASTER) master[i] = pf;
      p[i] = static_cast<P>(pf);
    }
    // Padding past the tensor's end counts as 0: it never raises an absmax.
    const float m_max = block_absmax(live ? mf : 0.0f, scratch);
    const float v_max = block_absmax(live ? vf : 0.0f, scratch);
    const float x_max = AMSGRAD ? block_absmax(live ? xf : 0.0f, scratch) : 0.0f;
    if (live) {
      m_codes[i] = static_cast<uint8_t>(quantize_code<8>(mf * quant_inverse(m_max), first_mids));
      v_codes[i] = static_cast<uint8_t>(quantize_code<8>(vf * quant_inverse(v_max), second_mids));
      if (AMSGRAD) x_codes[i] = static_cast<uint8_t>(quantize_code<8>(xf * quant_inverse(x_max), second_mids));
    }
    if (threadIdx.x == 0) {
      m_absmax[blk] = m_max;
      v_absmax[blk] = v_max;
      if (AMSGRAD) x_absmax[blk] = x_max;
    }
  }
}

void adam_step_quantized_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sqs,
                              at::TensorList exp_avg_sq_absmaxes, at::TensorList max_exp_avg_sqs,
                              at::TensorList max_exp_avg_sq_absmaxes, at::TensorList master_params,
                              at::TensorList steps, const at::Tensor& signed_table, const at::Tensor& unsigned_table,
                              double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                              double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                              std::optional<int64_t> stochastic_round_seed) {
  if (params.empty()) return;
  TORCH_CHECK(!stochastic_round_seed,
              "fusedtech: the cuda backend's adam_step_quantized has no stochastic rounding; the triton backend has");
  check_param_list(params);
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fusedtech: adam_step_quantized (cuda) got params on ", device);
  const bool has_master = !master_params.empty();
  const auto pdtype = params[0].scalar_type();
  check_like_params(params, grads, "grads", pdtype);
  check_quantized_state(params, exp_avgs, "exp_avgs", exp_avg_absmaxes, "exp_avg_absmaxes");
  check_quantized_state(params, exp_avg_sqs, "exp_avg_sqs", exp_avg_sq_absmaxes, "exp_avg_sq_absmaxes");
  if (amsgrad) check_quantized_state(params, max_exp_avg_sqs, "max_exp_avg_sqs", max_exp_avg_sq_absmaxes, "max_exp_avg_sq_absmaxes");
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  check_steps(params, steps);
  for (const at::Tensor* table : {&signed_table, &unsigned_table}) {
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->numel() == 256 && table->is_contiguous() &&
                    table->device() == device,
                "fusedtech: adam_step_quantized tables must be contiguous float32 tensors of 256 values on ", device);
  }
  c10::cuda::CUDAGuard guard(device);
  const AdamArgs args = adam_args(lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                                  grad_scale, found_inf, device);
  const QuantTables tables{signed_table.const_data_ptr<float>(), unsigned_table.const_data_ptr<float>()};
  const at::TensorList none;
  const std::array<at::TensorList, kQuantDepth> lists{
      params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes,
      amsgrad ? max_exp_avg_sqs : none, amsgrad ? max_exp_avg_sq_absmaxes : none, master_params};
  const auto stream = at::cuda::getCurrentCUDAStream();
  FT_DISPATCH_FLOAT_TYPES(pdtype, "adam_step_quantized_cuda", [&] {
    using P = scalar_t;
    auto run = [&](auto amsgrad_tag, auto master_tag) {
      constexpr bool kAmsgrad = decltype(amsgrad_tag)::value;
      constexpr bool kMaster = decltype(master_tag)::value;
      multi_tensor_apply<kQuantDepth, kQuantTensors>(lists, steps, [&](const QuantMeta& meta, int blocks) {
        adam_quantized_kernel<P, kAmsgrad, kMaster><<<blocks, kQuantThreads, 0, stream>>>(meta, args, tables);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    using T = std::true_type;
    using F = std::false_type;
    if (amsgrad) {
      has_master ? run(T{}, T{}) : run(T{}, F{});
    } else {
      has_master ? run(F{}, T{}) : run(F{}, F{});
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("adam_step_quantized_", &adam_step_quantized_cuda);
}

}  // namespace fusedtech::cuda
