// Device side of the quantized optimizer states (fusedtech/quantization.h's rules): a 256-thread
// block holds one quantization block, one element a thread.
#pragma once

#include "fusedtech/quantization.h"

namespace fusedtech::cuda {

constexpr int kQuantThreads = static_cast<int>(kQuantBlock);
static_assert(kQuantThreads == 256, "a block of threads is a quantization block");

// The block's absmax of one value per thread (NaN-propagating: absmax_update / ft_max), for every
// thread. scratch: 8 floats of shared memory.
__device__ __forceinline__ float block_absmax(float x, float* scratch) {
  float a = absmax_update(0.0f, x);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) a = ft_max(__shfl_xor_sync(0xffffffffu, a, offset), a);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = a;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / 32; ++w) r = ft_max(scratch[w], r);
  __syncthreads();  // scratch is reused by the next reduction
  return r;
}

// The 256 values of `table` and its 255 midpoints into shared memory (as the CPU and the oracle form them).
__device__ __forceinline__ void load_table(const float* __restrict table, float* values, float* mids) {
  for (int i = threadIdx.x; i < 256; i += blockDim.x) values[i] = table[i];
  __syncthreads();
  for (int i = threadIdx.x; i < 255; i += blockDim.x) mids[i] = (values[i] + values[i + 1]) / 2;
  __syncthreads();
}

}  // namespace fusedtech::cuda
