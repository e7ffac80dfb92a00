// Fused multi-tensor Adam/AdamW step on CPU tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "fusedtech/adam.h"
#include "quantization.h"
#include "multi_tensor.h"

namespace fusedtech::cpu {
namespace {

// One chunk: a single SIMD loop, each element loaded into fp32 locals, updated, stored back.
// h and s arrive by value: as locals the compiler knows they cannot alias the arrays, hoists every
// option test out of the loop and vectorises it.
template <typename P, typename S, bool AMSGRAD, bool MASTER, bool STOCHASTIC>
__attribute__((noinline)) void adam_chunk(const Chunk& c, P* __restrict param, const P* __restrict grad, S* __restrict exp_avg,
                S* __restrict exp_avg_sq, S* __restrict max_exp_avg_sq, float* __restrict master,
                float inv_grad_scale, const AdamHyper h, const AdamTensorScalars s,
                const uint32_t* __restrict draws) {
  const int64_t begin = c.begin, end = c.end;
  for (int64_t i = begin; i < end; ++i) {
    float p = MASTER ? master[i] : to_float(param[i]);
    float m = to_float(exp_avg[i]);
    float v = to_float(exp_avg_sq[i]);
    float vmax = AMSGRAD ? to_float(max_exp_avg_sq[i]) : 0.0f;
    adam_update(p, to_float(grad[i]) * inv_grad_scale, m, v, vmax, h, s);
    if (MASTER) master[i] = p;
    param[i] = round_param<P, STOCHASTIC>(p, draws, i - begin);
    exp_avg[i] = from_float<S>(m);
    exp_avg_sq[i] = from_float<S>(v);
    if (AMSGRAD) max_exp_avg_sq[i] = from_float<S>(vmax);
  }
}


// One block's new values into codes and its absmax (the oracle's quantize_blockwise of the block).
inline void requantize_block(const float* values, int64_t count, uint8_t* codes, float* absmax, const QuantTable& q) {
  const float amax = block_absmax(values, count);
  quantize_run(values, count, quant_inverse(amax), codes, q);
  *absmax = amax;
}

// Quantized states (8-bit codes and a float32 absmax per kQuantBlock elements; the signed table for
// the first moment, the unsigned one for the second and its running maximum). Per block: dequantize
// into block-sized buffers, update in fp32 there (the same adam_update, a loop the compiler
// vectorises), then requantize them with the block's new absmax. Chunks start on block boundaries (kChunkElements is a multiple).
struct QuantTables {
  const QuantTable& first;   // signed: the first moment
  const QuantTable& second;  // unsigned: the second moments
};

template <typename P, bool AMSGRAD, bool MASTER, bool STOCHASTIC>
__attribute__((noinline)) void adam_quantized_chunk(
    const Chunk& c, P* __restrict param, const P* __restrict grad, uint8_t* __restrict m_codes,
    float* __restrict m_absmax, uint8_t* __restrict v_codes, float* __restrict v_absmax,
    uint8_t* __restrict vmax_codes, float* __restrict vmax_absmax, float* __restrict master,
    float inv_grad_scale, const AdamHyper h, const AdamTensorScalars s, const QuantTables q,
    const uint32_t* __restrict draws) {
  float m_new[kQuantBlock], v_new[kQuantBlock], vmax_new[kQuantBlock];
  const float* signed_values = q.first.values.data();
  const float* unsigned_values = q.second.values.data();
  for (int64_t begin = c.begin; begin < c.end; begin += kQuantBlock) {
    const int64_t end = std::min(c.end, begin + kQuantBlock), count = end - begin, blk = begin / kQuantBlock;
    dequantize_run(m_codes + begin, count, m_absmax[blk], signed_values, m_new);
    dequantize_run(v_codes + begin, count, v_absmax[blk], unsigned_values, v_new);
    if (AMSGRAD) dequantize_run(vmax_codes + begin, count, vmax_absmax[blk], unsigned_values, vmax_new);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = begin + k;
      float p = MASTER ? master[i] : to_float(param[i]);
      float m = m_new[k];
      float v = v_new[k];
      float vmax = AMSGRAD ? vmax_new[k] : 0.0f;
      adam_update(p, to_float(grad[i]) * inv_grad_scale, m, v, vmax, h, s);
      if (MASTER) master[i] = p;
      param[i] = round_param<P, STOCHASTIC>(p, draws, i - c.begin);
      m_new[k] = m;
      v_new[k] = v;
      if (AMSGRAD) vmax_new[k] = vmax;
    }
    requantize_block(m_new, count, m_codes + begin, m_absmax + blk, q.first);
    requantize_block(v_new, count, v_codes + begin, v_absmax + blk, q.second);
    if (AMSGRAD) requantize_block(vmax_new, count, vmax_codes + begin, vmax_absmax + blk, q.second);
  }
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList master_params, at::TensorList steps, double lr,
                   const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                   double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   std::optional<int64_t> stochastic_round_seed) {
  if (params.empty()) return;
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
  TORCH_CHECK(params[0].device().is_cpu(), "fusedtech: adam_step (cpu) got params on ",
              params[0].device());

  if (found_inf && found_inf->item<double>() != 0.0) return;  // GradScaler: skip the step
  const float inv_grad_scale =
      grad_scale ? static_cast<float>(1.0 / grad_scale->item<double>()) : 1.0f;
  if (lr_tensor) lr = lr_tensor->item<double>();

  const AdamHyper h = adam_hyper(beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize);
  std::vector<AdamTensorScalars> per_tensor(params.size());
  std::vector<double> step_values(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    step_values[t] = steps[t].item<double>();
    per_tensor[t] = adam_tensor_scalars(lr, beta1, beta2, weight_decay, step_values[t]);
  }
  check_stochastic_round(stochastic_round_seed, pdtype, has_master);

  FT_DISPATCH_FLOAT_TYPES(pdtype, "adam_step_cpu", [&] {
    using P = scalar_t;
    auto run = [&](auto state_tag, auto amsgrad_tag, auto master_tag, auto stochastic_tag) {
      using S = decltype(state_tag);
      constexpr bool kAmsgrad = decltype(amsgrad_tag)::value;
      constexpr bool kMaster = decltype(master_tag)::value;
      constexpr bool kStochastic = decltype(stochastic_tag)::value;
      for_each_chunk(params, [&](const Chunk& c) {
        const int64_t t = c.tensor;
        adam_chunk<P, S, kAmsgrad, kMaster, kStochastic>(
            c, params[t].data_ptr<P>(), grads[t].const_data_ptr<P>(), exp_avgs[t].data_ptr<S>(),
            exp_avg_sqs[t].data_ptr<S>(), kAmsgrad ? max_exp_avg_sqs[t].data_ptr<S>() : nullptr,
            kMaster ? master_params[t].data_ptr<float>() : nullptr, inv_grad_scale, h,
            per_tensor[t], stochastic_round_draws(stochastic_round_seed, c, step_values[t]));
      });
    };
    using T = std::true_type;
    using F = std::false_type;
    if (has_master) {
      amsgrad ? run(float{}, T{}, T{}, F{}) : run(float{}, F{}, T{}, F{});
    } else if (stochastic_round_seed) {
      amsgrad ? run(P{}, T{}, F{}, T{}) : run(P{}, F{}, F{}, T{});
    } else {
      amsgrad ? run(P{}, T{}, F{}, F{}) : run(P{}, F{}, F{}, F{});
    }
  });
}


void adam_step_quantized_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sqs,
                             at::TensorList exp_avg_sq_absmaxes, at::TensorList max_exp_avg_sqs,
                             at::TensorList max_exp_avg_sq_absmaxes, at::TensorList master_params,
                             at::TensorList steps, const at::Tensor& signed_table, const at::Tensor& unsigned_table,
                             double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                             double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             std::optional<int64_t> stochastic_round_seed) {
  if (params.empty()) return;
  check_param_list(params);
  TORCH_CHECK(params[0].device().is_cpu(), "fusedtech: adam_step_quantized (cpu) got params on ", params[0].device());
  const bool has_master = !master_params.empty();
  const auto pdtype = params[0].scalar_type();
  check_like_params(params, grads, "grads", pdtype);
  check_quantized_state(params, exp_avgs, "exp_avgs", exp_avg_absmaxes, "exp_avg_absmaxes");
  check_quantized_state(params, exp_avg_sqs, "exp_avg_sqs", exp_avg_sq_absmaxes, "exp_avg_sq_absmaxes");
  if (amsgrad) check_quantized_state(params, max_exp_avg_sqs, "max_exp_avg_sqs", max_exp_avg_sq_absmaxes, "max_exp_avg_sq_absmaxes");
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  check_steps(params, steps);
  const StepScalars scalars = step_scalars(lr, lr_tensor, grad_scale, found_inf);
  if (scalars.skip) return;
  const AdamHyper h = adam_hyper(beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize);
  std::vector<AdamTensorScalars> per_tensor(params.size());
  std::vector<double> step_values(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    step_values[t] = steps[t].item<double>();
    per_tensor[t] = adam_tensor_scalars(scalars.lr, beta1, beta2, weight_decay, step_values[t]);
  }
  check_stochastic_round(stochastic_round_seed, pdtype, has_master);
  const QuantTables q{quant_table(signed_table), quant_table(unsigned_table)};
  FT_DISPATCH_FLOAT_TYPES(pdtype, "adam_step_quantized_cpu", [&] {
    using P = scalar_t;
    with_bool(amsgrad, [&](auto amsgrad_tag) {
      with_bool(has_master, [&](auto master_tag) {
      with_bool(stochastic_round_seed.has_value() && !has_master, [&](auto stochastic_tag) {
        constexpr bool kAmsgrad = decltype(amsgrad_tag)::value;
        constexpr bool kMaster = decltype(master_tag)::value;
        constexpr bool kStochastic = decltype(stochastic_tag)::value;
        for_each_chunk(params, [&](const Chunk& c) {
          const int64_t t = c.tensor;
          adam_quantized_chunk<P, kAmsgrad, kMaster, kStochastic>(
              c, params[t].data_ptr<P>(), grads[t].const_data_ptr<P>(), exp_avgs[t].data_ptr<uint8_t>(),
              exp_avg_absmaxes[t].data_ptr<float>(), exp_avg_sqs[t].data_ptr<uint8_t>(),
              exp_avg_sq_absmaxes[t].data_ptr<float>(), kAmsgrad ? max_exp_avg_sqs[t].data_ptr<uint8_t>() : nullptr,
              kAmsgrad ? max_exp_avg_sq_absmaxes[t].data_ptr<float>() : nullptr,
              kMaster ? master_params[t].data_ptr<float>() : nullptr, scalars.inv_grad_scale, h, per_tensor[t], q,
              stochastic_round_draws(stochastic_round_seed, c, step_values[t]));
        });
      });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("adam_step_quantized_", &adam_step_quantized_cpu);
}

}  // namespace fusedtech::cpu
