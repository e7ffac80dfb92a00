// Fused multi-tensor LAMB on CPU tensors: three passes over all tensors at once (see lamb.h):
// moments + per-chunk norm partials, per-tensor trust ratios (written to `norms`), update.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "fusedtech/lamb.h"
#include "multi_tensor.h"

namespace fusedtech::cpu {
namespace {

struct Partial {
  double weight_sq;
  double update_sq;
};

// kLanes independent fp32 accumulators per sum: the inner loop has no cross-iteration dependency,
// so GCC vectorises it without reassociation flags, and the summation order is fixed.
constexpr int kLanes = 16;

template <typename P, typename S, bool MASTER>
__attribute__((always_inline)) inline void lamb_element(int64_t i, const P* __restrict param,
                                                        const P* __restrict grad, S* __restrict exp_avg,
                                                        S* __restrict exp_avg_sq, const float* __restrict master,
                                                        float inv_scale, const LambHyper& h, const LambCorrection& bc,
                                                        float& wsq, float& usq) {
  const float p = MASTER ? master[i] : to_float(param[i]);
  float m = to_float(exp_avg[i]);
  float v = to_float(exp_avg_sq[i]);
  lamb_moments(to_float(grad[i]) * inv_scale, m, v, h);
  exp_avg[i] = from_float<S>(m);
  exp_avg_sq[i] = from_float<S>(v);
  const float u = lamb_direction(p, to_float(from_float<S>(m)), to_float(from_float<S>(v)), h, bc);
  wsq += p * p;
  usq += u * u;
}

template <typename P, typename S, bool MASTER>
__attribute__((noinline)) Partial lamb_pass1(const Chunk& c, const P* __restrict param, const P* __restrict grad,
                                             S* __restrict exp_avg, S* __restrict exp_avg_sq,
                                             const float* __restrict master, float inv_scale, const LambHyper h,
                                             const LambCorrection bc) {
  const int64_t begin = c.begin, end = c.end;
  float wsq[kLanes] = {}, usq[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      lamb_element<P, S, MASTER>(i + k, param, grad, exp_avg, exp_avg_sq, master, inv_scale, h, bc, wsq[k], usq[k]);
    }
  }
  for (; i < end; ++i) {
    lamb_element<P, S, MASTER>(i, param, grad, exp_avg, exp_avg_sq, master, inv_scale, h, bc, wsq[0], usq[0]);
  }
  Partial out{0.0, 0.0};
  for (int k = 0; k < kLanes; ++k) {
    out.weight_sq += wsq[k];
    out.update_sq += usq[k];
  }
  return out;
}

template <typename P, typename S, bool MASTER>
__attribute__((noinline)) void lamb_pass3(const Chunk& c, P* __restrict param, const S* __restrict exp_avg,
                                          const S* __restrict exp_avg_sq, float* __restrict master,
                                          float neg_step, const LambHyper h, const LambCorrection bc) {
  const int64_t begin = c.begin, end = c.end;
  for (int64_t i = begin; i < end; ++i) {
    const float p = MASTER ? master[i] : to_float(param[i]);
    const float u = lamb_direction(p, to_float(exp_avg[i]), to_float(exp_avg_sq[i]), h, bc);
    const float out = p + neg_step * u;
    if (MASTER) master[i] = out;
    param[i] = from_float<P>(out);
  }
}

void lamb_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList master_params, at::TensorList steps,
                   const at::Tensor& norms, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                   double beta2, double eps, double weight_decay, double clamp_lower, double clamp_upper,
                   bool debias, bool adam, bool grad_averaging, bool bias_correction, bool trust_clip,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  check_param_list(params);
  const bool has_master = !master_params.empty();
  const auto pdtype = params[0].scalar_type();
  const auto sdtype = has_master ? at::kFloat : pdtype;
  check_like_params(params, grads, "grads", pdtype);
  check_like_params(params, exp_avgs, "exp_avgs", sdtype);
  check_like_params(params, exp_avg_sqs, "exp_avg_sqs", sdtype);
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  check_steps(params, steps);
  check_lamb_norms(params, norms);
  TORCH_CHECK(params[0].device().is_cpu(), "fusedtech: lamb_step (cpu) got params on ", params[0].device());
  const StepScalars st = step_scalars(lr, lr_tensor, grad_scale, found_inf);
  if (st.skip) return;  // norms keep last step's values, as the moments do
  const size_t n = params.size();
  std::vector<double> step_of(n);
  std::vector<LambCorrection> correction(n);
  for (size_t t = 0; t < n; ++t) {
    step_of[t] = steps[t].item<double>();
    correction[t] = lamb_correction(beta1, beta2, step_of[t], bias_correction);
  }
  float* norms_out = norms.data_ptr<float>();
  const LambHyper h{static_cast<float>(beta1), static_cast<float>(beta2),
                    static_cast<float>(grad_averaging ? 1.0 - beta1 : 1.0), static_cast<float>(1.0 - beta2),
                    static_cast<float>(eps), static_cast<float>(weight_decay)};
  const std::vector<Chunk> chunks = make_chunks(params);
  std::vector<Partial> partial(chunks.size());
  FT_DISPATCH_FLOAT_TYPES(pdtype, "lamb_step_cpu", [&] {
    using P = scalar_t;
    with_bool(has_master, [&](auto mas) {
      constexpr bool kMaster = decltype(mas)::value;
      using S = std::conditional_t<kMaster, float, P>;
      for_each_chunk_index(chunks, [&](int64_t k) {
          const int64_t t = chunks[k].tensor;
          partial[k] = lamb_pass1<P, S, kMaster>(chunks[k], params[t].const_data_ptr<P>(),
                                                 grads[t].const_data_ptr<P>(), exp_avgs[t].data_ptr<S>(),
                                                 exp_avg_sqs[t].data_ptr<S>(),
                                                 kMaster ? master_params[t].const_data_ptr<float>() : nullptr,
                                                 st.inv_grad_scale, h, correction[t]);
      });
      // Pass 2: per-tensor norms, summed in chunk order (deterministic), and the step scalars.
      std::vector<Partial> sums(n, Partial{0.0, 0.0});
      for (size_t k = 0; k < chunks.size(); ++k) {
        sums[chunks[k].tensor].weight_sq += partial[k].weight_sq;
        sums[chunks[k].tensor].update_sq += partial[k].update_sq;
      }
      std::vector<float> neg_step(n);
      for (size_t t = 0; t < n; ++t) {
        const double step_size = lamb_step_size(st.lr, beta1, beta2, step_of[t], debias);
        neg_step[t] = lamb_neg_step(static_cast<float>(std::sqrt(sums[t].weight_sq)),
                                    static_cast<float>(std::sqrt(sums[t].update_sq)),
                                    static_cast<float>(clamp_lower), static_cast<float>(clamp_upper), adam,
                                    trust_clip, step_size, norms_out + 3 * t);
      }
      for_each_chunk(params, [&](const Chunk& c) {
        const int64_t t = c.tensor;
        lamb_pass3<P, S, kMaster>(c, params[t].data_ptr<P>(), exp_avgs[t].const_data_ptr<S>(),
                                  exp_avg_sqs[t].const_data_ptr<S>(),
                                  kMaster ? master_params[t].data_ptr<float>() : nullptr, neg_step[t], h,
                                  correction[t]);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) { m.impl("lamb_step_", &lamb_step_cpu); }

}  // namespace fusedtech::cpu
