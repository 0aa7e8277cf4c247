// Bilinear sampling with torchvision's boundary rule, its coordinate gradients, and the integer
// sampler that dilated convolution uses: one sample description (four taps with weights) that
// the deformable and dilated engines gather, scatter and differentiate the same way.
//
// Rule: a point (y, x) is sampled only if -1 < y < H and -1 < x < W; each of its four integer
// neighbours contributes only if it lies inside the image (zero padding). The coordinate
// gradient, like torchvision's, only asks which neighbours are inside, so a point exactly on
// y = -1 or x = -1 has a zero value but its one-sided (inward) slope. NaN or +-Inf
// coordinates fail both tests, so they contribute zero and never reach an index.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace convops {

template <typename T, typename index_t>
struct Sample {
  index_t y0, x0;          // top-left neighbour
  T w00, w01, w10, w11;    // weights of (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1); 0 if outside
  T ly, lx;                // fractional parts (for the coordinate gradient)
  bool inside;             // false: the sample value (and its input gradient) is zero
  bool near;               // a neighbour may be inside: y0, x0, ly, lx are meaningful
};

template <typename T, typename index_t>
HOST_DEVICE_INLINE Sample<T, index_t> bilinear_sample(T y, T x, index_t H, index_t W) {
  Sample<T, index_t> s;
  s.inside = (y > T(-1)) && (y < T(H)) && (x > T(-1)) && (x < T(W));
  s.near = (y > T(-2)) && (y < T(H + 1)) && (x > T(-2)) && (x < T(W + 1));
  if (!s.near) {
    s.y0 = s.x0 = 0;
    s.w00 = s.w01 = s.w10 = s.w11 = s.ly = s.lx = T(0);
    return s;
  }
  const T yf = floor(y), xf = floor(x);
  s.y0 = static_cast<index_t>(yf);
  s.x0 = static_cast<index_t>(xf);
  s.ly = y - yf;
  s.lx = x - xf;
  const T hy = T(1) - s.ly, hx = T(1) - s.lx;
  const bool top = s.y0 >= 0 && s.y0 <= H - 1, bottom = s.y0 + 1 >= 0 && s.y0 + 1 <= H - 1;
  const bool left = s.x0 >= 0 && s.x0 <= W - 1, right = s.x0 + 1 >= 0 && s.x0 + 1 <= W - 1;
  s.w00 = (s.inside && top && left) ? hy * hx : T(0);
  s.w01 = (s.inside && top && right) ? hy * s.lx : T(0);
  s.w10 = (s.inside && bottom && left) ? s.ly * hx : T(0);
  s.w11 = (s.inside && bottom && right) ? s.ly * s.lx : T(0);
  return s;
}

// Integer positions (dilated convolution): one neighbour with weight 1, or nothing.
template <typename T, typename index_t>
HOST_DEVICE_INLINE Sample<T, index_t> integer_sample(index_t y, index_t x, index_t H,
                                                     index_t W) {
  Sample<T, index_t> s;
  s.inside = y >= 0 && y < H && x >= 0 && x < W;
  s.near = s.inside;
  s.y0 = s.inside ? y : 0;
  s.x0 = s.inside ? x : 0;
  s.w00 = s.inside ? T(1) : T(0);
  s.w01 = s.w10 = s.w11 = s.ly = s.lx = T(0);
  return s;
}

// The four neighbour values, zero where the neighbour is outside (weight 0 marks it).
template <typename T, typename scalar_t, typename index_t>
struct Corners {
  T v00, v01, v10, v11;
};

template <typename T, typename scalar_t, typename index_t>
HOST_DEVICE_INLINE Corners<T, scalar_t, index_t> corner_values(const scalar_t* plane, index_t sy,
                                                               index_t sx,
                                                               const Sample<T, index_t>& s) {
  Corners<T, scalar_t, index_t> c{T(0), T(0), T(0), T(0)};
  const scalar_t* p = plane + s.y0 * sy + s.x0 * sx;
  if (s.w00 != T(0)) c.v00 = static_cast<T>(p[0]);
  if (s.w01 != T(0)) c.v01 = static_cast<T>(p[sx]);
  if (s.w10 != T(0)) c.v10 = static_cast<T>(p[sy]);
  if (s.w11 != T(0)) c.v11 = static_cast<T>(p[sy + sx]);
  return c;
}

// Validity for the coordinate gradient must not depend on a weight being exactly zero (a point
// exactly on a grid line has a zero weight but a valid neighbour), so these take the
// neighbour bounds directly.
template <typename T, typename scalar_t, typename index_t>
HOST_DEVICE_INLINE Corners<T, scalar_t, index_t> corner_values_for_grad(
    const scalar_t* plane, index_t sy, index_t sx, index_t H, index_t W,
    const Sample<T, index_t>& s) {
  Corners<T, scalar_t, index_t> c{T(0), T(0), T(0), T(0)};
  if (!s.near) return c;
  // Both bounds on every neighbour: a "near" point may sit left of or above the image.
  const bool top = s.y0 >= 0 && s.y0 <= H - 1, bottom = s.y0 + 1 >= 0 && s.y0 + 1 <= H - 1;
  const bool left = s.x0 >= 0 && s.x0 <= W - 1, right = s.x0 + 1 >= 0 && s.x0 + 1 <= W - 1;
  const scalar_t* p = plane + s.y0 * sy + s.x0 * sx;
  if (top && left) c.v00 = static_cast<T>(p[0]);
  if (top && right) c.v01 = static_cast<T>(p[sx]);
  if (bottom && left) c.v10 = static_cast<T>(p[sy]);
  if (bottom && right) c.v11 = static_cast<T>(p[sy + sx]);
  return c;
}

template <typename T, typename scalar_t, typename index_t>
HOST_DEVICE_INLINE T sample_value(const scalar_t* plane, index_t sy, index_t sx,
                                  const Sample<T, index_t>& s) {
  if (!s.inside) return T(0);
  const auto c = corner_values<T, scalar_t, index_t>(plane, sy, sx, s);
  return s.w00 * c.v00 + s.w01 * c.v01 + s.w10 * c.v10 + s.w11 * c.v11;
}

// d(sample)/dy and d(sample)/dx, from the corner values (torchvision's rule: only in-image
// corners count).
template <typename T, typename scalar_t, typename index_t>
HOST_DEVICE_INLINE void sample_coordinate_grad(const Corners<T, scalar_t, index_t>& c,
                                               const Sample<T, index_t>& s, T* d_dy, T* d_dx) {
  const T hy = T(1) - s.ly, hx = T(1) - s.lx;
  *d_dy = hx * (c.v10 - c.v00) + s.lx * (c.v11 - c.v01);
  *d_dx = hy * (c.v01 - c.v00) + s.ly * (c.v11 - c.v10);
}

}  // namespace convops
