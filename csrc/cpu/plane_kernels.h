// Register-blocked CPU micro-kernels for depthwise convolution on whole NCHW planes.
//
// A plane is first copied into a zero-padded, column-phase-split buffer (PaddedPlane): for
// stride s, column x of the padded plane lives at phase x % s, index x / s. Output column ox
// with tap kx then reads phase (kx*d) % s at index ox + (kx*d) / s, so every tap reads a
// contiguous run whatever the stride, with no bounds tests (the zeros are in the buffer).
// Output rows are padded to a multiple of kRows and columns to a multiple of the vector width,
// so the loops below are fixed-width vector code (GCC vector extensions; 64-byte vectors map
// to one AVX-512 register, two AVX2 or four SSE registers in the respective clones).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/conv_geometry.h"
#include "cpu/row_kernels.h"

namespace convops {
namespace cpu {

constexpr int64_t kRows = 4;  // output rows computed together (independent FMA chains)

template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(64)));
  static constexpr int64_t width = 64 / sizeof(acc_t);
};

template <typename acc_t>
__attribute__((always_inline)) inline typename Vec<acc_t>::type load_vec(const acc_t* p) {
  typename Vec<acc_t>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
__attribute__((always_inline)) inline void store_vec(acc_t* p, typename Vec<acc_t>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename acc_t>
__attribute__((always_inline)) inline acc_t hsum(typename Vec<acc_t>::type v) {
  acc_t s = 0;
  for (int64_t i = 0; i < Vec<acc_t>::width; ++i) s += v[i];
  return s;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Geometry of one padded, phase-split plane.
struct PlaneLayout {
  int64_t rows;          // padded rows
  int64_t cols;          // columns per phase (a multiple of nothing in particular)
  int64_t phases;        // = column stride of the convolution
  int64_t row_stride() const { return phases * cols; }
  int64_t size() const { return rows * row_stride(); }
};

// The buffer a correlation of an (out_rows_padded x out_cols_padded) output needs.
inline PlaneLayout plane_layout(int64_t out_rows_padded, int64_t out_cols_padded, int64_t kh,
                                int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw) {
  return {(out_rows_padded - 1) * sh + (kh - 1) * dh + 1, out_cols_padded + (kw - 1) * dw / sw,
          sw};
}

// dst[r][phase][j] = src[r - top][j*phases + phase - left], zero outside src. top/left may
// be negative (cropping), which the transposed (input-gradient) correlation needs.
template <typename acc_t, typename scalar_t>
void fill_padded_plane(const scalar_t* src, int64_t h, int64_t w, int64_t top, int64_t left,
                       const PlaneLayout& L, acc_t* dst) {
  for (int64_t r = 0; r < L.rows; ++r) {
    const int64_t y = r - top;
    acc_t* drow = dst + r * L.row_stride();
    if (y < 0 || y >= h) {
      std::memset(drow, 0, sizeof(acc_t) * L.row_stride());
      continue;
    }
    const scalar_t* srow = src + y * w;
    for (int64_t ph = 0; ph < L.phases; ++ph) {
      acc_t* d = drow + ph * L.cols;
      // j maps to source column j*phases + ph - left: the conv index rule with tap ph.
      const auto valid = valid_output_range<int64_t>(ph, w, L.cols, L.phases, left, 1);
      std::fill(d, d + valid.first, acc_t(0));
      const scalar_t* s = srow + valid.first * L.phases + ph - left;
      if (L.phases == 1) {
        for (int64_t j = valid.first; j < valid.last; ++j) d[j] = static_cast<acc_t>(s[j - valid.first]);
      } else {
        for (int64_t j = valid.first; j < valid.last; ++j)
          d[j] = static_cast<acc_t>(s[(j - valid.first) * L.phases]);
      }
      std::fill(d + valid.last, d + L.cols, acc_t(0));
    }
  }
}

// out[oy][ox] += sum_taps filter[ky][kx] * P[oy*sh + ky*dh][(kx*dw) % sw][ox + (kx*dw) / sw]
// for oy < out_rows (a multiple of kRows) and ox < out_cols (a multiple of the vector width).
template <typename acc_t>
__attribute__((always_inline)) inline void correlate_plane_body(
    const acc_t* P, const PlaneLayout& L, const acc_t* filter, int64_t kh, int64_t kw,
    int64_t sh, int64_t dh, int64_t dw, int64_t out_rows, int64_t out_cols, acc_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t VW = Vec<acc_t>::width;
  const int64_t rs = L.row_stride();
  for (int64_t oy = 0; oy < out_rows; oy += kRows) {
    for (int64_t ox = 0; ox < out_cols; ox += VW) {
      V acc[kRows];
      for (int64_t r = 0; r < kRows; ++r) acc[r] = load_vec<acc_t>(out + (oy + r) * out_cols + ox);
      for (int64_t ky = 0; ky < kh; ++ky) {
        const acc_t* base = P + (oy * sh + ky * dh) * rs + ox;
        for (int64_t kx = 0; kx < kw; ++kx) {
          const int64_t shift = kx * dw;
          const acc_t* p = base + (shift % L.phases) * L.cols + shift / L.phases;
          const acc_t wv = filter[ky * kw + kx];
          for (int64_t r = 0; r < kRows; ++r) acc[r] += wv * load_vec<acc_t>(p + r * sh * rs);
        }
      }
      for (int64_t r = 0; r < kRows; ++r) store_vec<acc_t>(out + (oy + r) * out_cols + ox, acc[r]);
    }
  }
}

// grad_w[ky][kx] += sum_{oy, ox} go[oy][ox] * P[oy*sh + ky*dh][phase][ox + shift]: NT taps of
// one kernel row at a time share each grad_out vector load.
template <typename acc_t, int NT>
__attribute__((always_inline)) inline void tap_dots(const acc_t* P, const PlaneLayout& L,
                                                   const acc_t* go, int64_t rows, int64_t cols,
                                                   int64_t ky, int64_t kx0, int64_t sh,
                                                   int64_t dh, int64_t dw, acc_t* grad_w) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t VW = Vec<acc_t>::width;
  const int64_t rs = L.row_stride();
  int64_t offset[NT];
  for (int j = 0; j < NT; ++j) {
    const int64_t shift = (kx0 + j) * dw;
    offset[j] = (shift % L.phases) * L.cols + shift / L.phases;
  }
  V acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = V{} ;
  for (int64_t oy = 0; oy < rows; ++oy) {
    const acc_t* prow = P + (oy * sh + ky * dh) * rs;
    const acc_t* grow = go + oy * cols;
    for (int64_t ox = 0; ox < cols; ox += VW) {
      const V g = load_vec<acc_t>(grow + ox);
      for (int j = 0; j < NT; ++j) acc[j] += g * load_vec<acc_t>(prow + offset[j] + ox);
    }
  }
  for (int j = 0; j < NT; ++j) grad_w[j] += hsum<acc_t>(acc[j]);
}

template <typename acc_t>
__attribute__((always_inline)) inline void correlate_taps_body(
    const acc_t* P, const PlaneLayout& L, const acc_t* go, int64_t rows, int64_t cols,
    int64_t kh, int64_t kw, int64_t sh, int64_t dh, int64_t dw, acc_t* grad_w) {
  for (int64_t ky = 0; ky < kh; ++ky) {
    int64_t kx = 0;
    for (; kx + 6 <= kw; kx += 6)
      tap_dots<acc_t, 6>(P, L, go, rows, cols, ky, kx, sh, dh, dw, grad_w + ky * kw + kx);
    switch (kw - kx) {
      case 5: tap_dots<acc_t, 5>(P, L, go, rows, cols, ky, kx, sh, dh, dw, grad_w + ky * kw + kx); break;
      case 4: tap_dots<acc_t, 4>(P, L, go, rows, cols, ky, kx, sh, dh, dw, grad_w + ky * kw + kx); break;
      case 3: tap_dots<acc_t, 3>(P, L, go, rows, cols, ky, kx, sh, dh, dw, grad_w + ky * kw + kx); break;
      case 2: tap_dots<acc_t, 2>(P, L, go, rows, cols, ky, kx, sh, dh, dw, grad_w + ky * kw + kx); break;
      case 1: tap_dots<acc_t, 1>(P, L, go, rows, cols, ky, kx, sh, dh, dw, grad_w + ky * kw + kx); break;
      default: break;
    }
  }
}

#define CONVOPS_PLANE_KERNELS(acc_t)                                                             \
  CONVOPS_ISA_CLONES inline void correlate_plane(const acc_t* P, const PlaneLayout& L,           \
                                                 const acc_t* filter, int64_t kh, int64_t kw,    \
                                                 int64_t sh, int64_t dh, int64_t dw,             \
                                                 int64_t out_rows, int64_t out_cols,             \
                                                 acc_t* out) {                                   \
    correlate_plane_body<acc_t>(P, L, filter, kh, kw, sh, dh, dw, out_rows, out_cols, out);      \
  }                                                                                              \
  CONVOPS_ISA_CLONES inline void correlate_taps(const acc_t* P, const PlaneLayout& L,            \
                                                const acc_t* go, int64_t rows, int64_t cols,     \
                                                int64_t kh, int64_t kw, int64_t sh, int64_t dh,  \
                                                int64_t dw, acc_t* grad_w) {                     \
    correlate_taps_body<acc_t>(P, L, go, rows, cols, kh, kw, sh, dh, dw, grad_w);                \
  }

CONVOPS_PLANE_KERNELS(float)
CONVOPS_PLANE_KERNELS(double)
#undef CONVOPS_PLANE_KERNELS

}  // namespace cpu
}  // namespace convops
