// The CPU "gather, then multiply by the weight matrix" engine shared by deformable and dilated
// convolution (dilated uses it where its direct path, cpu/direct_conv.h, does not apply, and
// as the plain reference path under CONVOPS_CPU_IMPL=engine). A sampler says, for (offset group, tap, output pixel), where the input is read
// (a Sample: up to four weighted neighbours) and with what modulation; the engine does the rest:
//
//   forward      cols[c*K + tap][p] = m * sample(input[c])          (im2col through the sampler)
//                out[g]             = W[g] (OCg x Cg*K) @ cols[g]    (at::mm, MKL/oneDNN)
//   grad weight  dW[g]             += grad_out[g] @ cols[g]^T
//   grad cols    dcols[g]           = W[g]^T @ grad_out[g]
//   grad input   scatter dcols through the same samples; one task per input channel, so no two
//                threads touch the same element and the order is fixed (deterministic)
//
// Work is done per image in chunks of output pixels whose column buffer holds at most
// kColumnBudget elements (C*K rows x chunk pixels), so extra memory does not grow with N.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/bilinear.h"
#include "common/deform.h"
#include "common/engine_gemms.h"
#include "common/tensor_utils.h"
#include "cpu/path_counts.h"
#include "cpu/scratch.h"

namespace convops {
namespace cpu {

// 4 Mi elements: 16 MiB of fp32 columns (plus the same again for their gradient in backward).
constexpr int64_t kColumnBudget = int64_t(1) << 22;

enum EngineScratch { kColumns = 0, kColumnGrads = 1, kImageGrad = 2 };

inline int64_t chunk_pixels(const DeformGeometry& g) {
  const int64_t rows = g.C * g.taps();
  return std::max<int64_t>(1, std::min<int64_t>(g.Ho * g.Wo, column_budget(kColumnBudget) / rows));
}

// Strided access to one image of an (N, C, H, W) tensor, whatever its layout.
template <typename scalar_t>
struct PlaneView {
  const scalar_t* data;
  int64_t sc, sy, sx;
  const scalar_t* plane(int64_t c) const { return data + c * sc; }
  scalar_t at(int64_t c, int64_t y, int64_t x) const { return data[c * sc + y * sy + x * sx]; }
};

template <typename scalar_t>
PlaneView<scalar_t> image_view(const at::Tensor& t, int64_t n) {
  return {t.const_data_ptr<scalar_t>() + n * t.stride(0), t.stride(1), t.stride(2),
          t.stride(3)};
}

// Samples of one chunk: index ((og * K + tap) * P + p).
template <typename acc_t>
struct ChunkSamples {
  std::vector<Sample<acc_t, int64_t>> samples;
  std::vector<acc_t> modulation;
  int64_t P = 0;
  const Sample<acc_t, int64_t>& at(int64_t og, int64_t tap, int64_t K, int64_t p) const {
    return samples[(og * K + tap) * P + p];
  }
  acc_t mod(int64_t og, int64_t tap, int64_t K, int64_t p) const {
    return modulation[(og * K + tap) * P + p];
  }
};

template <typename acc_t, typename Sampler>
void gather_samples(const Sampler& sampler, const DeformGeometry& g, int64_t p0, int64_t P,
                    ChunkSamples<acc_t>& out) {
  const int64_t K = g.taps();
  out.P = P;
  out.samples.resize(g.offset_groups * K * P);
  out.modulation.resize(g.offset_groups * K * P);
  at::parallel_for(0, g.offset_groups * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t og = row / K, tap = row % K;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t pix = p0 + p;
        out.samples[row * P + p] =
            sampler.sample(og, tap, pix / g.Wo, pix % g.Wo, &out.modulation[row * P + p]);
      }
    }
  });
}

// cols (C*K x P, contiguous) = modulation * sampled input.
template <typename acc_t, typename scalar_t>
void im2col(const PlaneView<scalar_t>& x, const ChunkSamples<acc_t>& s, const DeformGeometry& g,
            acc_t* cols) {
  const int64_t K = g.taps(), P = s.P, cpo = g.channels_per_offset_group();
  at::parallel_for(0, g.C * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row / K, tap = row % K, og = c / cpo;
      const scalar_t* plane = x.plane(c);
      acc_t* dst = cols + row * P;
      for (int64_t p = 0; p < P; ++p)
        dst[p] = s.mod(og, tap, K, p) *
                 sample_value<acc_t, scalar_t, int64_t>(plane, x.sy, x.sx, s.at(og, tap, K, p));
    }
  });
}

// grad_in_acc (C x H x W, contiguous) += scatter of dcols through the samples.
template <typename acc_t>
void col2im(const acc_t* dcols, const ChunkSamples<acc_t>& s, const DeformGeometry& g,
            acc_t* grad_in_acc) {
  const int64_t K = g.taps(), P = s.P, cpo = g.channels_per_offset_group();
  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t og = c / cpo;
      acc_t* plane = grad_in_acc + c * g.H * g.W;
      for (int64_t tap = 0; tap < K; ++tap) {
        const acc_t* d = dcols + (c * K + tap) * P;
        for (int64_t p = 0; p < P; ++p) {
          const auto& smp = s.at(og, tap, K, p);
          if (!smp.inside) continue;
          const acc_t v = d[p] * s.mod(og, tap, K, p);
          acc_t* q = plane + smp.y0 * g.W + smp.x0;
          if (smp.w00 != acc_t(0)) q[0] += v * smp.w00;
          if (smp.w01 != acc_t(0)) q[1] += v * smp.w01;
          if (smp.w10 != acc_t(0)) q[g.W] += v * smp.w10;
          if (smp.w11 != acc_t(0)) q[g.W + 1] += v * smp.w11;
        }
      }
    }
  });
}

// Integer-grid (dilated) im2col and col2im: a chunk of pixels is a sequence of runs along
// output rows; each run reads (or adds into) one input row at a fixed stride, inside the range
// valid_output_range gives, so the inner loops are plain strided copies with no per-element
// bounds tests or Sample structs.
template <typename Visit>
void for_each_grid_run(const DeformGeometry& g, int64_t tap, int64_t p0, int64_t P,
                       const Visit& visit) {
  const int64_t ky = tap / g.kw, kx = tap % g.kw;
  const auto cols = valid_output_range<int64_t>(kx, g.W, g.Wo, g.sw, g.pw, g.dw);
  for (int64_t p = 0; p < P;) {
    const int64_t pix = p0 + p, oh = pix / g.Wo, ow0 = pix % g.Wo;
    const int64_t run = std::min(g.Wo - ow0, P - p);
    const int64_t ih = conv_input_pos<int64_t>(oh, ky, g.sh, g.ph, g.dh);
    int64_t first = ow0, last = ow0;  // valid part [first, last) of [ow0, ow0 + run)
    if (ih >= 0 && ih < g.H) {
      // A chunk may end or start mid-row: clamp to the run on both sides.
      first = std::min(std::max(ow0, cols.first), ow0 + run);
      last = std::max(first, std::min(ow0 + run, cols.last));
    }
    // visit(p of ow0, run, ih, offset of first valid, count valid, input column of first)
    visit(p, run, ih, first - ow0, last - first,
          conv_input_pos<int64_t>(first, kx, g.sw, g.pw, g.dw));
    p += run;
  }
}

template <typename acc_t, typename scalar_t>
void grid_im2col(const PlaneView<scalar_t>& x, const DeformGeometry& g, int64_t p0, int64_t P,
                 acc_t* cols) {
  const int64_t K = g.taps(), step = g.sw * x.sx;
  at::parallel_for(0, g.C * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row / K, tap = row % K;
      acc_t* dst = cols + row * P;
      for_each_grid_run(g, tap, p0, P, [&](int64_t p, int64_t run, int64_t ih, int64_t skip,
                                           int64_t count, int64_t iw) {
        acc_t* d = dst + p;
        std::fill(d, d + skip, acc_t(0));
        const scalar_t* src = x.plane(c) + ih * x.sy + iw * x.sx;
        for (int64_t i = 0; i < count; ++i) d[skip + i] = static_cast<acc_t>(src[i * step]);
        std::fill(d + skip + count, d + run, acc_t(0));
      });
    }
  });
}

template <typename acc_t>
void grid_col2im(const acc_t* dcols, const DeformGeometry& g, int64_t p0, int64_t P,
                 acc_t* grad_in_acc) {
  const int64_t K = g.taps();
  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t* plane = grad_in_acc + c * g.H * g.W;
      for (int64_t tap = 0; tap < K; ++tap) {
        const acc_t* src = dcols + (c * K + tap) * P;
        for_each_grid_run(g, tap, p0, P, [&](int64_t p, int64_t, int64_t ih, int64_t skip,
                                             int64_t count, int64_t iw) {
          acc_t* d = plane + ih * g.W + iw;
          const acc_t* s = src + p + skip;
          for (int64_t i = 0; i < count; ++i) d[i * g.sw] += s[i];
        });
      }
    }
  });
}

// The engine's three sampler-dependent steps, dispatched on the sampler kind.
template <typename acc_t, typename scalar_t, typename Sampler>
void sample_chunk(const Sampler& sampler, const DeformGeometry& g, int64_t p0, int64_t P,
                  ChunkSamples<acc_t>& samples) {
  if constexpr (!Sampler::kIntegerGrid) gather_samples(sampler, g, p0, P, samples);
  samples.P = P;
}

template <typename acc_t, typename scalar_t, typename Sampler>
void chunk_im2col(const PlaneView<scalar_t>& x, const ChunkSamples<acc_t>& s,
                  const DeformGeometry& g, int64_t p0, acc_t* cols) {
  if constexpr (Sampler::kIntegerGrid) grid_im2col(x, g, p0, s.P, cols);
  else im2col(x, s, g, cols);
}

template <typename acc_t, typename Sampler>
void chunk_col2im(const acc_t* dcols, const ChunkSamples<acc_t>& s, const DeformGeometry& g,
                  int64_t p0, acc_t* grad_in_acc) {
  if constexpr (Sampler::kIntegerGrid) grid_col2im(dcols, g, p0, s.P, grad_in_acc);
  else col2im(dcols, s, g, grad_in_acc);
}

// A 2-D at::Tensor over a raw buffer (no copy), for at::mm.
inline at::Tensor wrap(void* data, int64_t rows, int64_t cols, at::ScalarType dtype) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(dtype));
}

// out = conv(input) through the sampler that make_sampler(n) returns for image n.
template <typename scalar_t, typename MakeSampler>
void engine_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    const DeformGeometry& g, const MakeSampler& make_sampler, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t K = g.taps(), Cg = g.channels_per_group();
  const at::Tensor w = weight.to(acc_type).reshape({g.OC, Cg * K});
  const at::Tensor b = bias.defined() ? bias.to(acc_type).reshape({g.OC, 1}) : at::Tensor();
  const int64_t chunk = chunk_pixels(g);
  acc_t* cols = scratch<acc_t>(kColumns, g.C * K * chunk);
  ChunkSamples<acc_t> samples;
  count_path("engine_forward_chunks", g.N * ceil_div<int64_t>(g.Ho * g.Wo, chunk));
  for (int64_t n = 0; n < g.N; ++n) {
    const auto x = image_view<scalar_t>(input, n);
    const auto sampler = make_sampler(n);
    using Sampler = std::decay_t<decltype(sampler)>;
    const at::Tensor out_n = out[n].view({g.OC, g.Ho * g.Wo});
    for (int64_t p0 = 0; p0 < g.Ho * g.Wo; p0 += chunk) {
      const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);
      sample_chunk<acc_t, scalar_t>(sampler, g, p0, P, samples);
      chunk_im2col<acc_t, scalar_t, Sampler>(x, samples, g, p0, cols);
      const at::Tensor cols_t = wrap(cols, g.C * K, P, acc_type);
      grouped_forward_gemm(AtenMatmul(), w, b, cols_t, g, out_n, p0, P);
    }
  }
}

// Backward through the sampler: grad_weight (if defined) and grad_input (if defined), and for
// every chunk sample_grads(x, dcols, samples, p0, n) when want_sample_grads (deform's
// offset/mask gradients). grad_weight is overwritten.
template <typename scalar_t, typename MakeSampler, typename SampleGrads>
void engine_backward(const at::Tensor& grad_output, const at::Tensor& input,
                     const at::Tensor& weight, const DeformGeometry& g,
                     const MakeSampler& make_sampler, bool want_sample_grads,
                     const SampleGrads& sample_grads, at::Tensor& grad_input,
                     at::Tensor& grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const bool want_input = grad_input.numel() > 0, want_weight = grad_weight.numel() > 0;
  const bool need_dcols = want_input || want_sample_grads;
  const int64_t K = g.taps(), Cg = g.channels_per_group();
  const at::Tensor w = weight.to(acc_type).reshape({g.OC, Cg * K});
  at::Tensor gw_acc = want_weight ? at::zeros({g.OC, Cg * K}, w.options()) : at::Tensor();
  const int64_t chunk = chunk_pixels(g);
  acc_t* cols = want_weight ? scratch<acc_t>(kColumns, g.C * K * chunk) : nullptr;
  acc_t* dcols = need_dcols ? scratch<acc_t>(kColumnGrads, g.C * K * chunk) : nullptr;
  acc_t* gi_acc = want_input ? scratch<acc_t>(kImageGrad, g.C * g.H * g.W) : nullptr;
  ChunkSamples<acc_t> samples;
  count_path("engine_backward_chunks", g.N * ceil_div<int64_t>(g.Ho * g.Wo, chunk));
  for (int64_t n = 0; n < g.N; ++n) {
    const auto x = image_view<scalar_t>(input, n);
    const auto sampler = make_sampler(n);
    using Sampler = std::decay_t<decltype(sampler)>;
    const at::Tensor go_n = grad_output[n].reshape({g.OC, g.Ho * g.Wo});
    if (want_input) std::fill(gi_acc, gi_acc + g.C * g.H * g.W, acc_t(0));
    for (int64_t p0 = 0; p0 < g.Ho * g.Wo; p0 += chunk) {
      const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);
      sample_chunk<acc_t, scalar_t>(sampler, g, p0, P, samples);
      const at::Tensor go_chunk = go_n.narrow(1, p0, P).to(acc_type);
      if (want_weight) {
        chunk_im2col<acc_t, scalar_t, Sampler>(x, samples, g, p0, cols);
        const at::Tensor cols_t = wrap(cols, g.C * K, P, acc_type);
        grouped_weight_grad_gemm(AtenMatmul(), gw_acc, go_chunk, cols_t, g);
      }
      if (!need_dcols) continue;
      const at::Tensor dcols_t = wrap(dcols, g.C * K, P, acc_type);
      grouped_column_grad_gemm(AtenMatmul(), dcols_t, w, go_chunk, g);
      if (want_sample_grads) sample_grads(x, dcols, samples, p0, n);
      if (want_input) chunk_col2im<acc_t, Sampler>(dcols, samples, g, p0, gi_acc);
    }
    if (want_input) {
      grad_input[n].copy_(
          at::from_blob(gi_acc, {g.C, g.H, g.W}, at::TensorOptions().dtype(acc_type)));
    }
  }
  if (want_weight) grad_weight.copy_(gw_acc.view(grad_weight.sizes()));
}

}  // namespace cpu
}  // namespace convops
