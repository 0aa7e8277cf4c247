// The direct CPU convolution behind dilated_conv2d: a register-blocked implicit GEMM over a
// zero-padded channels-last float copy of one image, with weights packed per block of output
// channels as [tap][channel][block]. It replaces im2col + sgemm, which on AMD CPUs runs at about
// half of what the FMA units can do (MKL takes a slow path there), and it never materializes
// the K-times larger column matrix.
//
//   forward      y[pixel][oc]  = sum_{tap, c} xpad[pixel + tap][c] * w[tap][c][oc]
//   grad input   the same forward on the padded grad_output with the taps flipped and the
//                weight transposed per group (stride 1 only; other strides use the engine)
//   grad weight  dw[tap][c][oc] += sum_pixel xpad[pixel + tap][c] * dy[pixel][oc], tiles of
//                (tap, channels, output channels) split across threads, each tile reduced in
//                a fixed pixel order: bit-identical for any thread count.
//
// Every dtype but float64 computes in float32 (bf16/fp16 are widened while packing). The
// micro-kernels (cpu/direct_conv_kernels.h) are compiled for AVX-512 and AVX2+FMA and picked at
// run time; CONVOPS_CPU_ISA=avx2 forces the AVX2 build (tests), CONVOPS_CPU_IMPL=engine turns
// the direct path off (the plain gather engine, for telling a tuning bug from a math bug).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/macros.h"
#include "common/tensor_utils.h"
#include "cpu/scratch.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CONVOPS_DIRECT_X86 1
#include <immintrin.h>
#endif

namespace convops {
namespace cpu {

// One forward tile: R output pixels along a row x NV vectors of output channels.
struct DirectForwardTile {
  const float* x;             // packed input at the tile's first pixel, tap (0,0), channel 0
  int64_t pixel_step;         // floats between the inputs of neighbouring output pixels
  const int64_t* tap_offset;  // floats from tap (0,0) to each tap
  int64_t taps, channels;
  const float* w;     // this block's packed weights, [tap][channel][NV * lanes]
  const float* bias;  // NV * lanes values or null
  float* y;
  int64_t y_pixel_step;
};

// One weight-gradient tile: R input channels x NV vectors of output channels of one tap,
// accumulated over rows x cols output pixels.
struct DirectWeightGradTile {
  const float* x;  // packed input at the chunk's first pixel moved by the tap, first channel
  int64_t x_row_step, x_pixel_step;
  const float* dy;  // packed grad_output at the chunk's first pixel, first output channel
  int64_t dy_row_step, dy_pixel_step;
  int64_t rows, cols;
  float* dw;  // [R][dw_row_step], accumulated into
  int64_t dw_row_step;
};

#ifdef CONVOPS_DIRECT_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
#define DIRECT_NS avx512
#define VREG __m512
#define VLANES 16
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VSET1(x) _mm512_set1_ps(x)
#define VZERO() _mm512_setzero_ps()
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define DIRECT_MAX_NV 4  // 4 x 6 accumulators + 4 weights + 1 broadcast of 32 registers
#define DIRECT_MAX_R 6
#include "cpu/direct_conv_kernels.h"
#undef DIRECT_NS
#undef VREG
#undef VLANES
#undef VLOAD
#undef VSTORE
#undef VSET1
#undef VZERO
#undef VFMA
#undef DIRECT_MAX_NV
#undef DIRECT_MAX_R
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DIRECT_NS avx2
#define VREG __m256
#define VLANES 8
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VSET1(x) _mm256_set1_ps(x)
#define VZERO() _mm256_setzero_ps()
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define DIRECT_MAX_NV 2  // 2 x 6 accumulators + 2 weights + 1 broadcast of 16 registers
#define DIRECT_MAX_R 6
#include "cpu/direct_conv_kernels.h"
#undef DIRECT_NS
#undef VREG
#undef VLANES
#undef VLOAD
#undef VSTORE
#undef VSET1
#undef VZERO
#undef VFMA
#undef DIRECT_MAX_NV
#undef DIRECT_MAX_R
#pragma GCC pop_options
#endif  // CONVOPS_DIRECT_X86

struct DirectIsa {
  const char* name;
  int lanes, max_nv, max_r;
  void (*forward)(int nv, int r, const DirectForwardTile&);
  void (*weight_grad)(int nv, int r, const DirectWeightGradTile&);
  int64_t block() const { return int64_t(lanes) * max_nv; }
};

// The vector build this CPU runs, or null (no x86 vector unit, or the engine was asked for).
inline const DirectIsa* direct_isa() {
#ifdef CONVOPS_DIRECT_X86
  static const DirectIsa kAvx512{"avx512", avx512::kLanes, avx512::kMaxNV, avx512::kMaxR,
                                 avx512::forward, avx512::weight_grad};
  static const DirectIsa kAvx2{"avx2", avx2::kLanes, avx2::kMaxNV, avx2::kMaxR, avx2::forward,
                               avx2::weight_grad};
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (env_is("CONVOPS_CPU_IMPL", "engine")) return nullptr;
  if (has_avx512 && !env_is("CONVOPS_CPU_ISA", "avx2")) return &kAvx512;
  if (has_avx2) return &kAvx2;
#endif
  return nullptr;
}

// A stride/dilation convolution of one image with `groups` groups of Cg -> OCg channels. The
// padded image's row r holds source row r - ph (ph may be negative: rows are then skipped).
struct DirectProblem {
  int64_t groups, Cg, OCg, kh, kw, sh, sw, dh, dw, ph, pw, H, W, Ho, Wo;
  int64_t C() const { return groups * Cg; }
  int64_t taps() const { return kh * kw; }
  int64_t padded_h() const { return (Ho - 1) * sh + (kh - 1) * dh + 1; }
  int64_t padded_w() const { return (Wo - 1) * sw + (kw - 1) * dw + 1; }
};

// Scratch slots after the gather engine's (cpu/gather_engine.h uses 0..2).
enum DirectScratch { kPackedImage = 3, kPackedOutput = 4, kPackedGradOutput = 5 };

inline at::Tensor float_view(float* data, at::IntArrayRef sizes) {
  return at::from_blob(data, sizes, at::TensorOptions().dtype(at::kFloat));
}

// image (C, H, W), any dtype and strides -> zero-padded float [padded_h][padded_w][C].
inline float* pack_image(const at::Tensor& image, const DirectProblem& p) {
  const int64_t Hp = p.padded_h(), Wp = p.padded_w(), C = p.C();
  float* buf = scratch<float>(kPackedImage, Hp * Wp * C);
  const int64_t y0 = std::max<int64_t>(0, -p.ph), y1 = std::min(p.H, Hp - p.ph);
  const int64_t x0 = std::max<int64_t>(0, -p.pw), x1 = std::min(p.W, Wp - p.pw);
  const bool any = y1 > y0 && x1 > x0;
  // Zero only what the copy below does not cover: full rows above/below, side columns.
  at::parallel_for(0, Hp, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = buf + r * Wp * C;
      const bool copied = any && r >= y0 + p.ph && r < y1 + p.ph;
      if (!copied) {
        std::fill(row, row + Wp * C, 0.f);
        continue;
      }
      std::fill(row, row + (x0 + p.pw) * C, 0.f);
      std::fill(row + (x1 + p.pw) * C, row + Wp * C, 0.f);
    }
  });
  if (any) {
    float_view(buf, {Hp, Wp, C})
        .narrow(0, y0 + p.ph, y1 - y0)
        .narrow(1, x0 + p.pw, x1 - x0)
        .copy_(image.narrow(1, y0, y1 - y0).narrow(2, x0, x1 - x0).permute({1, 2, 0}));
  }
  return buf;
}

// Output channels are padded per group to a whole number of vectors.
struct PackedWeights {
  at::Tensor w, bias;  // [group][block][tap][Cg][block width]; [group][OCg_padded]
  int64_t OCg_padded, block;
};

// weight (groups * OCg, Cg, kh, kw), any dtype.
inline PackedWeights pack_weights(const at::Tensor& weight, const at::Tensor& bias,
                                  const DirectProblem& p, const DirectIsa& isa) {
  PackedWeights out;
  out.block = isa.block();
  out.OCg_padded = ceil_div<int64_t>(p.OCg, isa.lanes) * isa.lanes;
  const int64_t pad = out.OCg_padded - p.OCg;
  at::Tensor w = weight.to(at::kFloat).reshape({p.groups, p.OCg, p.Cg, p.taps()});
  if (pad > 0) w = at::constant_pad_nd(w, {0, 0, 0, 0, 0, pad});
  std::vector<at::Tensor> blocks;
  for (int64_t b0 = 0; b0 < out.OCg_padded; b0 += out.block) {
    const int64_t width = std::min(out.block, out.OCg_padded - b0);
    blocks.push_back(w.narrow(1, b0, width).permute({0, 3, 2, 1}).reshape({p.groups, -1}));
  }
  out.w = at::cat(blocks, 1).contiguous();
  if (bias.defined()) {
    at::Tensor b = bias.to(at::kFloat).reshape({p.groups, p.OCg});
    out.bias = (pad > 0 ? at::constant_pad_nd(b, {0, pad}) : b).contiguous();
  }
  return out;
}

// y [Ho * Wo][groups * OCg_padded] = the convolution of the packed image.
inline void direct_forward(const float* xp, const PackedWeights& pw, const DirectProblem& p,
                           const DirectIsa& isa, float* y) {
  const int64_t C = p.C(), K = p.taps(), Wp = p.padded_w(), OCt = p.groups * pw.OCg_padded;
  std::vector<int64_t> tap_offset(K);
  for (int64_t t = 0; t < K; ++t) tap_offset[t] = ((t / p.kw) * p.dh * Wp + (t % p.kw) * p.dw) * C;
  const int64_t blocks = ceil_div(pw.OCg_padded, pw.block);
  const float* w = pw.w.const_data_ptr<float>();
  const float* bias = pw.bias.defined() ? pw.bias.const_data_ptr<float>() : nullptr;
  // Output rows innermost: neighbouring tasks share one block of weights in cache.
  at::parallel_for(0, p.groups * blocks * p.Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t oh = task % p.Ho, b = (task / p.Ho) % blocks, g = task / p.Ho / blocks;
      const int64_t b0 = b * pw.block, width = std::min(pw.block, pw.OCg_padded - b0);
      DirectForwardTile a;
      a.pixel_step = p.sw * C;
      a.tap_offset = tap_offset.data();
      a.taps = K;
      a.channels = p.Cg;
      a.w = w + (g * pw.OCg_padded + b0) * K * p.Cg;
      a.bias = bias ? bias + g * pw.OCg_padded + b0 : nullptr;
      a.y_pixel_step = OCt;
      for (int64_t ow0 = 0; ow0 < p.Wo; ow0 += isa.max_r) {
        a.x = xp + (oh * p.sh * Wp + ow0 * p.sw) * C + g * p.Cg;
        a.y = y + (oh * p.Wo + ow0) * OCt + g * pw.OCg_padded + b0;
        isa.forward(static_cast<int>(width / isa.lanes),
                    static_cast<int>(std::min<int64_t>(isa.max_r, p.Wo - ow0)), a);
      }
    }
  });
}

// out (groups * OCg, Ho, Wo), any dtype and layout, from y [Ho][Wo][groups][OCg_padded].
inline void unpack_output(const float* y, const DirectProblem& p, int64_t OCg_padded,
                          at::Tensor out) {
  out.view({p.groups, p.OCg, p.Ho, p.Wo})
      .copy_(float_view(const_cast<float*>(y), {p.Ho, p.Wo, p.groups, OCg_padded})
                 .narrow(3, 0, p.OCg)
                 .permute({2, 3, 0, 1}));
}

// One image of convolution: out (groups * OCg, Ho, Wo) = conv(image (C, H, W)).
inline void direct_conv_image(const at::Tensor& image, const PackedWeights& pw,
                              const DirectProblem& p, const DirectIsa& isa, at::Tensor out) {
  const float* xp = pack_image(image, p);
  float* y = scratch<float>(kPackedOutput, p.Ho * p.Wo * p.groups * pw.OCg_padded);
  direct_forward(xp, pw, p, isa, y);
  unpack_output(y, p, pw.OCg_padded, out);
}

// grad_output image (groups * OCg, Ho, Wo) -> float [Ho * Wo][groups][OCg_padded], padding 0.
inline float* pack_grad_output(const at::Tensor& grad_out, const DirectProblem& p,
                               int64_t OCg_padded) {
  float* buf = scratch<float>(kPackedGradOutput, p.Ho * p.Wo * p.groups * OCg_padded);
  at::Tensor view = float_view(buf, {p.Ho, p.Wo, p.groups, OCg_padded});
  if (OCg_padded > p.OCg) view.zero_();
  view.narrow(3, 0, p.OCg).copy_(grad_out.view({p.groups, p.OCg, p.Ho, p.Wo}).permute({2, 3, 0, 1}));
  return buf;
}

// dw [groups][tap][Cg][OCg_padded] += the weight gradient of one image.
inline void direct_weight_grad(const float* xp, const float* dyp, const DirectProblem& p,
                               int64_t OCg_padded, const DirectIsa& isa, float* dw) {
  const int64_t C = p.C(), K = p.taps(), Wp = p.padded_w(), OCt = p.groups * OCg_padded;
  const int64_t block = isa.block(), blocks = ceil_div(OCg_padded, block);
  const int64_t cblocks = ceil_div<int64_t>(p.Cg, isa.max_r);
  // ~128 pixels of grad_output per chunk stay in L1 while a thread runs all its tiles on them.
  const int64_t chunk_rows = std::max<int64_t>(1, 128 / p.Wo);
  at::parallel_for(0, p.groups * K * blocks * cblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t oh0 = 0; oh0 < p.Ho; oh0 += chunk_rows) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t cb = tile % cblocks, b = (tile / cblocks) % blocks;
        const int64_t t = (tile / cblocks / blocks) % K, g = tile / cblocks / blocks / K;
        const int64_t c0 = cb * isa.max_r, b0 = b * block;
        const int64_t ky = t / p.kw, kx = t % p.kw;
        DirectWeightGradTile a;
        a.x = xp + ((oh0 * p.sh + ky * p.dh) * Wp + kx * p.dw) * C + g * p.Cg + c0;
        a.x_row_step = p.sh * Wp * C;
        a.x_pixel_step = p.sw * C;
        a.dy = dyp + oh0 * p.Wo * OCt + g * OCg_padded + b0;
        a.dy_row_step = p.Wo * OCt;
        a.dy_pixel_step = OCt;
        a.rows = std::min(chunk_rows, p.Ho - oh0);
        a.cols = p.Wo;
        a.dw = dw + ((g * K + t) * p.Cg + c0) * OCg_padded + b0;
        a.dw_row_step = OCg_padded;
        isa.weight_grad(static_cast<int>(std::min(block, OCg_padded - b0) / isa.lanes),
                        static_cast<int>(std::min<int64_t>(isa.max_r, p.Cg - c0)), a);
      }
    }
  });
}

}  // namespace cpu
}  // namespace convops
