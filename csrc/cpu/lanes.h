// Eight-lane double sums for the CPU kernels. A reduction keeps the order fixed by giving element
// j of a run to lane j % 8 and adding the lanes in order at the end; written as eight scalar
// accumulators the compiler left it one element at a time, so the lanes are one GCC/Clang vector
// value here (same lanes, same order, same bits, eight at once).
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

inline lanes8 zero8() { return lanes8{0, 0, 0, 0, 0, 0, 0, 0}; }

// The lanes added in order.
inline double fold8(const lanes8& v) {
  double s = 0.0;
  for (int k = 0; k < kLanes; ++k) s += v[k];
  return s;
}

}  // namespace fusedtech::cpu
