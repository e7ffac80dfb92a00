// Fused multi-tensor Adagrad on CPU tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedtech/adagrad.h"
#include "multi_tensor.h"

namespace fusedtech::cpu {
namespace {

template <typename P, typename S, bool MASTER>
__attribute__((noinline)) void adagrad_chunk(const Chunk& c, P* __restrict param,
                                             const P* __restrict grad, S* __restrict sum,
                                             float* __restrict master, float inv_scale,
                                             float neg_clr, const AdagradHyper h) {
  const int64_t begin = c.begin, end = c.end;
  for (int64_t i = begin; i < end; ++i) {
    float p = MASTER ? master[i] : to_float(param[i]);
    float s = to_float(sum[i]);
    adagrad_update(p, to_float(grad[i]) * inv_scale, s, neg_clr, h);
    if (MASTER) master[i] = p;
    param[i] = from_float<P>(p);
    sum[i] = from_float<S>(s);
  }
}

void adagrad_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                      at::TensorList master_params, at::TensorList steps, double lr,
                      const std::optional<at::Tensor>& lr_tensor, double lr_decay,
                      double weight_decay, double eps, bool maximize,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  check_param_list(params);
  const bool has_master = !master_params.empty();
  const auto pdtype = params[0].scalar_type();
  const auto sdtype = has_master ? at::kFloat : pdtype;
  check_like_params(params, grads, "grads", pdtype);
  check_like_params(params, state_sums, "state_sums", sdtype);
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  check_steps(params, steps);
  TORCH_CHECK(params[0].device().is_cpu(), "fusedtech: adagrad_step (cpu) got params on ", params[0].device());
  const StepScalars st = step_scalars(lr, lr_tensor, grad_scale, found_inf);
  if (st.skip) return;
  const AdagradHyper h{static_cast<float>(eps), static_cast<float>(weight_decay), maximize};
  std::vector<float> neg_clr(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    neg_clr[t] = adagrad_neg_clr(st.lr, lr_decay, steps[t].item<double>());
  }
  FT_DISPATCH_FLOAT_TYPES(pdtype, "adagrad_step_cpu", [&] {
    using P = scalar_t;
    with_bool(has_master, [&](auto mas) {
      constexpr bool kMaster = decltype(mas)::value;
      using S = std::conditional_t<kMaster, float, P>;
      for_each_chunk(params, [&](const Chunk& c) {
        const int64_t t = c.tensor;
        adagrad_chunk<P, S, kMaster>(c, params[t].data_ptr<P>(), grads[t].const_data_ptr<P>(),
                                     state_sums[t].data_ptr<S>(),
                                     kMaster ? master_params[t].data_ptr<float>() : nullptr,
                                     st.inv_grad_scale, neg_clr[t], h);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) { m.impl("adagrad_step_", &adagrad_step_cpu); }

}  // namespace fusedtech::cpu
