// CPU multi-tensor executor: every tensor of a list is cut into fixed-size chunks and one
// at::parallel_for (OpenMP) runs over the chunks of all tensors at once (past a size threshold), so a step over many
// small tensors still spreads over every core and there is no per-tensor Python loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "fusedtech/philox.h"

namespace fusedtech::cpu {

// Large enough to amortise the per-chunk setup (bias corrections, pointer fetches), small enough
// that a ResNet-sized parameter list yields many more chunks than cores.
constexpr int64_t kChunkElements = 64 * 1024;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t begin = 0; begin < n; begin += kChunkElements) {
      chunks.push_back({t, begin, std::min(n, begin + kChunkElements)});
    }
  }
  return chunks;
}

// Below this many elements in all, a step runs on the calling thread. Waking the OpenMP team costs
// tens of microseconds on a quiet machine and milliseconds when the cores are shared (the woken
// thread waits for a core), while one thread updates ~100k elements of Adam in about that time.
constexpr int64_t kParallelMinElements = 128 * 1024;

// Calls fn(k) for every index k of chunks: in parallel once the chunks hold kParallelMinElements.
template <typename Fn>
void for_each_chunk_index(const std::vector<Chunk>& chunks, Fn fn) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  int64_t elements = 0;
  for (const Chunk& c : chunks) elements += c.end - c.begin;
  if (n < 2 || elements < kParallelMinElements) {
    for (int64_t k = 0; k < n; ++k) fn(k);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) fn(k);
  });
}

// Calls fn(chunk) for every chunk of the list (see for_each_chunk_index for when in parallel).
template <typename Fn>
void for_each_chunk(at::TensorList tensors, Fn fn) {
  const std::vector<Chunk> chunks = make_chunks(tensors);
  for_each_chunk_index(chunks, [&](int64_t k) { fn(chunks[k]); });
}

// What every optimizer step reads before its loop: GradScaler's skip flag and scale, and the
// learning rate when it is a (CPU) tensor.
struct StepScalars {
  bool skip;             // found_inf is set: the step changes nothing
  float inv_grad_scale;  // 1 / grad_scale, or 1
  double lr;
};

inline StepScalars step_scalars(double lr, const std::optional<at::Tensor>& lr_tensor,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf) {
  StepScalars s{false, 1.0f, lr};
  if (found_inf && found_inf->item<double>() != 0.0) s.skip = true;
  if (grad_scale) s.inv_grad_scale = static_cast<float>(1.0 / grad_scale->item<double>());
  if (lr_tensor) s.lr = lr_tensor->item<double>();
  return s;
}

// Calls fn(std::integral_constant<bool, b>) : turns a runtime flag into a template argument.
template <typename Fn>
void with_bool(bool b, Fn fn) {
  if (b) fn(std::true_type{}); else fn(std::false_type{});
}

// bf16 stochastic rounding of a chunk's parameters: element i of tensor t at step s takes word i % 4 of
// the Philox block (seed; counter i / 4, s, t), the Triton kernels' and the oracle's draw. The draws of
// one chunk, in a per-thread buffer; null when the step rounds to nearest.
inline const uint32_t* stochastic_round_draws(const std::optional<int64_t>& seed, const Chunk& c, double step) {
  if (!seed) return nullptr;
  thread_local std::vector<uint32_t> buffer;
  buffer.resize(static_cast<size_t>(c.end - c.begin));
  philox_draws(static_cast<uint64_t>(*seed), c.begin, c.end - c.begin, buffer.data(), static_cast<uint32_t>(step),
               static_cast<uint32_t>(c.tensor));
  return buffer.data();
}

// A parameter's new value in its dtype: to nearest, or for bf16 with draws, stochastically.
template <typename P, bool STOCHASTIC>
inline P round_param(float x, const uint32_t* __restrict draws, int64_t k) {
  if constexpr (STOCHASTIC && std::is_same_v<P, c10::BFloat16>) {
    return c10::BFloat16(bf16_bits_stochastic(x, draws[k]), c10::BFloat16::from_bits());
  } else {
    return static_cast<P>(x);
  }
}

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }

}  // namespace fusedtech::cpu
