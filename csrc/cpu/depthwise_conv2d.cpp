// Depthwise conv2d on CPU: forward, input gradient, weight gradient, for NCHW and NHWC.
//
// The float32/bfloat16 forward runs the kernels of cpu/depthwise_forward.h (no padded copy,
// channel vectors, run-time ISA choice); float16/float64 and the backward run the kernels below.
// Every loop nest is arranged so its innermost loop runs over a contiguous row (NCHW: along W,
// NHWC: along channels) inside a range precomputed with valid_output_range, so there are no
// per-element bounds tests and the row kernels vectorize. Work is split with at::parallel_for
// over independent outputs (planes, rows or channel blocks): no two threads write the same
// element, and each element is summed in a fixed order, so results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "common/depthwise.h"
#include "common/op_outputs.h"
#include "common/tensor_utils.h"
#include "cpu/depthwise_forward.h"
#include "cpu/nhwc_kernels.h"
#include "cpu/path_counts.h"
#include "cpu/plane_kernels.h"
#include "cpu/scratch.h"
#include "cpu/row_kernels.h"

namespace convops {
namespace cpu {
namespace {

using Ranges = std::vector<OutputRange<int64_t>>;

Ranges column_ranges(const DepthwiseGeometry& g) {
  Ranges r(g.kw);
  for (int64_t kx = 0; kx < g.kw; ++kx)
    r[kx] = valid_output_range<int64_t>(kx, g.W, g.Wo, g.sw, g.pw, g.dw);
  return r;
}

template <typename acc_t, typename scalar_t>
std::vector<acc_t> filters_as(const scalar_t* w, const DepthwiseGeometry& g, bool flipped) {
  const int64_t taps = g.kh * g.kw;
  std::vector<acc_t> f(g.OC * taps);
  for (int64_t oc = 0; oc < g.OC; ++oc)
    for (int64_t t = 0; t < taps; ++t)
      f[oc * taps + t] = static_cast<acc_t>(w[oc * taps + (flipped ? taps - 1 - t : t)]);
  return f;
}

// One task per input plane: pad it once, then correlate it with each of its multiplier filters.
template <typename scalar_t>
void forward_nchw(const scalar_t* in, const scalar_t* w, const scalar_t* bias, scalar_t* out,
                  const DepthwiseGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = round_up(g.Ho, kRows), cols = round_up(g.Wo, Vec<acc_t>::width);
  const PlaneLayout L = plane_layout(rows, cols, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw);
  const std::vector<acc_t> filters = filters_as<acc_t>(w, g, false);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> plane(L.size()), acc(rows * cols);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / g.C, c = p % g.C;
      fill_padded_plane(in + p * g.H * g.W, g.H, g.W, g.ph, g.pw, L, plane.data());
      for (int64_t j = 0; j < g.multiplier; ++j) {
        const int64_t oc = c * g.multiplier + j;
        std::fill(acc.begin(), acc.end(), bias ? static_cast<acc_t>(bias[oc]) : acc_t(0));
        correlate_plane(plane.data(), L, filters.data() + oc * g.kh * g.kw, g.kh, g.kw, g.sh,
                        g.dh, g.dw, rows, cols, acc.data());
        scalar_t* out_plane = out + (n * g.OC + oc) * g.Ho * g.Wo;
        for (int64_t oh = 0; oh < g.Ho; ++oh)
          for (int64_t ow = 0; ow < g.Wo; ++ow)
            out_plane[oh * g.Wo + ow] = static_cast<scalar_t>(acc[oh * cols + ow]);
      }
    }
  });
}

// weight_t is the filter bank transposed to (kh*kw, OC), so each tap is a contiguous row
// matching the NHWC channel vector.
template <typename scalar_t>
void forward_nhwc(const scalar_t* in, const scalar_t* weight_t, const scalar_t* bias,
                  scalar_t* out, const DepthwiseGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(g.OC);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / g.Ho, oh = p % g.Ho;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        for (int64_t oc = 0; oc < g.OC; ++oc)
          acc[oc] = bias ? static_cast<acc_t>(bias[oc]) : acc_t(0);
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          const int64_t ih = conv_input_pos<int64_t>(oh, ky, g.sh, g.ph, g.dh);
          if (ih < 0 || ih >= g.H) continue;
          for (int64_t kx = 0; kx < g.kw; ++kx) {
            const int64_t iw = conv_input_pos<int64_t>(ow, kx, g.sw, g.pw, g.dw);
            if (iw < 0 || iw >= g.W) continue;
            const scalar_t* px = in + ((n * g.H + ih) * g.W + iw) * g.C;
            const scalar_t* wt = weight_t + (ky * g.kw + kx) * g.OC;
            if (g.multiplier == 1) {
              fma_rows(acc.data(), wt, px, g.C);
            } else {
              for (int64_t oc = 0; oc < g.OC; ++oc)
                acc[oc] += static_cast<acc_t>(wt[oc]) *
                           static_cast<acc_t>(px[oc / g.multiplier]);
            }
          }
        }
        scalar_t* out_px = out + ((n * g.Ho + oh) * g.Wo + ow) * g.OC;
        for (int64_t oc = 0; oc < g.OC; ++oc) out_px[oc] = static_cast<scalar_t>(acc[oc]);
      }
    }
  });
}

// Stride-1 input gradient: a correlation of each grad_out plane with the flipped filter
// (padding (k-1)*d - p, possibly negative), summed over the multiplier channels.
template <typename scalar_t>
void input_grad_nchw_stride1(const scalar_t* grad_out, const scalar_t* w, scalar_t* grad_in,
                             const DepthwiseGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = round_up(g.H, kRows), cols = round_up(g.W, Vec<acc_t>::width);
  const PlaneLayout L = plane_layout(rows, cols, g.kh, g.kw, 1, 1, g.dh, g.dw);
  const std::vector<acc_t> flipped = filters_as<acc_t>(w, g, true);
  const int64_t top = flipped_tap_padding(g.kh, g.dh, g.ph);
  const int64_t left = flipped_tap_padding(g.kw, g.dw, g.pw);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> plane(L.size()), acc(rows * cols);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / g.C, c = p % g.C;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < g.multiplier; ++j) {
        const int64_t oc = c * g.multiplier + j;
        fill_padded_plane(grad_out + (n * g.OC + oc) * g.Ho * g.Wo, g.Ho, g.Wo, top, left, L,
                          plane.data());
        correlate_plane(plane.data(), L, flipped.data() + oc * g.kh * g.kw, g.kh, g.kw, 1,
                        g.dh, g.dw, rows, cols, acc.data());
      }
      scalar_t* gi_plane = grad_in + p * g.H * g.W;
      for (int64_t ih = 0; ih < g.H; ++ih)
        for (int64_t iw = 0; iw < g.W; ++iw)
          gi_plane[ih * g.W + iw] = static_cast<scalar_t>(acc[ih * cols + iw]);
    }
  });
}

// --- NHWC, multiplier 1: register-blocked row kernels (cpu/nhwc_kernels.h) --------------------

// Filters as (kh*kw, Cp) rows in the accumulation type (channels zero-padded to Cp),
// optionally rotated by 180 degrees.
template <typename acc_t, typename scalar_t>
std::vector<acc_t> taps_by_channel(const scalar_t* w, const DepthwiseGeometry& g, int64_t Cp,
                                   bool flipped) {
  const int64_t taps = g.kh * g.kw;
  std::vector<acc_t> t(taps * Cp, acc_t(0));
  for (int64_t oc = 0; oc < g.OC; ++oc)
    for (int64_t k = 0; k < taps; ++k)
      t[k * Cp + oc] = static_cast<acc_t>(w[oc * taps + (flipped ? taps - 1 - k : k)]);
  return t;
}

// Correlates every image of `src` (N, Hs, Ws, C) with per-channel taps into `dst`
// (N, Hd, Wd, C): the forward pass and, with rotated taps and padding (k-1)*d - p, the
// stride-1 input gradient. Multiplier 1 only.
template <typename scalar_t>
void nhwc_correlate(const scalar_t* src, const scalar_t* w, bool flipped, const scalar_t* bias,
                    scalar_t* dst, const DepthwiseGeometry& g, int64_t Hs, int64_t Ws,
                    int64_t Hd, int64_t Wd, int64_t sh, int64_t sw, int64_t top, int64_t left) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  const PaddedImage L = padded_image<acc_t>(C, Hd, Wd, g.kh, g.kw, sh, sw, g.dh, g.dw);
  const int64_t wo_pad = round_up(Wd, kPixels);
  const std::vector<acc_t> taps = taps_by_channel<acc_t>(w, g, L.channels, flipped);
  std::vector<acc_t> b(L.channels, acc_t(0));
  if (bias) std::transform(bias, bias + C, b.begin(), [](scalar_t v) { return acc_t(v); });
  acc_t* P = scratch<acc_t>(0, L.size());
  for (int64_t n = 0; n < g.N; ++n) {
    fill_padded_image(src + n * Hs * Ws * C, Hs, Ws, C, top, left, L, P);
    scalar_t* out = dst + n * Hd * Wd * C;
    at::parallel_for(0, Hd, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(wo_pad * L.channels);
      for (int64_t oh = begin; oh < end; ++oh) {
        nhwc_row(P, L, taps.data(), bias ? b.data() : nullptr, row.data(), wo_pad, oh, g.kh,
                 g.kw, sh, sw, g.dh, g.dw);
        scalar_t* o = out + oh * Wd * C;
        for (int64_t ow = 0; ow < Wd; ++ow)
          for (int64_t c = 0; c < C; ++c)
            o[ow * C + c] = static_cast<scalar_t>(row[ow * L.channels + c]);
      }
    });
  }
}

template <typename scalar_t>
void weight_grad_nhwc_fast(const scalar_t* grad_out, const scalar_t* in, scalar_t* grad_w,
                           const DepthwiseGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t VW = Vec<acc_t>::width;
  const int64_t taps = g.kh * g.kw, C = g.C;
  const PaddedImage L = padded_image<acc_t>(C, g.Ho, g.Wo, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw);
  const int64_t wo_pad = round_up(g.Wo, kPixels);
  const PaddedImage G{g.Ho, wo_pad, L.channels};  // grad_out, zero past Wo and C
  std::vector<acc_t> acc(taps * L.channels, acc_t(0));  // (taps, Cp)
  acc_t* P = scratch<acc_t>(0, L.size());
  acc_t* go = scratch<acc_t>(1, G.size());
  for (int64_t n = 0; n < g.N; ++n) {
    fill_padded_image(in + n * g.H * g.W * C, g.H, g.W, C, g.ph, g.pw, L, P);
    fill_padded_image(grad_out + n * g.Ho * g.Wo * C, g.Ho, g.Wo, C, 0, 0, G, go);
    // one task per channel vector: each owns its slice of acc, summed in a fixed order
    at::parallel_for(0, L.channels / VW, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk)
        nhwc_weight_grad(P, L, go, g.Ho, wo_pad, blk * VW, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw,
                         acc.data());
    });
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < taps; ++t)
      grad_w[c * taps + t] = static_cast<scalar_t>(acc[t * L.channels + c]);
}

// Input gradient, gathered one input row at a time: the taps of every output row that reads
// input row ih are scattered into a private row buffer, then written once.
template <typename scalar_t>
void input_grad_nchw(const scalar_t* grad_out, const scalar_t* w, scalar_t* grad_in,
                     const DepthwiseGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const Ranges cols = column_ranges(g);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(g.W);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / g.C, c = p % g.C;
      scalar_t* gi_plane = grad_in + p * g.H * g.W;
      for (int64_t ih = 0; ih < g.H; ++ih) {
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int64_t j = 0; j < g.multiplier; ++j) {
          const int64_t oc = c * g.multiplier + j;
          const scalar_t* filter = w + oc * g.kh * g.kw;
          const scalar_t* go_plane = grad_out + (n * g.OC + oc) * g.Ho * g.Wo;
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            const int64_t oh = output_pos_reading<int64_t>(ih, ky, g.Ho, g.sh, g.ph, g.dh);
            if (oh < 0) continue;
            const scalar_t* go_row = go_plane + oh * g.Wo;
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const auto r = cols[kx];
              if (r.first >= r.last) continue;
              axpy_scatter(row.data() + conv_input_pos<int64_t>(r.first, kx, g.sw, g.pw, g.dw),
                           g.sw, static_cast<acc_t>(filter[ky * g.kw + kx]), go_row + r.first,
                           r.last - r.first);
            }
          }
        }
        scalar_t* gi_row = gi_plane + ih * g.W;
        for (int64_t iw = 0; iw < g.W; ++iw) gi_row[iw] = static_cast<scalar_t>(row[iw]);
      }
    }
  });
}

template <typename scalar_t>
void input_grad_nhwc(const scalar_t* grad_out, const scalar_t* weight_t, scalar_t* grad_in,
                     const DepthwiseGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(g.C);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / g.H, ih = p % g.H;
      for (int64_t iw = 0; iw < g.W; ++iw) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          const int64_t oh = output_pos_reading<int64_t>(ih, ky, g.Ho, g.sh, g.ph, g.dh);
          if (oh < 0) continue;
          for (int64_t kx = 0; kx < g.kw; ++kx) {
            const int64_t ow = output_pos_reading<int64_t>(iw, kx, g.Wo, g.sw, g.pw, g.dw);
            if (ow < 0) continue;
            const scalar_t* go_px = grad_out + ((n * g.Ho + oh) * g.Wo + ow) * g.OC;
            const scalar_t* wt = weight_t + (ky * g.kw + kx) * g.OC;
            if (g.multiplier == 1) {
              fma_rows(acc.data(), wt, go_px, g.C);
            } else {
              for (int64_t oc = 0; oc < g.OC; ++oc)
                acc[oc / g.multiplier] +=
                    static_cast<acc_t>(wt[oc]) * static_cast<acc_t>(go_px[oc]);
            }
          }
        }
        scalar_t* gi_px = grad_in + ((n * g.H + ih) * g.W + iw) * g.C;
        for (int64_t c = 0; c < g.C; ++c) gi_px[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// Weight gradient, one output channel per task (a fixed summation order per channel): for
// every image, pad the input plane once and take all k*k dot products against grad_out.
template <typename scalar_t>
void weight_grad_nchw(const scalar_t* grad_out, const scalar_t* in, scalar_t* grad_w,
                      const DepthwiseGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cols = round_up(g.Wo, Vec<acc_t>::width);
  const PlaneLayout L = plane_layout(g.Ho, cols, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw);
  const int64_t taps = g.kh * g.kw;
  at::parallel_for(0, g.OC, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> plane(L.size()), go(g.Ho * cols, acc_t(0)), acc(taps);
    for (int64_t oc = begin; oc < end; ++oc) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t c = oc / g.multiplier;
      for (int64_t n = 0; n < g.N; ++n) {
        fill_padded_plane(in + (n * g.C + c) * g.H * g.W, g.H, g.W, g.ph, g.pw, L,
                          plane.data());
        const scalar_t* go_plane = grad_out + (n * g.OC + oc) * g.Ho * g.Wo;
        for (int64_t oh = 0; oh < g.Ho; ++oh)
          for (int64_t ow = 0; ow < g.Wo; ++ow)
            go[oh * cols + ow] = static_cast<acc_t>(go_plane[oh * g.Wo + ow]);
        correlate_taps(plane.data(), L, go.data(), g.Ho, cols, g.kh, g.kw, g.sh, g.dh, g.dw,
                       acc.data());
      }
      for (int64_t t = 0; t < taps; ++t) grad_w[oc * taps + t] = static_cast<scalar_t>(acc[t]);
    }
  });
}

// NHWC weight gradient: tasks own blocks of output channels and walk every output pixel, so
// each channel is still summed in one fixed order whatever the block size.
template <typename scalar_t>
void weight_grad_nhwc(const scalar_t* grad_out, const scalar_t* in, scalar_t* grad_w,
                      const DepthwiseGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = g.kh * g.kw;
  const int64_t threads = at::get_num_threads();
  const int64_t block = std::max<int64_t>(16, (g.OC + 2 * threads - 1) / (2 * threads));
  const int64_t blocks = (g.OC + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(taps * block);
    std::vector<scalar_t> gathered(block);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t oc0 = b * block, len = std::min(block, g.OC - oc0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            const scalar_t* go_px = grad_out + ((n * g.Ho + oh) * g.Wo + ow) * g.OC + oc0;
            for (int64_t ky = 0; ky < g.kh; ++ky) {
              const int64_t ih = conv_input_pos<int64_t>(oh, ky, g.sh, g.ph, g.dh);
              if (ih < 0 || ih >= g.H) continue;
              for (int64_t kx = 0; kx < g.kw; ++kx) {
                const int64_t iw = conv_input_pos<int64_t>(ow, kx, g.sw, g.pw, g.dw);
                if (iw < 0 || iw >= g.W) continue;
                const scalar_t* px = in + ((n * g.H + ih) * g.W + iw) * g.C;
                const scalar_t* src = px + oc0;
                if (g.multiplier != 1) {
                  for (int64_t i = 0; i < len; ++i) gathered[i] = px[(oc0 + i) / g.multiplier];
                  src = gathered.data();
                }
                fma_rows(acc.data() + (ky * g.kw + kx) * block, go_px, src, len);
              }
            }
          }
        }
      }
      for (int64_t i = 0; i < len; ++i)
        for (int64_t t = 0; t < taps; ++t)
          grad_w[(oc0 + i) * taps + t] = static_cast<scalar_t>(acc[t * block + i]);
    }
  });
}

// Which forward kernel the calling thread ran last ("nhwc/avx2", "nchw/baseline", "generic"):
// the tests check that each path they mean to cover actually ran.
thread_local std::string last_forward_path = "none";

std::string depthwise_forward_last_path() { return last_forward_path; }

// The last-level cache's size in bytes, from Linux sysfs (32 MB where it cannot be read). Not
// sysconf(_SC_LEVEL3_CACHE_SIZE): on the 2-core Zen 4 VM that says 320 MB where sysfs and lscpu
// say 32 MB.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t size = 0;
    char unit = 0;
    if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      if (std::fscanf(f, "%" SCNd64 "%c", &size, &unit) < 1) size = 0;
      std::fclose(f);
    }
    size *= unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1;
    return size > 0 ? size : int64_t(32) << 20;
  }();
  return bytes;
}

// The float32/bfloat16 forward of cpu/depthwise_forward.h; false (nothing written) where the
// generic kernels below must run: other dtypes, NHWC with a channel multiplier, kernels wider
// than kDwMaxK, no x86 vector build, or CONVOPS_CPU_IMPL=generic.
template <typename scalar_t>
bool forward_vectorized(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                        at::Tensor& out, const DepthwiseGeometry& g, bool cl) {
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;
  constexpr bool kBF16 = std::is_same_v<scalar_t, c10::BFloat16>;
  if constexpr (!kF32 && !kBF16) {
    return false;
  } else {
    const DwForwardIsa* isa = depthwise_forward_isa();
    if (isa == nullptr || g.kh > kDwMaxK || g.kw > kDwMaxK || (cl && g.multiplier != 1) ||
        env_is("CONVOPS_CPU_IMPL", "generic"))
      return false;
    DwForwardJob j{};
    j.x = x.const_data_ptr<scalar_t>();
    j.y = out.mutable_data_ptr<scalar_t>();
    j.N = g.N, j.C = g.C, j.H = g.H, j.W = g.W, j.OC = g.OC, j.Ho = g.Ho, j.Wo = g.Wo;
    j.kh = g.kh, j.kw = g.kw, j.sh = g.sh, j.sw = g.sw, j.ph = g.ph, j.pw = g.pw;
    j.dh = g.dh, j.dw = g.dw, j.multiplier = g.multiplier;
    const int64_t lanes = isa->lanes, taps = g.kh * g.kw;
    const int64_t blocks = (g.OC + lanes - 1) / lanes;
    j.inner_lo = 0, j.inner_hi = g.Wo;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const auto r = valid_output_range<int64_t>(kx, g.W, g.Wo, g.sw, g.pw, g.dw);
      j.lo[kx] = r.first, j.hi[kx] = r.last;
      j.inner_lo = std::max(j.inner_lo, r.first), j.inner_hi = std::min(j.inner_hi, r.last);
    }
    bool ring = false;
    if (cl) {
      // The row ring (cpu/depthwise_forward.h) where its one extra pass over each input row
      // pays: bf16 (widened once per row instead of once per use), and stride-1 filters
      // spanning 7 or more rows (each input row reused by that many output rows). Measured at 1
      // and 2 threads against the in-place rows: 128@56 k31 1.0 -> 1.4-1.7x oneDNN, d4-256@64
      // 0.9-1.1 -> 1.3-1.6x, bf16 144@56 1.84 -> 1.55 ms; 3x3 and 5x5 filters tie, stride 2
      // loses (0.94-1.02 -> 0.77-0.94x). That was AVX2 (Zen 4 with AVX-512 disabled). With
      // AVX-512 (same 2-core Zen 4, 2 threads), in place won for bf16 wherever the span is
      // under 9 (ring -> in place: 3x3 0.75-0.78 -> 0.91-0.98x oneDNN, 5x5 0.77 -> 0.84, 7x7
      // 0.94-0.97 -> 0.97-1.05, d4 0.63 -> 0.88) and for 7x7 in fp32 (1.08 -> 1.19); the ring
      // kept the spans of 9 and more in fp32. Since the in-place rows took channel pairs and
      // their row prefetches, AVX2 fp32 dilated rows run faster in place (a 2-core Zen 3, AVX2
      // only, kernel lab, oneDNN / convops, ring -> in place: d4-256@64 batch 1 0.91-0.93 ->
      // 1.20-1.33x at 2 threads, 1.07-1.11 -> 1.21-1.36x at 1; N4 1.64 -> 1.93x and 1.50 ->
      // 1.95x; N8 ties), so there the ring keeps the undilated filters 7 and more tall (7x7
      // ties, 27x27 and 31x31 as measured above). The same now holds with AVX-512 (2-core Zen 4,
      // fp32, oneDNN / convops, ring -> in place: d4-256@64 batch 1 0.81 -> 0.94-1.01x at 2
      // threads, 0.317 -> 0.263 ms; 1 thread 0.574 -> 0.503 ms; 5x5 d2-128@64 0.26 -> 0.17 ms;
      // d8 ties, d12 (no pairs at 64 wide) 5% slower), so there the ring keeps the filters 9 and
      // more tall in both dtypes. CONVOPS_CPU_NHWC=ring|inplace forces one.
      const bool wide = lanes >= 16;
      ring = (wide ? (g.sh == 1 && g.kh >= 9)
                   : (kBF16 || (g.sh == 1 && g.dh == 1 && g.kh >= 7))) &&
             g.kh * blocks * lanes * g.W * int64_t(sizeof(float)) <= kDwRingBudgetBytes;
      if (env_is("CONVOPS_CPU_NHWC", "ring")) ring = true;
      if (env_is("CONVOPS_CPU_NHWC", "inplace")) ring = false;
    }
    // NCHW maps whose rows fit one vector (AVX-512: up to 16 wide) run one plane per task,
    // rows in lanes, without the channel blocks' transposes (cpu/depthwise_forward_kernels.h,
    // nchw_narrow_planes: 576@14 N4 at 1 thread 1.19 -> 1.52x oneDNN in fp32, 1.08 -> 1.69x in
    // bf16). CONVOPS_CPU_NCHW=blocks keeps the channel blocks.
    const bool narrow = !cl && isa->nchw_narrow_f32 != nullptr && dw_nchw_narrow(j, isa->lanes) &&
                        !env_is("CONVOPS_CPU_NCHW", "blocks");
    const int64_t io_bytes = x.nbytes() + out.nbytes();
    const bool in_cache = io_bytes <= last_level_cache_bytes() / 3;
    if (cl && !ring) j.stage_pitch = dw_stage_pitch(j, sizeof(scalar_t), in_cache);
    const bool pairs = cl && !ring &&
                       dw_rows_in_pairs(j, isa->lanes, isa->pair_slide_w, isa->pair_block_w);
    // bf16 pairs in even / odd channel order (the AVX-512 build): fewer ALU ops per load and
    // store, so faster where the bf16 rows are compute-bound (2 threads, interleaved with
    // oneDNN: 32@112 0.88 -> 0.98x oneDNN, 576@14 1.01 -> 1.07). Channel counts that are not a
    // multiple of 32 (144: every other pixel's 64-byte pair straddles two cache lines) were left
    // out until the stores rounded with vcvtne2ps2bf16; since then they gain too (144@56 0.95
    // -> 0.99-1.01x at 1 thread, 0.94-0.97 -> 0.94-1.02 at 2; s2-144@56 0.81 -> 0.86, 0.88-0.94
    // -> 0.92-0.97; batch 1 ties). CONVOPS_CPU_BF16_EVEN_ODD=0 turns it off.
    const bool even_odd = kBF16 && pairs && isa->nhwc_bf16_even_odd != nullptr &&
                          !env_is("CONVOPS_CPU_BF16_EVEN_ODD", "0");
    // float32 rows in place store their output with non-temporal stores where input and output
    // together pass a third of the last-level cache: a cached store first reads its line (read for
    // ownership), so an output that will not stay in cache costs its bytes twice, and its
    // lines evict the input. Needs every full vector aligned (lanes * 4 bytes): channel counts
    // a multiple of the lanes. Measured on the 2-core Zen 4 VM (32 MB L3), each variant alone
    // in its own process (kernel lab), cached -> streamed, ms (oneDNN alongside):
    //   144@56 N8 (14.4 + 14.4 MB): 2 threads 0.60-1.76 -> 0.46-1.15 (0.51-1.84),
    //                               1 thread 3.24-3.34 -> 1.44-2.05 (3.14-3.25)
    //   32@112 N8 (12.8 + 12.8 MB): 2 threads 0.56-0.96 -> 0.38 (0.40-0.75), 1 thread 1.53-1.65
    //                               -> 0.77-0.86 (1.28-1.69)
    //   s2-144@56 N8 (14.4 + 3.6 MB): 0.22-0.57 -> 0.21-0.25;  d4-256@64 N2 (8.4 + 8.4 MB):
    //                               0.44-0.57 -> 0.47 (0.51-0.89)
    //   144@56 N4 (7.2 + 7.2 MB): 2 threads 0.20-0.38 -> 0.27-0.30; N2 0.10 -> 0.14, N1 0.06
    //                               -> 0.07; 7x7-96@56 N4 and 5x5-240@28 N8 tie.
    // The threshold was half the cache until a later day (session 22) on the same VM, when
    // cached N4 layers no longer stayed in L3 between calls; the op alone in its own process,
    // cached -> streamed, ms (oneDNN alone alongside), 2 samples each:
    //   144@56 N4 (7.2 + 7.2 MB): 1 thread 0.97-1.40 -> 0.45 (0.57-1.49), 2 threads 0.86-0.93
    //                               -> 0.32-0.36 (0.31-0.42)
    //   32@112 N4 (6.4 + 6.4 MB): 1 thread 0.40-0.79 -> 0.38-0.46 (0.42-0.45), 2 threads
    //                               0.31-0.45 -> 0.28-0.29 (0.31-0.38)
    //   below a third: s2-144@56 N4 (7.2 + 1.8 MB) 2 threads 0.10-0.13 -> 0.13-0.16, 1 thread
    //                               0.19-0.20 -> 0.20-0.31; 144@56 N2 and N1 tie.
    // Streamed times hold still from day to day; cached ones depend on how much of the L3 the
    // other tenants leave. Streaming leaves the output out of cache for the next layer; below
    // the threshold it would have been there. CONVOPS_CPU_STREAM_STORES=1|0 forces it on
    // (where aligned) or off.
    const bool stream_wanted = env_is("CONVOPS_CPU_STREAM_STORES", "1") ||
                               (!env_is("CONVOPS_CPU_STREAM_STORES", "0") && !in_cache);
    const bool streamed = kF32 && cl && !ring && stream_wanted && g.OC % lanes == 0 &&
                          reinterpret_cast<uintptr_t>(j.y) % (lanes * sizeof(float)) == 0;
    // Weights (and bias) packed per block of `lanes` output channels, zero past OC; with
    // even_odd, the pairs' blocks (all full blocks but an odd last one) in even / odd order.
    const int64_t paired_blocks = even_odd ? (g.OC / lanes) / 2 * 2 : 0;
    auto channel_of = [&](int64_t cb, int64_t l) {
      return cb < paired_blocks ? (cb & ~int64_t(1)) * lanes + 2 * l + (cb & 1) : cb * lanes + l;
    };
    // Per call, in parallel over blocks, each block transposed by the ISA's kernels (8x8
    // register tiles on AVX2 / AVX-512). Packed one lane's tap column at a time, a block of 729
    // taps (46 KB, over L1) went to L2 once per lane: 512 channels of 27x27 bf16 at batch 1
    // spent 31% of the forward's profile samples packing, against 38% in the kernels.
    float* wp = scratch<float>(kDwWeightSlot, blocks * taps * lanes);
    const scalar_t* wsrc = w.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / (taps * lanes)),
                     [&](int64_t begin, int64_t end) {
      const scalar_t* planes[64];  // lanes <= 16
      for (int64_t cb = begin; cb < end; ++cb) {
        int nch = 0;
        for (int64_t l = 0; l < lanes; ++l) {
          const int64_t oc = channel_of(cb, l);
          if (oc < g.OC) planes[nch++] = wsrc + oc * taps;  // only the last block runs short
        }
        if constexpr (kF32) isa->pack_f32(planes, nch, taps, wp + cb * taps * lanes);
        else isa->pack_bf16(planes, nch, taps, wp + cb * taps * lanes);
      }
    });
    j.w = wp;
    if (b.defined()) {
      float* bp = scratch<float>(kDwBiasSlot, blocks * lanes);
      const scalar_t* bsrc = b.const_data_ptr<scalar_t>();
      for (int64_t cb = 0; cb < blocks; ++cb)
        for (int64_t l = 0; l < lanes; ++l) {
          const int64_t oc = channel_of(cb, l);
          bp[cb * lanes + l] = oc < g.OC ? static_cast<float>(bsrc[oc]) : 0.f;
        }
      j.bias = bp;
    }
    if (cl) {
      const DwTaskFn fn = ring ? (kF32 ? isa->nhwc_ring_f32 : isa->nhwc_ring_bf16)
                               : (kF32 ? (streamed ? isa->nhwc_f32_streamed : isa->nhwc_f32)
                                       : even_odd ? isa->nhwc_bf16_even_odd : isa->nhwc_bf16);
      at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) { fn(j, begin, end); });
    } else if (narrow) {
      const DwTaskFn fn = kF32 ? isa->nchw_narrow_f32 : isa->nchw_narrow_bf16;
      const int64_t grain = std::max<int64_t>(1, 4096 / (g.Ho * taps));  // planes per task
      at::parallel_for(0, g.N * g.OC, grain, [&](int64_t begin, int64_t end) { fn(j, begin, end); });
    } else {
      // Strips of output rows give every thread several tasks even at batch 1 with few
      // channel blocks; each strip re-reads only its (kh-1)*dh halo rows.
      const int64_t tasks = g.N * blocks, want = 4 * at::get_num_threads();
      const int64_t strips = std::clamp<int64_t>((want + tasks - 1) / tasks, 1,
                                                 std::max<int64_t>(1, g.Ho / 4));
      j.strip_rows = (g.Ho + strips - 1) / strips;
      j.strips = (g.Ho + j.strip_rows - 1) / j.strip_rows;
      const DwTaskFn fn = kF32 ? isa->nchw_f32 : isa->nchw_bf16;
      at::parallel_for(0, tasks * j.strips, 1,
                       [&](int64_t begin, int64_t end) { fn(j, begin, end); });
    }
    last_forward_path =
        std::string(cl ? (ring ? "nhwc-ring/" : pairs ? "nhwc-pairs/" : "nhwc/") : "nchw/") +
        isa->name;
    if (even_odd) count_path(std::string("depthwise_forward_bf16_even_odd:") + isa->name);
    if (narrow) count_path(std::string("depthwise_forward_nchw_narrow:") + isa->name);
    if (j.stage_pitch) count_path(std::string("depthwise_forward_nhwc_staged:") + isa->name);
    if (streamed) count_path(std::string("depthwise_forward_nhwc_streamed:") + isa->name);
    if (dw_seven_wide(j)) count_path(std::string("depthwise_forward_seven_wide:") + isa->name);
    if (dw_wide_sliding(j)) count_path(std::string("depthwise_forward_wide_sliding:") + isa->name);
    if (dw_wide_sevens(j, isa->lanes))
      count_path(std::string("depthwise_forward_wide_sevens:") + isa->name);
    // NHWC channel tails (masked moves on AVX-512 and AVX2 float, element by element otherwise)
    if (cl && g.C % lanes != 0) count_path(std::string("depthwise_forward_nhwc_tail:") + isa->name);
    return true;
  }
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DepthwiseGeometry g = depthwise_geometry(input, weight, bias, stride, padding, dilation);
  const bool cl = prefers_channels_last(input);
  const at::Tensor x = input.contiguous(layout_of(cl));
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  at::Tensor out = new_conv_output(input, g.N, g.OC, g.Ho, g.Wo);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "depthwise_conv2d_cpu", [&] {
    if (forward_vectorized<scalar_t>(x, w, b, out, g, cl)) return;
    last_forward_path = "generic";
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    if (cl && g.multiplier == 1) {
      nhwc_correlate<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), false,
                               bp, out.mutable_data_ptr<scalar_t>(), g, g.H, g.W, g.Ho, g.Wo,
                               g.sh, g.sw, g.ph, g.pw);
    } else if (cl) {
      const at::Tensor wt = w.view({g.OC, g.kh * g.kw}).t().contiguous();
      forward_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(), bp,
                             out.mutable_data_ptr<scalar_t>(), g);
    } else {
      forward_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bp,
                             out.mutable_data_ptr<scalar_t>(), g);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 3> output_mask) {
  const DepthwiseGeometry g = depthwise_geometry(input, weight, c10::nullopt, stride, padding,
                                                 dilation);
  check_grad_output(grad_output, input, g.N, g.OC, g.Ho, g.Wo, "depthwise_conv2d");
  const bool cl = prefers_channels_last(input);
  const at::Tensor x = input.contiguous(layout_of(cl));
  const at::Tensor go = grad_output.contiguous(layout_of(cl));
  const at::Tensor w = weight.contiguous();
  const ConvGrads grads = new_conv_grads(go, input, weight, output_mask);
  const at::Tensor &grad_input = grads.input, &grad_weight = grads.weight;
  if (g.N == 0) return {grads.input, grads.weight, grads.bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "depthwise_conv2d_backward_cpu", [&] {
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    if (output_mask[0]) {
      scalar_t* gip = grad_input.mutable_data_ptr<scalar_t>();
      if (cl && g.multiplier == 1 && g.sh == 1 && g.sw == 1) {
        nhwc_correlate<scalar_t>(gop, w.const_data_ptr<scalar_t>(), true, nullptr, gip, g, g.Ho,
                                 g.Wo, g.H, g.W, 1, 1, (g.kh - 1) * g.dh - g.ph,
                                 (g.kw - 1) * g.dw - g.pw);
      } else if (cl) {
        const at::Tensor wt = w.view({g.OC, g.kh * g.kw}).t().contiguous();
        input_grad_nhwc<scalar_t>(gop, wt.const_data_ptr<scalar_t>(), gip, g);
      } else {
        if (g.sh == 1 && g.sw == 1)
          input_grad_nchw_stride1<scalar_t>(gop, w.const_data_ptr<scalar_t>(), gip, g);
        else
          input_grad_nchw<scalar_t>(gop, w.const_data_ptr<scalar_t>(), gip, g);
      }
    }
    if (output_mask[1]) {
      scalar_t* gwp = grad_weight.mutable_data_ptr<scalar_t>();
      if (cl && g.multiplier == 1)
        weight_grad_nhwc_fast<scalar_t>(gop, x.const_data_ptr<scalar_t>(), gwp, g);
      else if (cl) weight_grad_nhwc<scalar_t>(gop, x.const_data_ptr<scalar_t>(), gwp, g);
      else weight_grad_nchw<scalar_t>(gop, x.const_data_ptr<scalar_t>(), gwp, g);
    }
  });
  return {grads.input, grads.weight, grads.bias};
}

}  // namespace

// Test hook, outside the convops namespace (not part of the API): torch.ops.convops_cpu_debug.
TORCH_LIBRARY(convops_cpu_debug, m) {
  m.def("depthwise_forward_last_path() -> str", &depthwise_forward_last_path);
  // the size the staging and streaming rules compare against, so that tests predict them
  m.def("last_level_cache_bytes() -> int", &last_level_cache_bytes);
}

TORCH_LIBRARY_IMPL(convops, CPU, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_backward", &depthwise_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace convops
