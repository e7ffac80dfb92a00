// Eight-lane double sums for the CPU norm kernels, and what else they share (the math type, the
// parallel grain). A reduction keeps the order fixed by giving element j of a run to lane j % 8 and
// adding the lanes in order at the end; written as eight scalar accumulators the compiler left it
// one element at a time, so the lanes are one GCC/Clang vector value here (same lanes, same order,
// same bits, eight at once).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fusedtech::cpu {

constexpr int kLanes = 8;
typedef double lanes8 __attribute__((vector_size(kLanes * sizeof(double))));
typedef float floats8 __attribute__((vector_size(kLanes * sizeof(float))));

// p[0..8) as doubles (exact for every floating dtype).
template <typename T>
inline lanes8 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    floats8 v;
    std::memcpy(&v, p, sizeof(v));
    return __builtin_convertvector(v, lanes8);
  } else {
    lanes8 v;
    for (int k = 0; k < kLanes; ++k) v[k] = static_cast<double>(p[k]);
    return v;
  }
}

// The elementwise math type: float for float/half/bfloat16, double for double (as torch's).
template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Tasks of at least ~16K elements, so that a small tensor runs inline on the calling thread
// (entering an OpenMP region costs microseconds).
inline int64_t grain_for(int64_t elements_per_task) {
  return elements_per_task >= 16384 ? 1 : 16384 / (elements_per_task > 0 ? elements_per_task : 1);
}

inline lanes8 zero8() { return lanes8{0, 0, 0, 0, 0, 0, 0, 0}; }

// The lanes added in order.
inline double fold8(const lanes8& v) {
  double s = 0.0;
  for (int k = 0; k < kLanes; ++k) s += v[k];
  return s;
}

}  // namespace fusedtech::cpu
