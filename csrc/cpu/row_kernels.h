// The few inner loops every CPU kernel spends its time in, compiled once per x86 ISA level
// (AVX-512, AVX2+FMA, baseline) and picked at load time by the dynamic loader (GCC
// target_clones), so a portable build still runs wide vectors. Bodies are templates inlined
// into thin non-template wrappers, because target_clones does not apply to templates.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define CONVOPS_ISA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CONVOPS_ISA_CLONES
#endif

namespace convops {
namespace cpu {

template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void axpy_body(acc_t* __restrict y, acc_t a,
                                                      const scalar_t* __restrict x,
                                                      int64_t x_stride, int64_t n) {
  if (x_stride == 1) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<acc_t>(x[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<acc_t>(x[i * x_stride]);
  }
}

template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void axpy_scatter_body(acc_t* __restrict y,
                                                              int64_t y_stride, acc_t a,
                                                              const scalar_t* __restrict x,
                                                              int64_t n) {
  if (y_stride == 1) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<acc_t>(x[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i * y_stride] += a * static_cast<acc_t>(x[i]);
  }
}

template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline acc_t dot_body(const scalar_t* __restrict a,
                                                     const scalar_t* __restrict b,
                                                     int64_t b_stride, int64_t n) {
  // Eight independent partial sums: vectorizable without -ffast-math, and a fixed order.
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  if (b_stride == 1) {
    for (; i + 8 <= n; i += 8)
      for (int k = 0; k < 8; ++k)
        s[k] += static_cast<acc_t>(a[i + k]) * static_cast<acc_t>(b[i + k]);
  }
  for (; i < n; ++i) s[i & 7] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i * b_stride]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void fma_body(acc_t* __restrict y,
                                                    const scalar_t* __restrict a,
                                                    const scalar_t* __restrict b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
}

template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void fma_acc_body(acc_t* __restrict y,
                                                        const acc_t* __restrict a,
                                                        const scalar_t* __restrict b,
                                                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a[i] * static_cast<acc_t>(b[i]);
}

#define CONVOPS_ROW_KERNELS(acc_t, scalar_t)                                                   \
  CONVOPS_ISA_CLONES inline void axpy(acc_t* y, acc_t a, const scalar_t* x, int64_t xs,        \
                                      int64_t n) {                                             \
    axpy_body<acc_t, scalar_t>(y, a, x, xs, n);                                                \
  }                                                                                            \
  CONVOPS_ISA_CLONES inline void axpy_scatter(acc_t* y, int64_t ys, acc_t a, const scalar_t* x, \
                                              int64_t n) {                                     \
    axpy_scatter_body<acc_t, scalar_t>(y, ys, a, x, n);                                        \
  }                                                                                            \
  CONVOPS_ISA_CLONES inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t bs,        \
                                     int64_t n) {                                              \
    return dot_body<acc_t, scalar_t>(a, b, bs, n);                                             \
  }                                                                                            \
  CONVOPS_ISA_CLONES inline void fma_rows(acc_t* y, const scalar_t* a, const scalar_t* b,      \
                                          int64_t n) {                                         \
    fma_body<acc_t, scalar_t>(y, a, b, n);                                                     \
  }                                                                                            \
  CONVOPS_ISA_CLONES inline void fma_rows_acc(acc_t* y, const acc_t* a, const scalar_t* b,     \
                                              int64_t n) {                                     \
    fma_acc_body<acc_t, scalar_t>(y, a, b, n);                                                 \
  }

CONVOPS_ROW_KERNELS(float, float)
CONVOPS_ROW_KERNELS(double, double)
CONVOPS_ROW_KERNELS(float, c10::Half)
CONVOPS_ROW_KERNELS(float, c10::BFloat16)
#undef CONVOPS_ROW_KERNELS

}  // namespace cpu
}  // namespace convops
