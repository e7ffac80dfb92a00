// CUDA multi-tensor apply: one kernel launch updates many tensors.
//
// Every tensor is cut into chunks of kChunkElements; each thread block owns one chunk. The launch
// carries, in its kernel arguments (so the step is capturable in a CUDA graph and needs no
// host-to-device copy), the operand addresses of up to kMaxTensors tensors and the (tensor, chunk)
// of up to kMaxBlocks blocks. Longer lists take several launches; a tensor whose chunks straddle
// two launches is carried over as tensor 0 of the next one.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>

namespace fusedtech::cuda {

constexpr int kThreads = 512;
constexpr int kILP = 4;  // elements per thread per iteration: one 16-byte load for fp32
constexpr int64_t kChunkElements = 65536;

// Kernel arguments are limited to 4 KiB on the oldest toolkits we build with; this layout stays
// under that for DEPTH <= 6 with room for the op's own arguments.
template <int DEPTH, int MAX_TENSORS = 32>
struct TensorListMeta {
  static constexpr int kMaxTensors = MAX_TENSORS;  // fewer for more operands: the 4 KiB stays enough
  static constexpr int kMaxBlocks = 320;
  void* addr[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  const float* step[kMaxTensors];  // per-tensor step counter (optimizers); null when unused
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ bool aligned_for_vec(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

// The chunk this block owns: tensor slot t of the launch, elements [begin, end).
struct BlockChunk {
  int t;
  int64_t begin;
  int64_t end;
};

template <int DEPTH, int MAX_TENSORS>
__device__ __forceinline__ BlockChunk block_chunk(const TensorListMeta<DEPTH, MAX_TENSORS>& meta) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunkElements;
  return {t, begin, min(meta.numel[t], begin + kChunkElements)};
}

// Calls f(i) for every element of the chunk; consecutive threads take consecutive elements, so
// every load and store is coalesced.
template <typename F>
__device__ __forceinline__ void for_each_element(const BlockChunk& c, F f) {
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) f(i);
}

// lists[d][t] is operand d of tensor t; lists[0] decides the tensors (empty ones are skipped) and
// an empty operand list passes null addresses. launch(meta, blocks) starts one kernel.
template <int DEPTH, int MAX_TENSORS = 32, typename Launch>
void multi_tensor_apply(const std::array<at::TensorList, DEPTH>& lists, at::TensorList steps,
                        Launch launch) {
  using Meta = TensorListMeta<DEPTH, MAX_TENSORS>;
  const at::TensorList tensors = lists[0];
  Meta meta;
  int nt = 0;
  int nb = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t numel = tensors[t].numel();
    if (numel == 0) continue;
    for (int d = 0; d < DEPTH; ++d) {
      meta.addr[d][nt] = lists[d].empty() ? nullptr : lists[d][t].data_ptr();
    }
    meta.numel[nt] = numel;
    meta.step[nt] = steps.empty() ? nullptr : steps[t].data_ptr<float>();
    ++nt;
    const int64_t chunks = (numel + kChunkElements - 1) / kChunkElements;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[nb] = static_cast<unsigned char>(nt - 1);
      meta.block_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == Meta::kMaxBlocks || (nt == Meta::kMaxTensors && last_chunk)) {
        launch(meta, nb);
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {  // the current tensor goes on in the next launch, as its tensor 0
          for (int d = 0; d < DEPTH; ++d) meta.addr[d][0] = meta.addr[d][nt - 1];
          meta.numel[0] = meta.numel[nt - 1];
          meta.step[0] = meta.step[nt - 1];
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) launch(meta, nb);
}

}  // namespace fusedtech::cuda
