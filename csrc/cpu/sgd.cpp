// Fused multi-tensor SGD (momentum, dampening, Nesterov) on CPU tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedtech/sgd.h"
#include "multi_tensor.h"

namespace fusedtech::cpu {
namespace {

template <typename P, typename S, bool MOMENTUM, bool MASTER>
__attribute__((noinline)) void sgd_chunk(const Chunk& c, P* __restrict param, const P* __restrict grad,
                                         S* __restrict buf, float* __restrict master, float inv_scale,
                                         const SgdHyper h) {
  const int64_t begin = c.begin, end = c.end;
  for (int64_t i = begin; i < end; ++i) {
    float p = MASTER ? master[i] : to_float(param[i]);
    float b = MOMENTUM ? to_float(buf[i]) : 0.0f;
    sgd_update(p, to_float(grad[i]) * inv_scale, b, MOMENTUM, h);
    if (MASTER) master[i] = p;
    param[i] = from_float<P>(p);
    if (MOMENTUM) buf[i] = from_float<S>(b);
  }
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList master_params, double lr, const std::optional<at::Tensor>& lr_tensor,
                  double momentum, double dampening, double weight_decay, bool nesterov,
                  bool maximize, bool first_step, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  check_param_list(params);
  const bool has_master = !master_params.empty();
  const bool has_momentum = !momentum_buffers.empty();
  const auto pdtype = params[0].scalar_type();
  const auto sdtype = has_master ? at::kFloat : pdtype;
  check_like_params(params, grads, "grads", pdtype);
  if (has_momentum) check_like_params(params, momentum_buffers, "momentum_buffers", sdtype);
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  TORCH_CHECK(params[0].device().is_cpu(), "fusedtech: sgd_step (cpu) got params on ", params[0].device());
  const StepScalars st = step_scalars(lr, lr_tensor, grad_scale, found_inf);
  if (st.skip) return;
  const SgdHyper h{static_cast<float>(-st.lr), static_cast<float>(momentum),
                   static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay), nesterov,
                   maximize, first_step};
  FT_DISPATCH_FLOAT_TYPES(pdtype, "sgd_step_cpu", [&] {
    using P = scalar_t;
    with_bool(has_momentum, [&](auto mom) {
      with_bool(has_master, [&](auto mas) {
        constexpr bool kMom = decltype(mom)::value, kMaster = decltype(mas)::value;
        using S = std::conditional_t<kMaster, float, P>;
        for_each_chunk(params, [&](const Chunk& c) {
          const int64_t t = c.tensor;
          sgd_chunk<P, S, kMom, kMaster>(c, params[t].data_ptr<P>(), grads[t].const_data_ptr<P>(),
                                         kMom ? momentum_buffers[t].data_ptr<S>() : nullptr,
                                         kMaster ? master_params[t].data_ptr<float>() : nullptr,
                                         st.inv_grad_scale, h);
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) { m.impl("sgd_step_", &sgd_step_cpu); }

}  // namespace fusedtech::cpu
