// The schema of every compiled op, once. Each device registers its implementation next to its
// kernels: csrc/cpu/*.cpp for CPU (always built), csrc/cuda/*.cu for CUDA (built when nvcc and a
// CUDA build of torch are present, into the separate module fusedtech._C_cuda).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fusedtech._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fusedtech_C, m) {
  // Optimizers: one call updates every tensor of one (device, dtype) group in place. A
  // stochastic_round_seed rounds bfloat16 parameters stochastically (fusedtech/philox.h's
  // bf16_bits_stochastic) instead of to nearest.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
      "Tensor[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled, bool amsgrad, bool maximize, Tensor? grad_scale, "
      "Tensor? found_inf, int? stochastic_round_seed=None) -> ()");
  // Adam with quantized states: each of exp_avgs, exp_avg_sqs, max_exp_avg_sqs is uint8 codes laid out
  // like params plus a float32 absmax per block of 256 (fusedtech/quantization.h); the first moment
  // indexes signed_table, the second moments unsigned_table.
  m.def(
      "adam_step_quantized_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_absmaxes, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] exp_avg_sq_absmaxes, "
      "Tensor(f!)[] max_exp_avg_sqs, Tensor(g!)[] max_exp_avg_sq_absmaxes, Tensor(h!)[] master_params, "
      "Tensor[] steps, Tensor signed_table, Tensor unsigned_table, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf, int? stochastic_round_seed=None) -> ()");
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] master_params, float lr, Tensor? lr_tensor, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, bool first_step, Tensor? grad_scale, "
      "Tensor? found_inf) -> ()");
  m.def(
      "rmsprop_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] grad_avgs, Tensor(d!)[] momentum_buffers, Tensor(e!)[] master_params, "
      "float lr, Tensor? lr_tensor, float alpha, float eps, float weight_decay, float momentum, "
      "bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def(
      "adagrad_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
      "Tensor(c!)[] master_params, Tensor[] steps, float lr, Tensor? lr_tensor, float lr_decay, "
      "float weight_decay, float eps, bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()");
  // LAMB also writes, per tensor t, norms[t] = (clamped weight norm, update norm, trust ratio): the
  // values pass 2 computes anyway, which torch_optimizer keeps as per-parameter state.
  m.def(
      "lamb_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] master_params, Tensor[] steps, Tensor(e!) norms, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float eps, float weight_decay, float clamp_lower, float clamp_upper, bool debias, bool adam, "
      "bool grad_averaging, bool bias_correction, bool trust_clip, Tensor? grad_scale, Tensor? found_inf) -> ()");

  // Global norm of a tensor list (clip_grad_norm_): a 0-d float32 tensor, 2-norm or inf-norm.
  // Blockwise quantization of a dense tensor (codes uint8 with x's strides, absmax float32 per block)
  // and its inverse; table: 256 sorted float32 values.
  m.def("quantize_blockwise(Tensor x, Tensor table, int block) -> (Tensor, Tensor)");
  m.def("dequantize_blockwise(Tensor codes, Tensor absmax, Tensor table, int block) -> Tensor");

  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type) -> Tensor");

  // LayerNorm / RMSNorm over rows of a contiguous (rows, n) input; fp32 mean/rstd saved.
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, bool rms) -> (Tensor, Tensor, Tensor)");
  // (dx, dweight, dbias: empty without a weight / bias). from_output: x is the forward's output and
  // xhat = (x - bias) / weight (the memory-saving backward, which keeps the output); mean unread.
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, bool rms, "
      "bool from_output) -> (Tensor, Tensor, Tensor)");

  // Inverted dropout with a Philox mask regenerated from (seed, element index); forward and
  // backward are the same op.
  m.def("dropout_apply(Tensor x, float p, Tensor seed) -> Tensor");

  // DropBlock: the keep mask of (seed, gamma, block_size) as uint8 with x's strides, and how many it
  // keeps; then x * scale where kept (forward and backward).
  m.def("drop_block_keep(Tensor x, Tensor seed, float gamma, int block_size) -> (Tensor, Tensor)");
  m.def("drop_block_apply(Tensor x, Tensor keep, Tensor scale) -> Tensor");

  // dropout(x) + residual, then LayerNorm/RMSNorm, in one pass per row: (out, the sum, mean, rstd).
  m.def(
      "dropout_add_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float p, float eps, bool rms, "
      "Tensor seed) -> (Tensor, Tensor, Tensor, Tensor)");

  // BatchNorm over dim 1 of (N, C, *), NCHW or channels_last: per-channel mean and biased
  // variance; the normalisation; the backward (dx, dweight, dbias).
  // (mean, 1 / sqrt(biased variance + eps), unbiased variance: what the running variance takes)
  m.def("batch_norm_stats(Tensor x, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_apply(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias) -> Tensor");
  m.def(
      "batch_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, bool training) "
      "-> (Tensor, Tensor, Tensor)");
  // BatchNorm, a residual add and an activation (0 none, 1 relu, 2 gelu, 3 silu) in one pass: the
  // output and, for ReLU, its packed mask (output > 0, 8 logical elements a byte; empty otherwise).
  // Backward: extra is that mask (ReLU) or the residual (GELU, SiLU recompute the pre-activation);
  // returns (dx, dweight, dbias, dresidual: empty without a residual).
  m.def(
      "batch_norm_act_apply(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
      "int activation) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_act_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "Tensor? extra, bool has_residual, int activation, bool training) -> (Tensor, Tensor, Tensor, Tensor)");

  // GroupNorm over (N, C, *) in num_groups groups, NCHW or channels_last, then an activation (codes as
  // BatchNorm's): (output, mean, rstd), the statistics [N, G] in fp32 (float64 for float64).
  // Backward: (dx, dweight, dbias), the sums [C] always, from the pre-activation recomputed from x.
  m.def(
      "group_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, int activation) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int num_groups, "
      "int activation) -> (Tensor, Tensor, Tensor)");
}
