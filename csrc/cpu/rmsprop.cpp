// Fused multi-tensor RMSprop (plain, centered, momentum) on CPU tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "fusedtech/rmsprop.h"
#include "multi_tensor.h"

namespace fusedtech::cpu {
namespace {

template <typename P, typename S, bool CENTERED, bool MOMENTUM, bool MASTER>
__attribute__((noinline)) void rmsprop_chunk(const Chunk& c, P* __restrict param,
                                             const P* __restrict grad, S* __restrict square_avg,
                                             S* __restrict grad_avg, S* __restrict buf,
                                             float* __restrict master, float inv_scale,
                                             const RmspropHyper h) {
  const int64_t begin = c.begin, end = c.end;
  for (int64_t i = begin; i < end; ++i) {
    float p = MASTER ? master[i] : to_float(param[i]);
    float sq = to_float(square_avg[i]);
    float ga = CENTERED ? to_float(grad_avg[i]) : 0.0f;
    float b = MOMENTUM ? to_float(buf[i]) : 0.0f;
    rmsprop_update(p, to_float(grad[i]) * inv_scale, sq, ga, b, CENTERED, MOMENTUM, h);
    if (MASTER) master[i] = p;
    param[i] = from_float<P>(p);
    square_avg[i] = from_float<S>(sq);
    if (CENTERED) grad_avg[i] = from_float<S>(ga);
    if (MOMENTUM) buf[i] = from_float<S>(b);
  }
}

void rmsprop_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                      at::TensorList grad_avgs, at::TensorList momentum_buffers,
                      at::TensorList master_params, double lr,
                      const std::optional<at::Tensor>& lr_tensor, double alpha, double eps,
                      double weight_decay, double momentum, bool maximize,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  check_param_list(params);
  const bool has_master = !master_params.empty();
  const bool centered = !grad_avgs.empty();
  const bool has_momentum = !momentum_buffers.empty();
  const auto pdtype = params[0].scalar_type();
  const auto sdtype = has_master ? at::kFloat : pdtype;
  check_like_params(params, grads, "grads", pdtype);
  check_like_params(params, square_avgs, "square_avgs", sdtype);
  if (centered) check_like_params(params, grad_avgs, "grad_avgs", sdtype);
  if (has_momentum) check_like_params(params, momentum_buffers, "momentum_buffers", sdtype);
  if (has_master) check_like_params(params, master_params, "master_params", at::kFloat);
  TORCH_CHECK(params[0].device().is_cpu(), "fusedtech: rmsprop_step (cpu) got params on ", params[0].device());
  const StepScalars st = step_scalars(lr, lr_tensor, grad_scale, found_inf);
  if (st.skip) return;
  const RmspropHyper h{static_cast<float>(-st.lr), static_cast<float>(alpha),
                       static_cast<float>(1.0 - alpha), static_cast<float>(eps),
                       static_cast<float>(weight_decay), static_cast<float>(momentum), maximize};
  FT_DISPATCH_FLOAT_TYPES(pdtype, "rmsprop_step_cpu", [&] {
    using P = scalar_t;
    with_bool(centered, [&](auto cen) {
      with_bool(has_momentum, [&](auto mom) {
        with_bool(has_master, [&](auto mas) {
          constexpr bool kCen = decltype(cen)::value, kMom = decltype(mom)::value,
                         kMaster = decltype(mas)::value;
          using S = std::conditional_t<kMaster, float, P>;
          for_each_chunk(params, [&](const Chunk& c) {
            const int64_t t = c.tensor;
            rmsprop_chunk<P, S, kCen, kMom, kMaster>(
                c, params[t].data_ptr<P>(), grads[t].const_data_ptr<P>(),
                square_avgs[t].data_ptr<S>(), kCen ? grad_avgs[t].data_ptr<S>() : nullptr,
                kMom ? momentum_buffers[t].data_ptr<S>() : nullptr,
                kMaster ? master_params[t].data_ptr<float>() : nullptr, st.inv_grad_scale, h);
          });
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtech_C, CPU, m) { m.impl("rmsprop_step_", &rmsprop_step_cpu); }

}  // namespace fusedtech::cpu
