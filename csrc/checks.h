// Argument checks shared by the CPU and CUDA launchers: each error names the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "fusedtech/quantization.h"

namespace fusedtech {

inline void check_same_length(at::TensorList a, const char* a_name, at::TensorList b,
                              const char* b_name) {
  TORCH_CHECK(a.size() == b.size(), "fusedtech: ", b_name, " has ", b.size(), " tensors but ",
              a_name, " has ", a.size());
}

// The same element order in memory: strides agree on every dim of size > 1 (a size-1 dim's stride
// never moves an element; autograd may give a gradient any stride there, as a 1x1 conv's after a
// permute).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Every tensor at index i of `list` must match params[i] in device, shape and memory layout,
// because kernels walk them as flat buffers in lockstep.
inline void check_like_params(at::TensorList params, at::TensorList list, const char* name,
                              std::optional<at::ScalarType> dtype) {
  check_same_length(params, "params", list, name);
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.device() == p.device(), "fusedtech: ", name, "[", i, "] is on ", t.device(),
                " but params[", i, "] is on ", p.device());
    TORCH_CHECK(t.layout() == at::kStrided, "fusedtech: ", name, "[", i,
                "] is sparse; fused optimizers support dense gradients only");
    TORCH_CHECK(t.sizes() == p.sizes(), "fusedtech: ", name, "[", i, "] has shape ", t.sizes(),
                " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK(t.numel() == 0 || (t.is_non_overlapping_and_dense() && same_layout(t, p)),
                "fusedtech: ", name, "[", i,
                "] must be dense with the same strides as params[", i, "]");
    if (dtype) {
      TORCH_CHECK(t.scalar_type() == *dtype, "fusedtech: ", name, "[", i, "] has dtype ",
                  t.scalar_type(), ", expected ", *dtype);
    }
  }
}

// A quantized optimizer state: codes (uint8, laid out like params) and one float32 absmax per block.
inline void check_quantized_state(at::TensorList params, at::TensorList codes, const char* codes_name,
                                  at::TensorList absmax, const char* absmax_name) {
  check_like_params(params, codes, codes_name, at::kByte);
  check_same_length(params, "params", absmax, absmax_name);
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t blocks = (params[i].numel() + kQuantBlock - 1) / kQuantBlock;
    TORCH_CHECK(absmax[i].scalar_type() == at::kFloat && absmax[i].numel() == blocks && absmax[i].is_contiguous() &&
                    absmax[i].device() == params[i].device(),
                "fusedtech: ", absmax_name, "[", i, "] must be a contiguous float32 tensor of ", blocks, " values on ",
                params[i].device(), ", got ", absmax[i].scalar_type(), " of shape ", absmax[i].sizes(), " on ",
                absmax[i].device());
  }
}

// bf16 stochastic rounding of the parameters: a seed only for bf16 parameters without fp32 masters.
inline void check_stochastic_round(const std::optional<int64_t>& seed, at::ScalarType param_dtype, bool has_master) {
  TORCH_CHECK(!seed || (param_dtype == at::kBFloat16 && !has_master),
              "fusedtech: stochastic_round_seed is for bfloat16 parameters without master_params, got ", param_dtype,
              has_master ? " parameters with master_params" : " parameters");
}

// BatchNorm + residual + activation (codes 0 none, 1 relu, 2 gelu, 3 silu): the forward's arguments,
// and the backward's (ReLU's backward reads the forward's mask, 8 elements a byte).
inline void check_batch_norm_act(int64_t act, const at::Tensor& x, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(act >= 0 && act <= 3, "fusedtech: batch_norm activation code must be 0..3, got ", act);
  TORCH_CHECK(!residual || residual->sizes() == x.sizes(), "fusedtech: batch_norm residual has shape ",
              residual ? residual->sizes() : x.sizes(), ", input ", x.sizes());
}

inline void check_batch_norm_act_bwd(int64_t act, const at::Tensor& dy, const at::Tensor& x,
                                     const std::optional<at::Tensor>& extra) {
  check_batch_norm_act(act, x, std::nullopt);
  TORCH_CHECK(dy.sizes() == x.sizes(), "fusedtech: batch_norm grad has shape ", dy.sizes(), ", input ", x.sizes());
  TORCH_CHECK(act != 1 || (extra && extra->scalar_type() == at::kByte && extra->numel() == (x.numel() + 7) / 8),
              "fusedtech: batch_norm ReLU backward needs the forward's packed mask");
  TORCH_CHECK(act < 2 || !extra || extra->sizes() == x.sizes(), "fusedtech: batch_norm residual has shape ",
              extra ? extra->sizes() : x.sizes(), ", input ", x.sizes());
}

// BatchNorm's per-channel vectors (mean, invstd, weight, bias): C values each, on the input's device.
inline void check_channel_vectors(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  for (const auto& [t, name] : {std::pair{std::optional<at::Tensor>(mean), "mean"},
                                std::pair{std::optional<at::Tensor>(invstd), "invstd"}, std::pair{weight, "weight"},
                                std::pair{bias, "bias"}}) {
    if (!t) continue;
    TORCH_CHECK(t->numel() == x.size(1), "fusedtech: batch_norm ", name, " has ", t->numel(), " elements, expected ",
                x.size(1));
    TORCH_CHECK(t->device() == x.device(), "fusedtech: batch_norm ", name, " is on ", t->device(),
                " but input is on ", x.device());
  }
}

// DropBlock: the keep mask's arguments (a dense 4-D input, a one-element int64 seed, block_size and
// gamma in range), and the apply's (keep with the input's shape and strides, a one-element scale).
// The device checks are each launcher's own.
inline void check_drop_block_keep(const at::Tensor& x, const at::Tensor& seed, double gamma, int64_t block_size) {
  TORCH_CHECK(x.dim() == 4, "fusedtech: drop_block2d input must be 4-D (N, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fusedtech: drop_block2d input must be dense (contiguous or channels_last)");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device() == x.device(),
              "fusedtech: seed must be a one-element int64 tensor on ", x.device());
  TORCH_CHECK(block_size >= 1 && block_size <= x.size(2) && block_size <= x.size(3),
              "fusedtech: drop_block2d block_size must be in [1, min(H, W)], got ", block_size);
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, "fusedtech: drop_block2d gamma must be in [0, 1], got ", gamma);
}

inline void check_drop_block_apply(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& scale) {
  TORCH_CHECK(keep.device() == x.device() && scale.device() == x.device(),
              "fusedtech: drop_block2d needs input, keep and scale on one device, got ", x.device(), ", ",
              keep.device(), ", ", scale.device());
  TORCH_CHECK(keep.scalar_type() == at::kByte && keep.sizes() == x.sizes() && keep.strides() == x.strides() &&
                  x.is_non_overlapping_and_dense(),
              "fusedtech: drop_block2d keep must be a uint8 tensor with the input's shape and strides");
  TORCH_CHECK(scale.numel() == 1 && (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble),
              "fusedtech: drop_block2d scale must be a float32 (float64 for float64 input) scalar");
}

// LayerNorm / RMSNorm and dropout + add + norm: a contiguous (rows, n) input, weight and bias of n
// elements on its device. Backward: the grad of the input's shape, rstd (and mean where it is read:
// not for RMSNorm or from the output) one value per row on the input's device.
inline void check_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fusedtech: ", op, " expects a contiguous 2-D (rows, n) input, got ",
              x.sizes());
  for (const auto& [t, name] : {std::pair{weight, "weight"}, std::pair{bias, "bias"}}) {
    if (!t) continue;
    TORCH_CHECK(t->numel() == x.size(1), "fusedtech: ", name, " has ", t->numel(), " elements, expected ", x.size(1));
    TORCH_CHECK(t->device() == x.device(), "fusedtech: ", name, " is on ", t->device(), " but input is on ", x.device());
  }
}

inline void check_norm_bwd_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                const at::Tensor& rstd, bool reads_mean) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.device() == x.device(), "fusedtech: grad has shape ", dy.sizes(), " on ",
              dy.device(), " but input has ", x.sizes(), " on ", x.device());
  for (const auto& [t, name] : {std::pair{&rstd, "rstd"}, std::pair{&mean, "mean"}}) {
    if (t == &mean && !reads_mean) continue;
    TORCH_CHECK(t->numel() == x.size(0) && t->device() == x.device(), "fusedtech: layer_norm ", name, " must hold ",
                x.size(0), " values (one a row) on ", x.device(), ", got ", t->numel(), " on ", t->device());
  }
}

inline void check_param_list(at::TensorList params) {
  TORCH_CHECK(!params.empty(), "fusedtech: params is empty");
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fusedtech: params must be float32, float16 or bfloat16, got ", dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == dtype, "fusedtech: params[", i, "] has dtype ",
                params[i].scalar_type(), " but params[0] has ", dtype,
                "; group tensors by dtype before calling");
    TORCH_CHECK(params[i].device() == params[0].device(), "fusedtech: params[", i, "] is on ",
                params[i].device(), " but params[0] is on ", params[0].device());
    TORCH_CHECK(params[i].numel() == 0 || params[i].is_non_overlapping_and_dense(),
                "fusedtech: params[", i, "] must be dense (non-overlapping)");
  }
}

// LAMB's per-tensor output: (clamped weight norm, update norm, trust ratio) in row t for params[t].
inline void check_lamb_norms(at::TensorList params, const at::Tensor& norms) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(norms.scalar_type() == at::kFloat && norms.dim() == 2 && norms.size(0) == n && norms.size(1) == 3 &&
                  norms.is_contiguous() && norms.device() == params[0].device(),
              "fusedtech: lamb_step norms must be a contiguous float32 [", n, ", 3] tensor on ", params[0].device(),
              ", got ", norms.scalar_type(), " ", norms.sizes(), " on ", norms.device());
}

inline void check_steps(at::TensorList params, at::TensorList steps) {
  check_same_length(params, "params", steps, "steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat,
                "fusedtech: steps[", i, "] must be a one-element float32 tensor");
  }
}

}  // namespace fusedtech

// AT_DISPATCH over the three storage dtypes the kernels support (double is refused earlier, so
// instantiating it would only cost compile time).
#define FT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)      \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
