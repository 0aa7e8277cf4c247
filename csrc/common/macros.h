// HOST_DEVICE and small portability helpers shared by the CPU and CUDA backends.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE __host__ __device__
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE
#define HOST_DEVICE_INLINE inline
#endif

namespace convops {

// Floor division for possibly negative numerators (C++ '/' truncates toward zero).
template <typename index_t>
HOST_DEVICE_INLINE index_t floor_div(index_t a, index_t b) {
  index_t q = a / b;
  return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}

template <typename index_t>
HOST_DEVICE_INLINE index_t ceil_div(index_t a, index_t b) {
  return -floor_div<index_t>(-a, b);
}

template <typename index_t>
HOST_DEVICE_INLINE index_t clamp_index(index_t v, index_t lo, index_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

}  // namespace convops
