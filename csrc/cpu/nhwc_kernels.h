// Register-blocked CPU micro-kernels for depthwise convolution on channels-last (NHWC) images.
//
// Each image is first copied (in the accumulation type) into a zero-padded buffer whose
// channel count is rounded up to the vector width and whose rows and columns cover every tap
// of a whole number of kPixels-wide output blocks, so the loops below have no bounds tests and
// no tails: the vector dimension is channels, kPixels output pixels share each weight load and
// give four independent FMA chains (GCC vector extensions; one AVX-512 register per vector in
// the x86-64-v4 clone).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/conv_geometry.h"
#include "cpu/plane_kernels.h"

namespace convops {
namespace cpu {

constexpr int64_t kPixels = 4;

struct PaddedImage {
  int64_t rows, cols, channels;  // channels: C rounded up to the vector width
  int64_t size() const { return rows * cols * channels; }
};

// The padded image an (Ho x round_up(Wo, kPixels)) output needs.
template <typename acc_t>
PaddedImage padded_image(int64_t C, int64_t Ho, int64_t Wo, int64_t kh, int64_t kw, int64_t sh,
                         int64_t sw, int64_t dh, int64_t dw) {
  const int64_t wo_pad = round_up(Wo, kPixels);
  return {(Ho - 1) * sh + (kh - 1) * dh + 1, (wo_pad - 1) * sw + (kw - 1) * dw + 1,
          round_up(C, Vec<acc_t>::width)};
}

// dst[r][x][c] = src[r - top][x - left][c] (src: H x W x C), zero outside src or for c >= C.
// top/left may be negative (cropping).
template <typename acc_t, typename scalar_t>
void fill_padded_image(const scalar_t* src, int64_t H, int64_t W, int64_t C, int64_t top,
                       int64_t left, const PaddedImage& P, acc_t* dst) {
  at::parallel_for(0, P.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* drow = dst + r * P.cols * P.channels;
      const int64_t y = r - top;
      if (y < 0 || y >= H) {
        std::memset(drow, 0, sizeof(acc_t) * P.cols * P.channels);
        continue;
      }
      for (int64_t x = 0; x < P.cols; ++x) {
        acc_t* d = drow + x * P.channels;
        const int64_t sx = x - left;
        int64_t c = 0;
        if (sx >= 0 && sx < W) {
          const scalar_t* s = src + (y * W + sx) * C;
          for (; c < C; ++c) d[c] = static_cast<acc_t>(s[c]);
        }
        for (; c < P.channels; ++c) d[c] = acc_t(0);
      }
    }
  });
}

// out_row[ow][c] = bias[c] + sum_{ky,kx} w_t[ky*kw+kx][c] * P[oh*sh + ky*dh][ow*sw + kx*dw][c]
// for ow < wo_pad (a multiple of kPixels); w_t, bias and out_row have P.channels channels.
template <typename acc_t>
__attribute__((always_inline)) inline void nhwc_row_body(
    const acc_t* P, const PaddedImage& L, const acc_t* w_t, const acc_t* bias, acc_t* out_row,
    int64_t wo_pad, int64_t oh, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
    int64_t dw) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t VW = Vec<acc_t>::width;
  static_assert(kPixels == 4, "the block below is written for four pixels");
  const int64_t C = L.channels, step = sw * C;
  // ky outermost (accumulating through out_row) keeps one padded input row - wo_pad*sw + kw*dw
  // vectors - hot in L1 while all kw taps and all pixel blocks use it.
  for (int64_t c = 0; c < C; c += VW) {
    const V b = bias ? load_vec<acc_t>(bias + c) : V{};
    for (int64_t ow = 0; ow < wo_pad; ++ow) store_vec<acc_t>(out_row + ow * C + c, b);
    for (int64_t ky = 0; ky < kh; ++ky) {
      const acc_t* row = P + (oh * sh + ky * dh) * L.cols * C + c;
      const acc_t* wrow = w_t + ky * kw * C + c;
      for (int64_t ow = 0; ow < wo_pad; ow += kPixels) {
        acc_t* o = out_row + ow * C + c;
        V a0 = load_vec<acc_t>(o), a1 = load_vec<acc_t>(o + C);
        V a2 = load_vec<acc_t>(o + 2 * C), a3 = load_vec<acc_t>(o + 3 * C);
        const acc_t* px = row + ow * step;
        for (int64_t kx = 0; kx < kw; ++kx) {
          const V wv = load_vec<acc_t>(wrow + kx * C);
          const acc_t* p = px + kx * dw * C;
          a0 += wv * load_vec<acc_t>(p);
          a1 += wv * load_vec<acc_t>(p + step);
          a2 += wv * load_vec<acc_t>(p + 2 * step);
          a3 += wv * load_vec<acc_t>(p + 3 * step);
        }
        store_vec<acc_t>(o, a0);
        store_vec<acc_t>(o + C, a1);
        store_vec<acc_t>(o + 2 * C, a2);
        store_vec<acc_t>(o + 3 * C, a3);
      }
    }
  }
}

// grad_w_t[tap][c .. c+VW) += sum_{oh, ow} go[oh][ow][c..] * P[oh*sh + ky*dh][ow*sw + kx*dw][c..]
// for one channel vector c; go is (Ho, wo_pad, P.channels) with zeros past Wo.
template <typename acc_t>
__attribute__((always_inline)) inline void nhwc_weight_grad_body(
    const acc_t* P, const PaddedImage& L, const acc_t* go, int64_t Ho, int64_t wo_pad, int64_t c,
    int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, acc_t* grad_w_t) {
  using V = typename Vec<acc_t>::type;
  const int64_t C = L.channels, step = sw * C;
  // Output rows outermost: one grad_out row and the kh padded input rows it meets stay in
  // L1/L2 while every tap uses them; per-tap sums live in grad_w_t.
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const acc_t* g = go + oh * wo_pad * C + c;
    for (int64_t ky = 0; ky < kh; ++ky) {
      const acc_t* xrow = P + (oh * sh + ky * dh) * L.cols * C + c;
      for (int64_t kx = 0; kx < kw; ++kx) {
        const acc_t* x = xrow + kx * dw * C;
        V a0{}, a1{}, a2{}, a3{};
        for (int64_t ow = 0; ow < wo_pad; ow += kPixels) {
          const acc_t* xp = x + ow * step;
          const acc_t* gp = g + ow * C;
          a0 += load_vec<acc_t>(gp) * load_vec<acc_t>(xp);
          a1 += load_vec<acc_t>(gp + C) * load_vec<acc_t>(xp + step);
          a2 += load_vec<acc_t>(gp + 2 * C) * load_vec<acc_t>(xp + 2 * step);
          a3 += load_vec<acc_t>(gp + 3 * C) * load_vec<acc_t>(xp + 3 * step);
        }
        acc_t* dst = grad_w_t + (ky * kw + kx) * C + c;
        store_vec<acc_t>(dst, load_vec<acc_t>(dst) + ((a0 + a1) + (a2 + a3)));
      }
    }
  }
}

#define CONVOPS_NHWC_KERNELS(acc_t)                                                              \
  CONVOPS_ISA_CLONES inline void nhwc_row(const acc_t* P, const PaddedImage& L,                  \
                                          const acc_t* w_t, const acc_t* bias, acc_t* out_row,   \
                                          int64_t wo_pad, int64_t oh, int64_t kh, int64_t kw,    \
                                          int64_t sh, int64_t sw, int64_t dh, int64_t dw) {      \
    nhwc_row_body<acc_t>(P, L, w_t, bias, out_row, wo_pad, oh, kh, kw, sh, sw, dh, dw);          \
  }                                                                                              \
  CONVOPS_ISA_CLONES inline void nhwc_weight_grad(                                               \
      const acc_t* P, const PaddedImage& L, const acc_t* go, int64_t Ho, int64_t wo_pad,         \
      int64_t c, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,         \
      acc_t* grad_w_t) {                                                                         \
    nhwc_weight_grad_body<acc_t>(P, L, go, Ho, wo_pad, c, kh, kw, sh, sw, dh, dw, grad_w_t);     \
  }

CONVOPS_NHWC_KERNELS(float)
CONVOPS_NHWC_KERNELS(double)
#undef CONVOPS_NHWC_KERNELS

}  // namespace cpu
}  // namespace convops
