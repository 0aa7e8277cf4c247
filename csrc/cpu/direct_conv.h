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
// float32/float16 compute in float32 (float16 is widened while packing). bfloat16 forward and
// stride-1 input gradient use AVX512-BF16 dot products over channel pairs where the CPU has
// them (float32 accumulation, the product rate doubled); its weight gradient widens to float32.
// The micro-kernels (cpu/direct_conv_kernels.h) are compiled for AVX-512, AVX512-BF16 and
// AVX2+FMA and picked at run time; CONVOPS_CPU_ISA=avx512 (no bf16 pairs) or =avx2 forces a
// build (tests), CONVOPS_CPU_IMPL=engine turns the direct path off (the plain gather engine,
// for telling a tuning bug from a math bug).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <array>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/conv_geometry.h"
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
  const int64_t* tap_offset;  // per tap that reads any input: floats from tap (0,0) in x
  const int64_t* tap_weight;  // ... and the offset of its weights in w
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
#include "cpu/avx512_vocabulary.h"
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define DIRECT_MAX_NV 4  // 4 x 6 accumulators + 4 weights + 1 broadcast of 32 registers
#define DIRECT_MAX_R 6
#include "cpu/direct_conv_kernels.h"
namespace avx512 {
// dst[j * dst_step + i] = src[i * src_step + j] for a 16 x 16 float tile, in registers:
// 32-bit, 64-bit, then two 128-bit-lane interleaving rounds.
inline void transpose16(const float* src, int64_t src_step, float* dst, int64_t dst_step) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_step);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * dst_step, r[i]);
}
}  // namespace avx512
#pragma GCC pop_options

// bfloat16 forward with AVX512-BF16 dot products: an "element" is a pair of bf16 input
// channels in one 32-bit word (image and weights packed that way), VSET1 broadcasts a pair and
// VFMA is acc += w[2i] * x[0] + w[2i+1] * x[1], twice the multiply rate of float32 FMAs. Only
// its forward kernel is used (the weight gradient reduces over pixels, not channel pairs).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16")
#define DIRECT_NS avx512bf16
#include "cpu/avx512_vocabulary.h"
#define VFMA(a, b, c) _mm512_dpbf16_ps(c, (__m512bh)(b), (__m512bh)(a))
#define DIRECT_MAX_NV 4
#define DIRECT_MAX_R 6
#include "cpu/direct_conv_kernels.h"
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
#pragma GCC pop_options
#endif  // CONVOPS_DIRECT_X86

struct DirectIsa {
  const char* name;
  int lanes, max_nv, max_r;
  void (*forward)(int nv, int r, const DirectForwardTile&);
  void (*weight_grad)(int nv, int r, const DirectWeightGradTile&);
  // 16 x 16 float transpose for the layout changes, or null (then scalar loops).
  void (*transpose16)(const float* src, int64_t src_step, float* dst, int64_t dst_step);
  // Whether images and weights are packed as bf16 channel pairs (avx512bf16's forward).
  bool pairs = false;
  int64_t block() const { return int64_t(lanes) * max_nv; }
};

// The vector build this CPU runs, or null (no x86 vector unit, or the engine was asked for).
inline const DirectIsa* direct_isa() {
#ifdef CONVOPS_DIRECT_X86
  static const DirectIsa kAvx512{"avx512", avx512::kLanes, avx512::kMaxNV, avx512::kMaxR,
                                 avx512::forward, avx512::weight_grad, avx512::transpose16};
  static const DirectIsa kAvx2{"avx2", avx2::kLanes, avx2::kMaxNV, avx2::kMaxR, avx2::forward,
                               avx2::weight_grad, nullptr};
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (env_is("CONVOPS_CPU_IMPL", "engine")) return nullptr;
  if (has_avx512 && !env_is("CONVOPS_CPU_ISA", "avx2")) return &kAvx512;
  if (has_avx2) return &kAvx2;
#endif
  return nullptr;
}

// The bf16-pair forward build, or null (no AVX512-BF16, or another path was asked for).
inline const DirectIsa* direct_bf16_pairs_isa() {
#ifdef CONVOPS_DIRECT_X86
  static const DirectIsa kPairs{"avx512bf16", avx512bf16::kLanes, avx512bf16::kMaxNV,
                                avx512bf16::kMaxR, avx512bf16::forward, nullptr,
                                avx512::transpose16, true};
  static const bool has_bf16 = __builtin_cpu_supports("avx512bf16");
  // Only on top of the AVX-512 build, and not when CONVOPS_CPU_ISA=avx512 asks for fp32 only.
  const DirectIsa* base = direct_isa();
  if (has_bf16 && base != nullptr && base->lanes == avx512::kLanes &&
      !env_is("CONVOPS_CPU_ISA", "avx512"))
    return &kPairs;
#endif
  return nullptr;
}

// A stride/dilation convolution of one image with `groups` groups of Cg -> OCg channels. The
// padded image's row r holds source row r - ph (ph may be negative: rows are then skipped).
struct DirectProblem {
  int64_t groups, Cg, OCg, kh, kw, sh, sw, dh, dw, ph, pw, H, W, Ho, Wo;
  int64_t C() const { return groups * Cg; }
  // Floats per pixel of the packed image: an odd number of 64-byte lines, so the pixels (and
  // taps) a tile reads at once spread over all L1 sets. With 256 channels a 1 KiB stride put
  // every one of them in the same 4 of 64 sets.
  int64_t pixel_stride() const {
    const int64_t lines = ceil_div<int64_t>(C(), 16);
    return 16 * (lines % 2 ? lines : lines + 1);
  }
  int64_t taps() const { return kh * kw; }
  int64_t padded_h() const { return (Ho - 1) * sh + (kh - 1) * dh + 1; }
  int64_t padded_w() const { return (Wo - 1) * sw + (kw - 1) * dw + 1; }
  // The same problem over bf16 channel pairs (Cg even): what the pair kernels index.
  DirectProblem paired() const {
    DirectProblem q = *this;
    q.Cg = Cg / 2;
    return q;
  }
};

// Moves one row of (C, cols) values between a tensor of any floating dtype (element strides
// sc, sx) and a float pixel-major row (buf[col * pixel_step + channel]), in 16 x 16 tiles so
// that the strided side of the transpose stays in L1.
template <bool kToBuffer, typename scalar_t>
void transpose_row(const DirectIsa& isa, scalar_t* trow, int64_t sc, int64_t sx, float* brow,
                   int64_t pixel_step, int64_t C, int64_t cols) {
  constexpr int64_t kTile = 16;
  const auto move = [](scalar_t& tv, float& bv) {
    if constexpr (kToBuffer) bv = static_cast<float>(tv);
    else tv = static_cast<scalar_t>(bv);
  };
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    const int64_t c1 = std::min(C, c0 + kTile);
    for (int64_t x0 = 0; x0 < cols; x0 += kTile) {
      const int64_t x1 = std::min(cols, x0 + kTile);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (isa.transpose16 && sx == 1 && c1 - c0 == kTile && x1 - x0 == kTile) {
          float* tt = trow + c0 * sc + x0;
          float* bt = brow + x0 * pixel_step + c0;
          if (kToBuffer) isa.transpose16(tt, sc, bt, pixel_step);
          else isa.transpose16(bt, pixel_step, tt, sc);
          continue;
        }
      }
      if (sx <= sc) {  // NCHW-like: walk the tensor's rows
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t x = x0; x < x1; ++x) move(trow[c * sc + x * sx], brow[x * pixel_step + c]);
      } else {  // channels last: walk its pixels
        for (int64_t x = x0; x < x1; ++x)
          for (int64_t c = c0; c < c1; ++c) move(trow[c * sc + x * sx], brow[x * pixel_step + c]);
      }
    }
  }
}

// (C, rows, cols) of a tensor -> float buffer [row * row_step + col * pixel_step + channel],
// one row per task.
template <typename scalar_t>
void gather_pixels(const DirectIsa& isa, const scalar_t* t, int64_t sc, int64_t sy, int64_t sx,
                   float* buf, int64_t row_step, int64_t pixel_step, int64_t C, int64_t rows,
                   int64_t cols) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y) {
      transpose_row<true>(isa, const_cast<scalar_t*>(t) + y * sy, sc, sx, buf + y * row_step,
                          pixel_step, C, cols);
    }
  });
}

// Scratch slots after the gather engine's (cpu/gather_engine.h uses 0..2).
enum DirectScratch { kPackedGradOutput = 3 };

// A thread's buffer of padded images that remembers the geometry whose zero borders it holds:
// the forward and weight gradient of one layer, step after step, skip re-zeroing them (at
// ASPP's d=12 on 33x33 the border is two thirds of the padded image).
enum PaddedSlot { kInputImages = 0, kGradOutputImages = 1, kPaddedSlots = 2 };

struct PaddedImages {
  AlignedArray<float> buffer;
  int64_t zeroed = 0;  // images whose borders are known to be zero
  std::array<int64_t, 7> key{};
};

// One row of bf16 channel pairs: out[x * pixel_step + c] = bits(src[2c][x]) | bits(src[2c+1][x])
// << 16, for c < pairs (the low half is the even channel, as vdpbf16ps pairs them). Only
// bfloat16 sources are ever paired; other types never reach here.
template <typename scalar_t>
void pack_bf16_pairs(const scalar_t* src, int64_t sc, int64_t sx, uint32_t* out,
                     int64_t pixel_step, int64_t pairs, int64_t cols) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const auto word = [&](int64_t c, int64_t x) {
      return uint32_t(src[2 * c * sc + x * sx].x) |
             (uint32_t(src[(2 * c + 1) * sc + x * sx].x) << 16);
    };
    if (sx <= sc) {  // NCHW-like: walk rows of the two channels
      for (int64_t c = 0; c < pairs; ++c)
        for (int64_t x = 0; x < cols; ++x) out[x * pixel_step + c] = word(c, x);
    } else {
      for (int64_t x = 0; x < cols; ++x)
        for (int64_t c = 0; c < pairs; ++c) out[x * pixel_step + c] = word(c, x);
    }
  }
}

// images [n0, n0 + count) of batch (N, C, H, W), any dtype and strides -> zero-padded float
// [image][padded_h][padded_w][C], pixels pixel_stride() floats apart.
inline const float* pack_images(const at::Tensor& batch, int64_t n0, int64_t count,
                                const DirectProblem& p, const DirectIsa& isa, PaddedSlot slot) {
  thread_local PaddedImages slots[kPaddedSlots];
  PaddedImages& b = slots[slot];
  const int64_t Hp = p.padded_h(), Wp = p.padded_w(), C = p.pixel_stride();
  const int64_t per_image = Hp * Wp * C;
  if (b.buffer.reserve(per_image * count)) b.zeroed = 0;
  const std::array<int64_t, 7> key{Hp, Wp, C, p.ph, p.pw, p.H, p.W};
  if (key != b.key) {
    b.key = key;
    b.zeroed = 0;
  }
  float* buf = b.buffer.data.get();
  const int64_t y0 = std::max<int64_t>(0, -p.ph), y1 = std::min(p.H, Hp - p.ph);
  const int64_t x0 = std::max<int64_t>(0, -p.pw), x1 = std::min(p.W, Wp - p.pw);
  const bool any = y1 > y0 && x1 > x0;
  const int64_t zeroed = b.zeroed;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, batch.scalar_type(), "pack_images",
                                  [&] {
    const scalar_t* src = batch.const_data_ptr<scalar_t>();
    const int64_t sn = batch.stride(0), sc = batch.stride(1), sy = batch.stride(2),
                  sx = batch.stride(3);
    at::parallel_for(0, count * Hp, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / Hp, r = task % Hp;
        float* row = buf + i * per_image + r * Wp * C;
        const bool borders_zero = i < zeroed;
        if (!any || r < y0 + p.ph || r >= y1 + p.ph) {
          if (!borders_zero) std::fill(row, row + Wp * C, 0.f);
          continue;
        }
        if (!borders_zero) {
          std::fill(row, row + (x0 + p.pw) * C, 0.f);
          std::fill(row + (x1 + p.pw) * C, row + Wp * C, 0.f);
        }
        const scalar_t* from = src + (n0 + i) * sn + (r - p.ph) * sy + x0 * sx;
        if (isa.pairs) {  // p is paired(): word c of a pixel = channels 2c, 2c + 1
          pack_bf16_pairs(from, sc, sx, reinterpret_cast<uint32_t*>(row + (x0 + p.pw) * C), C,
                          p.C(), x1 - x0);
          continue;
        }
        transpose_row<true>(isa, const_cast<scalar_t*>(from), sc, sx, row + (x0 + p.pw) * C, C,
                            p.C(), x1 - x0);
      }
    });
  });
  b.zeroed = std::max(zeroed, count);
  return buf;
}

// Images per pack: all of them, or as many as fit in 16 MiB of padded floats (at least one).
inline int64_t images_per_pack(const DirectProblem& p, int64_t N) {
  const int64_t per_image = p.padded_h() * p.padded_w() * p.pixel_stride();
  return std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(4) << 20) / per_image));
}

// Output channels are padded per group to a whole number of vectors.
struct PackedWeights {
  at::Tensor w, bias;  // [group][block][tap][Cg][block width]; [group][OCg_padded]
  int64_t OCg_padded, block;
};

// weight (groups * OCg, Cg, kh, kw), any dtype. With for_input_grad the packed weights are
// those of the input gradient's convolution (problem p is then input_grad_problem): each
// group's weight transposed (p.OCg = the layer's Cg) and the taps flipped, read in place.
inline PackedWeights pack_weights(const at::Tensor& weight, const at::Tensor& bias,
                                  const DirectProblem& p, const DirectIsa& isa,
                                  bool for_input_grad = false) {
  PackedWeights out;
  out.block = isa.block();
  out.OCg_padded = ceil_div<int64_t>(p.OCg, isa.lanes) * isa.lanes;
  const at::Tensor src_t = weight.to(at::kFloat).contiguous();
  const float* src = src_t.const_data_ptr<float>();
  const int64_t K = p.taps();
  // Strides of (group, packed output channel, packed input channel) in the source.
  const int64_t sg = p.OCg * p.Cg * K;
  const int64_t so = for_input_grad ? K : p.Cg * K, sc = for_input_grad ? p.OCg * K : K;
  // With pairs, each (tap, channel pair) row holds width 32-bit words of two bf16 weights.
  const int64_t rows_per_tap = isa.pairs ? p.Cg / 2 : p.Cg;
  out.w = at::empty({p.groups * out.OCg_padded * K * rows_per_tap}, src_t.options());
  float* dst = out.w.data_ptr<float>();
  const int64_t blocks = ceil_div(out.OCg_padded, out.block);
  // Tasks of (group, block, 16 input channels). The block's source rows lie Cg * K floats
  // apart, often a multiple of 4 KiB, so reading them column-wise would hit a handful of L1
  // sets: each row's run is first copied to a small staging buffer, read out from there.
  constexpr int64_t kTile = 16;
  const int64_t ctiles = ceil_div<int64_t>(p.Cg, kTile);
  at::parallel_for(0, p.groups * blocks * ctiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> stage(out.block * kTile * K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ct = task % ctiles, b = (task / ctiles) % blocks, g = task / ctiles / blocks;
      const int64_t b0 = b * out.block, width = std::min(out.block, out.OCg_padded - b0);
      const int64_t valid = std::min(width, p.OCg - b0);
      const int64_t c0 = ct * kTile, cn = std::min(p.Cg, c0 + kTile) - c0;
      for (int64_t j = 0; j < valid; ++j) {  // stage[j][c][t]
        for (int64_t c = 0; c < cn; ++c) {
          const float* row = src + g * sg + (b0 + j) * so + (c0 + c) * sc;
          float* to = stage.data() + (j * kTile + c) * K;
          for (int64_t t = 0; t < K; ++t) to[t] = row[t];  // K is small: no memmove call
        }
      }
      float* blk = dst + (g * out.OCg_padded + b0) * K * rows_per_tap;
      for (int64_t t = 0; t < K; ++t) {
        const int64_t st = for_input_grad ? K - 1 - t : t;
        if (isa.pairs) {
          for (int64_t c = 0; c < cn; c += 2) {
            uint32_t* d = reinterpret_cast<uint32_t*>(blk + (t * rows_per_tap + (c0 + c) / 2) * width);
            for (int64_t j = 0; j < valid; ++j) {
              d[j] = uint32_t(c10::BFloat16(stage[(j * kTile + c) * K + st]).x) |
                     (uint32_t(c10::BFloat16(stage[(j * kTile + c + 1) * K + st]).x) << 16);
            }
            std::fill(d + valid, d + width, 0u);
          }
          continue;
        }
        for (int64_t c = 0; c < cn; ++c) {
          float* d = blk + (t * p.Cg + c0 + c) * width;
          for (int64_t j = 0; j < valid; ++j) d[j] = stage[(j * kTile + c) * K + st];
          std::fill(d + valid, d + width, 0.f);
        }
      }
    }
  });
  if (bias.defined()) {
    at::Tensor b = bias.to(at::kFloat).reshape({p.groups, p.OCg});
    const int64_t pad = out.OCg_padded - p.OCg;
    out.bias = (pad > 0 ? at::constant_pad_nd(b, {0, pad}) : b).contiguous();
  }
  return out;
}

// Whether any of the output positions first, first + 1, ..., last reads inside [0, size) at
// tap k: taps that read only padding are skipped (a third of the work at ASPP's d=12 on 33x33).
inline bool tap_reads_input(int64_t first, int64_t last, int64_t k, int64_t size, int64_t stride,
                            int64_t pad, int64_t dilation) {
  return last * stride + k * dilation - pad >= 0 && first * stride + k * dilation - pad < size;
}

// out (groups * OCg, Ho, Wo), any floating dtype and layout = the convolution of the packed
// image. A task computes one output row of one block of output channels into a small
// pixel-major buffer and writes it to `out` while it is still in L1.
inline void direct_forward(const float* xp, const PackedWeights& pw, const DirectProblem& p,
                           const DirectIsa& isa, at::Tensor out, int64_t n0, int64_t count) {
  const int64_t C = p.pixel_stride(), K = p.taps(), Wp = p.padded_w();
  const int64_t per_image = p.padded_h() * Wp * C;
  const int64_t blocks = ceil_div(pw.OCg_padded, pw.block);
  const float* w = pw.w.const_data_ptr<float>();
  const float* bias = pw.bias.defined() ? pw.bias.const_data_ptr<float>() : nullptr;
  // Rows split into tiles of nearly equal width (33 = 6+6+6+5+5+5, not 6*5+3).
  const int64_t row_tiles = ceil_div<int64_t>(p.Wo, isa.max_r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "direct_forward",
                                  [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t sn = out.stride(0), so = out.stride(1), sy = out.stride(2), sx = out.stride(3);
    // Output rows innermost: neighbouring tasks share one block of weights in cache. All
    // images of the pack in one region, so 2 x 33 rows split evenly over 2 threads.
    at::parallel_for(0, count * p.groups * blocks * p.Ho, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> tap_offset(row_tiles * K), tap_weight(row_tiles * K), taps(row_tiles);
      AlignedArray<float> row;
      row.reserve(p.Wo * pw.block);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t oh = task % p.Ho, b = (task / p.Ho) % blocks;
        const int64_t g = (task / p.Ho / blocks) % p.groups, i = task / p.Ho / blocks / p.groups;
        const int64_t b0 = b * pw.block, width = std::min(pw.block, pw.OCg_padded - b0);
        for (int64_t tile = 0; tile < row_tiles; ++tile) {
          const int64_t ow0 = tile * p.Wo / row_tiles, ow1 = (tile + 1) * p.Wo / row_tiles;
          taps[tile] = 0;
          for (int64_t t = 0; t < K; ++t) {
            const int64_t ky = t / p.kw, kx = t % p.kw;
            if (!tap_reads_input(oh, oh, ky, p.H, p.sh, p.ph, p.dh) ||
                !tap_reads_input(ow0, ow1 - 1, kx, p.W, p.sw, p.pw, p.dw))
              continue;
            tap_offset[tile * K + taps[tile]] = (ky * p.dh * Wp + kx * p.dw) * C;
            tap_weight[tile * K + taps[tile]++] = t * p.Cg * width;
          }
        }
        DirectForwardTile a;
        a.pixel_step = p.sw * C;
        a.channels = p.Cg;
        a.w = w + (g * pw.OCg_padded + b0) * K * p.Cg;
        a.bias = bias ? bias + g * pw.OCg_padded + b0 : nullptr;
        a.y_pixel_step = width;
        for (int64_t tile = 0; tile < row_tiles; ++tile) {
          const int64_t ow0 = tile * p.Wo / row_tiles, ow1 = (tile + 1) * p.Wo / row_tiles;
          a.tap_offset = tap_offset.data() + tile * K;
          a.tap_weight = tap_weight.data() + tile * K;
          a.taps = taps[tile];
          a.x = xp + i * per_image + (oh * p.sh * Wp + ow0 * p.sw) * C + g * p.Cg;
          a.y = row.data.get() + ow0 * width;
          isa.forward(static_cast<int>(width / isa.lanes), static_cast<int>(ow1 - ow0), a);
        }
        transpose_row<false>(isa, o + (n0 + i) * sn + (g * p.OCg + b0) * so + oh * sy, so, sx,
                             row.data.get(), width, std::min(width, p.OCg - b0), p.Wo);
      }
    });
  });
}

// out (N, groups * OCg, Ho, Wo) = conv(batch (N, C, H, W)), a pack of images at a time.
inline void direct_conv_batch(const at::Tensor& batch, const PackedWeights& pw,
                              const DirectProblem& p, const DirectIsa& isa, PaddedSlot slot,
                              at::Tensor out) {
  const int64_t N = batch.size(0), step = images_per_pack(p, N);
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t count = std::min(step, N - n0);
    direct_forward(pack_images(batch, n0, count, p, isa, slot), pw, p, isa, out, n0, count);
  }
}

// grad_output image (groups * OCg, Ho, Wo) -> float [Ho * Wo][groups][OCg_padded], padding 0.
inline float* pack_grad_output(const at::Tensor& grad_out, const DirectProblem& p,
                               int64_t OCg_padded, const DirectIsa& isa) {
  float* buf = scratch<float>(kPackedGradOutput, p.Ho * p.Wo * p.groups * OCg_padded);
  const int64_t OCt = p.groups * OCg_padded;
  if (OCg_padded > p.OCg) std::fill(buf, buf + p.Ho * p.Wo * OCt, 0.f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "pack_grad_output", [&] {
    for (int64_t g = 0; g < p.groups; ++g) {
      gather_pixels(isa, grad_out.const_data_ptr<scalar_t>() + g * p.OCg * grad_out.stride(0),
                    grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
                    buf + g * OCg_padded, p.Wo * OCt, OCt, p.OCg, p.Ho, p.Wo);
    }
  });
  return buf;
}

// dw [groups][tap][Cg][OCg_padded] += the weight gradient of one image.
// Where the weight gradient reads grad_output: pixel (oh, ow), output channel oc of group g at
// data[oh * row_step + ow * pixel_step + g * group_step + oc], each group's channels padded
// with zeros (or real) up to a whole number of vectors.
struct GradOutputView {
  const float* data;
  int64_t row_step, pixel_step, group_step;
};

inline void direct_weight_grad(const float* xp, const GradOutputView& dy, const DirectProblem& p,
                               int64_t OCg_padded, const DirectIsa& isa, float* dw) {
  const int64_t C = p.pixel_stride(), K = p.taps(), Wp = p.padded_w();
  const int64_t block = isa.block(), blocks = ceil_div(OCg_padded, block);
  const int64_t cblocks = ceil_div<int64_t>(p.Cg, isa.max_r);
  // Rows of ~512 output pixels per chunk: a thread runs all its tiles over one chunk of
  // grad_output while it is in L2. Measured on Zen 4: 64 or 128 pixels lose 5-14% to reloading
  // the accumulators, whole images lose 12% at 48x48.
  const int64_t chunk_rows = std::max<int64_t>(1, 512 / p.Wo);
  at::parallel_for(0, p.groups * K * blocks * cblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t oh0 = 0; oh0 < p.Ho; oh0 += chunk_rows) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t cb = tile % cblocks, b = (tile / cblocks) % blocks;
        const int64_t t = (tile / cblocks / blocks) % K, g = tile / cblocks / blocks / K;
        // Channel tiles of nearly equal size (128 = 6 * 18 + 5 * 4, not 6 * 21 + 2).
        const int64_t c0 = cb * p.Cg / cblocks, c1 = (cb + 1) * p.Cg / cblocks, b0 = b * block;
        const int64_t ky = t / p.kw, kx = t % p.kw;
        // Only the output pixels whose tap reads inside the image contribute.
        const auto rows = valid_output_range<int64_t>(ky, p.H, p.Ho, p.sh, p.ph, p.dh);
        const auto cols = valid_output_range<int64_t>(kx, p.W, p.Wo, p.sw, p.pw, p.dw);
        const int64_t r0 = std::max(oh0, rows.first);
        const int64_t r1 = std::min(oh0 + chunk_rows, std::min(p.Ho, rows.last));
        if (r0 >= r1 || cols.first >= cols.last) continue;
        DirectWeightGradTile a;
        a.x = xp + ((r0 * p.sh + ky * p.dh) * Wp + cols.first * p.sw + kx * p.dw) * C +
              g * p.Cg + c0;
        a.x_row_step = p.sh * Wp * C;
        a.x_pixel_step = p.sw * C;
        a.dy = dy.data + r0 * dy.row_step + cols.first * dy.pixel_step + g * dy.group_step + b0;
        a.dy_row_step = dy.row_step;
        a.dy_pixel_step = dy.pixel_step;
        a.rows = r1 - r0;
        a.cols = cols.last - cols.first;
        a.dw = dw + ((g * K + t) * p.Cg + c0) * OCg_padded + b0;
        a.dw_row_step = OCg_padded;
        isa.weight_grad(static_cast<int>(std::min(block, OCg_padded - b0) / isa.lanes),
                        static_cast<int>(c1 - c0), a);
      }
    }
  });
}

}  // namespace cpu
}  // namespace convops
