// The fused implicit-GEMM engine of deformable and dilated convolution on CUDA, one engine for
// both: the Sampler (common/deform.h bilinear offsets x mask, common/dilated.h integer grid)
// decides where each (offset group, tap, pixel) reads; nothing else differs.
//
// Per group the convolution is a GEMM with M = out-channels, N = all N*Ho*Wo output pixels of
// the batch (one launch per pass, never per image, group or chunk) and K = taps * in-channels,
// ordered tap-major so one K-slice (a tap and up to kBK channels) shares its samples. The
// columns never reach global memory: the B tile is sampled while it is staged in shared memory.
// Blocks are kThreads = 128 threads (4 warps) and a 64 x 64 output tile, K in slices of 32.
// Gathers read channels_last inputs in 16-byte channel packs; a contiguous NCHW input of a
// grouped layer is first transposed by nchw_to_nhwc when the copy fits the accumulation budget
// (gather_source), else read plane by plane, coalesced along W across the tile's pixels.
//
// - Forward (igemm_forward): A = weight (OC, taps, Cg) copy in the input dtype, B = sampled
//   columns (scalar_t), out = A * B + bias. Staging gives each thread one pixel and 16
//   channels; its sample is computed once per (tap, offset group). Small maps and batch 1,
//   with fewer tiles than two per SM, also split the taps over blocks (split-K along the
//   tap-major K): fp32 (fp64) partials of O(tiles), added in split order by
//   igemm_forward_reduce. The input gradient splits its taps the same way.
// - Weight gradient (igemm_weight_grad + igemm_weight_grad_reduce): dW = grad_out * cols^T,
//   reducing over N*Ho*Wo in slices of 32 pixels; the pixel range is split S ways (S from the
//   shapes only) into partials of S x OC x taps x Cg in fp32 (fp64), independent of the batch,
//   summed in a fixed order by the reduce kernel. Deterministic always, no atomics.
// - Input, offset and mask gradients (igemm_data_grad), one fused kernel: per 64-pixel tile and
//   K-slice it builds dcols = W^T * grad_out (M = channels of the slice, reducing over the
//   group's out-channels) on tensor cores, then each thread takes one pixel and 16 channels:
//   it scatters dcols * mask * corner weight to the four corners and sums the offset and mask
//   gradients over its channels; the two threads of a pixel and the slices of an offset group
//   are added in a fixed order, so grad_offset and grad_mask are deterministic in both modes.
//   The scatter uses fp32 (fp64) atomics, into grad_input itself for fp32/fp64 and into an fp32
//   copy for fp16/bf16. Under torch.use_deterministic_algorithms(True) it adds fixed-point
//   integers instead (int64, 2^S per unit): integer addition is associative, so the result is
//   bit-reproducible while still using every thread. S is chosen per call on the device from a
//   bound on |grad_input| (max|grad_out| * max column sum of |W| * max|mask| * taps * Ho * Wo),
//   so no sum can overflow 2^62; each term is rounded to 2^-S, i.e. about 2^-62 of that bound.
//   The accumulation buffer covers at most kAccumBudget elements: larger batches run in image
//   chunks, so extra memory does not grow with the batch.
// - Dilated convolution: taps whose samples all land in padding for a tile are skipped. Its
//   input gradient (groups < C) is the forward kernel over grad_output with flipped taps
//   (igemm_dilated_input_grad_run): a gather, no atomics.
// - Depthwise layers (groups == C): the GEMM degenerates (K = taps, or M = 1 per group), so
//   every pass is direct: igemm_forward_depthwise, igemm_weight_grad_depthwise (a fixed-order
//   block reduction per (out-channel, pixel range), then the same split reduce) and
//   igemm_data_grad_depthwise_{atomic,fixed} (one thread per pixel and tap, walking the offset
//   group's channels; the same scatter modes).
// - Math: fp16/bf16 on tensor cores (fp32 accumulation); fp32 on TF32 tensor cores when
//   torch.backends.cudnn.allow_tf32 (as F.conv2d), else exact FFMA; fp64 FFMA. Tensor cores
//   need sm_80; older GPUs and CONVOPS_CUDA_IMPL=plain run the plain engine
//   (cuda/gather_engine.cuh).
// Indexing is int64; launch geometry is int64 and checked before launch.
// Written in the device dialect (cuda/dialect.h): the emulator runs this same file.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/ceil.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/exp2.h>
#include <ATen/ops/full.h>
#include <ATen/ops/log2.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#include "common/deform.h"
#include "common/dilated.h"
#include "common/tensor_utils.h"
#include "cuda/dialect.h"

namespace convops {
namespace cuda {

constexpr int kIgThreads = 128;
constexpr int kBM = 64, kBN = 64, kBK = 32;
constexpr int kStageChannels = 16;  // channels one thread samples per K-slice
constexpr int64_t kAccumBudget = int64_t(1) << 25;
constexpr int64_t kWgTargetBlocks = 1056;  // about 8 blocks per SM of an H100
constexpr int64_t kMaxWgSplits = 64;
constexpr int64_t kTapSplitTargetBlocks = 264;  // 2 blocks per SM of an H100 (132 SMs)

// Shared-memory layout of one block: A (kRowsA x ld) and B (kBN x ld, column-major) tiles in
// the operand type, reused after the K loop as the fp32 (fp64) result tile C (kRowsA x ldc).
// Leading dimensions are padded (bank conflicts) and keep wmma's 16-byte / 32-byte rules.
template <typename scalar_t, int kRowsA>
struct TileLayout {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kPad = sizeof(scalar_t) == 2 ? 8 : sizeof(scalar_t) == 4 ? 4 : 1;
  static constexpr int ld = kBK + kPad;
  static constexpr int ldc = kBN + (sizeof(acc_t) == 4 ? 4 : 1);
  static constexpr int64_t a_bytes = (int64_t(kRowsA) * ld * sizeof(scalar_t) + 127) / 128 * 128;
  static constexpr int64_t ab_bytes = a_bytes + int64_t(kBN) * ld * sizeof(scalar_t);
  static constexpr int64_t c_bytes = int64_t(kRowsA) * ldc * sizeof(acc_t);
  static constexpr int64_t c_bytes_aligned = (c_bytes + 127) / 128 * 128;
  static constexpr int64_t bytes = ab_bytes > c_bytes ? ab_bytes : c_bytes;
};

// The GEMM shape and tensor strides one launch needs (int64).
struct EngineParams {
  int64_t N, C, H, W, OC, taps, kw, Cg, OCg, groups, cpo, offset_groups, Ho, Wo, HoWo;
  int cpo32, Wo32, HoWo32, go_ocp32, go_cols32, Cg32, kw32, groups32;  // for 32-bit divisions
  uint64_t howo_inv;  // floor((2^64 - 1) / HoWo): see pixel_cursor
  int64_t slices;             // weight gradient: slices of kBK pixels
  int64_t per_split;          // weight gradient: slices per split; else taps per split
  int64_t n0, n1;                  // the images this launch covers
  int64_t x_sn, x_sc, x_sy, x_sx;  // input
  int64_t o_sn, o_sc, o_sy, o_sx;  // output or grad_output
  bool out_channels_last;          // forward: coalesce the output along channels
  bool vec_channels;               // input channels_last, pixels and groups 16-byte aligned
  int64_t splits;                  // weight gradient: pixel ranges; else tap ranges
  // Input gradient: grad_out of the block's 64 pixels held in shared memory for the whole
  // block (pixel-major, each group's out-channels padded to go_ocp, row length go_ld), or
  // staged again per K-slice when it does not fit (go_resident false).
  bool go_resident;
  int64_t go_ocp, go_ld;
};

// 16 bytes of channels: 8 fp16/bf16, 4 fp32 or 2 fp64.
template <typename scalar_t>
struct alignas(16) ChannelPack {
  static constexpr int kLanes = 16 / sizeof(scalar_t);
  scalar_t v[kLanes];
};

// Stages one pixel's column values for channels [c, c + kStageChannels) of tap `tap` into dst
// (scalar_t, stride dst_stride): mask * bilinear sample, zero outside [.., c_end) or the image.
// The sample is recomputed only when the offset group changes (og_cache). When the input is
// channels_last with 16-byte aligned pixels (e.vec_channels) and the 16 channels share an
// offset group, each corner is read as 16-byte channel packs; otherwise channel by channel.
template <typename scalar_t, typename Sampler, typename acc_t>
__device__ __forceinline__ void stage_columns(const scalar_t* x_img, const EngineParams& e,
                                              const Sampler& s_img, bool valid, int64_t ky,
                                              int64_t kx, int64_t oh, int64_t ow, int64_t c,
                                              int64_t c_end,
                                              int64_t& og_cache, Sample<acc_t, int64_t>& smp,
                                              acc_t& m, scalar_t* dst, int dst_stride) {
  using Pack = ChannelPack<scalar_t>;
  // Channel counts fit int32 (checked on the host): a 32-bit division, once per 16 channels.
  int64_t og = static_cast<int>(c) / e.cpo32, og_end = (og + 1) * e.cpo;
  if (valid && e.vec_channels && c + kStageChannels <= c_end && c + kStageChannels <= og_end) {
    if (og != og_cache) {
      smp = s_img.sample_at(og, ky, kx, oh, ow, &m);
      og_cache = og;
    }
    acc_t sum[kStageChannels];
#pragma unroll
    for (int j = 0; j < kStageChannels; ++j) sum[j] = acc_t(0);
    if (smp.inside) {
      const scalar_t* p = x_img + smp.y0 * e.x_sy + smp.x0 * e.x_sx + c;
      // Four explicit corners (an array of corners indexed in a loop lands on the stack).
      const auto add_corner = [&](acc_t weight, const scalar_t* corner) {
        if (weight == acc_t(0)) return;  // outside the image: never read
#pragma unroll
        for (int k = 0; k < kStageChannels; k += Pack::kLanes) {
          const Pack v = *reinterpret_cast<const Pack*>(corner + k);
#pragma unroll
          for (int l = 0; l < Pack::kLanes; ++l) sum[k + l] += weight * static_cast<acc_t>(v.v[l]);
        }
      };
      add_corner(smp.w00, p);
      add_corner(smp.w01, p + e.x_sx);
      add_corner(smp.w10, p + e.x_sy);
      add_corner(smp.w11, p + e.x_sy + e.x_sx);
    }
#pragma unroll
    for (int j = 0; j < kStageChannels; ++j) dst[j * dst_stride] = static_cast<scalar_t>(m * sum[j]);
    return;
  }
#pragma unroll 4
  for (int j = 0; j < kStageChannels; ++j, ++c) {
    acc_t v = acc_t(0);
    if (valid && c < c_end) {
      if (c >= og_end) {  // channels advance one at a time: at most one group further
        ++og;
        og_end += e.cpo;
      }
      if (og != og_cache) {
        smp = s_img.sample_at(og, ky, kx, oh, ow, &m);
        og_cache = og;
      }
      v = m * sample_value<acc_t, scalar_t, int64_t>(x_img + c * e.x_sc, e.x_sy, e.x_sx, smp);
    }
    dst[j * dst_stride] = static_cast<scalar_t>(v);
  }
}

// C (kRowsA x kBN) += A (kRowsA x kBK, row-major in As) * B (kBK x kBN, column-major in Bs),
// kept in registers across K-slices: tensor cores (warp w owns rows (w / 2) * kRowsA / 2 and
// columns (w % 2) * 32) or FFMA (thread owns kRowsA / 8 rows and 4 strided columns).
template <typename scalar_t, bool kMma, int kRowsA>
struct BlockMath;

#if CONVOPS_TENSOR_CORES
template <typename scalar_t, int kRowsA>
struct BlockMath<scalar_t, true, kRowsA> {
  using L = TileLayout<scalar_t, kRowsA>;
  static constexpr int kFragRows = kRowsA / 32;  // 16-row fragments per warp
  MmaFragAcc<scalar_t> acc[kFragRows][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kFragRows; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) mma_zero<scalar_t>(acc[i][j]);
  }
  __device__ __forceinline__ void step(const scalar_t* As, const scalar_t* Bs, int ldb = L::ld) {
    constexpr int kK = MmaK<scalar_t>::value;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int k0 = 0; k0 < kBK; k0 += kK) {
      MmaFragA<scalar_t> a[kFragRows];
      MmaFragB<scalar_t> b[2];
#pragma unroll
      for (int i = 0; i < kFragRows; ++i)
        mma_load_a<scalar_t>(a[i], As + (wm * kRowsA / 2 + i * 16) * L::ld + k0, L::ld);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        mma_load_b<scalar_t>(b[j], Bs + (wn * 32 + j * 16) * ldb + k0, ldb);
#pragma unroll
      for (int i = 0; i < kFragRows; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) mma_run<scalar_t>(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* Cs) const {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < kFragRows; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        mma_store<scalar_t>(Cs + (wm * kRowsA / 2 + i * 16) * L::ldc + wn * 32 + j * 16,
                            acc[i][j], L::ldc);
  }
};
#endif

template <typename scalar_t, int kRowsA>
struct BlockMath<scalar_t, false, kRowsA> {
  using L = TileLayout<scalar_t, kRowsA>;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kRows = kRowsA / 8;
  acc_t acc[kRows][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  }
  __device__ __forceinline__ void step(const scalar_t* As, const scalar_t* Bs, int ldb = L::ld) {
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      acc_t a[kRows], b[4];
#pragma unroll
      for (int i = 0; i < kRows; ++i) a[i] = static_cast<acc_t>(As[(tm * kRows + i) * L::ld + k]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = static_cast<acc_t>(Bs[(tn + 16 * j) * ldb + k]);
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
  }
  __device__ __forceinline__ void store(acc_t* Cs) const {
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(tm * kRows + i) * L::ldc + tn + 16 * j] = acc[i][j];
  }
};

// Output pixel q of the launch (over its images) as image n and position r in the image.
// No 64-bit division (a call on the GPU, whose register saves spill): q / (Ho * Wo) is the high
// product with howo_inv = floor((2^64 - 1) / (Ho * Wo)), which gives the quotient or one less,
// and one step corrects it. Moving a cursor by less than 2^30 pixels and splitting r take
// 32-bit divisions (Ho * Wo < 2^30, checked on the host), which need no call either.
struct PixelCursor {
  int64_t n;
  int r;
};
__device__ __forceinline__ PixelCursor pixel_cursor(int64_t q, const EngineParams& e) {
  int64_t n = static_cast<int64_t>(mul_high_u64(static_cast<uint64_t>(q), e.howo_inv));
  int64_t r = q - n * e.HoWo;
  if (r >= e.HoWo) {
    ++n;
    r -= e.HoWo;
  }
  return {e.n0 + n, static_cast<int>(r)};
}
__device__ __forceinline__ PixelCursor advance(PixelCursor c, int by, const EngineParams& e) {
  int r = c.r + by;
  const int images = r / e.HoWo32;
  return {c.n + images, r - images * e.HoWo32};
}

struct PixelPos {
  int64_t n, oh, ow;
  bool valid;
};
__device__ __forceinline__ PixelPos pixel_at(PixelCursor c, int by, const EngineParams& e) {
  const PixelCursor at = advance(c, by, e);
  PixelPos p;
  p.valid = at.n < e.n1;
  p.n = p.valid ? at.n : e.n0;
  const int r = p.valid ? at.r : 0, oh = r / e.Wo32;
  p.oh = oh;
  p.ow = r - oh * e.Wo32;
  return p;
}

// Does any pixel of the block sample inside the image at `tap`? (dilated: skip the tap if not)
template <typename Sampler, typename acc_t>
__device__ __forceinline__ bool tap_reaches_image(int* flag, const Sampler& s_img,
                                                  const PixelPos& pp, int64_t ky, int64_t kx) {
  __syncthreads();  // everyone has read the previous answer
  if (threadIdx.x == 0) *flag = 0;
  __syncthreads();
  acc_t m;
  if (pp.valid && s_img.sample_at(0, ky, kx, pp.oh, pp.ow, &m).inside) *flag = 1;
  __syncthreads();
  return *flag != 0;
}

// --- forward --------------------------------------------------------------------------------

// Where a tap split's partial sum of (oc, launch pixel q) lives: in the output's order, so the
// reduce reads the partials and writes the output both along memory.
__device__ __forceinline__ int64_t partial_index(const EngineParams& e, int64_t oc, int64_t q,
                                                 int64_t pixels) {
  return e.out_channels_last ? q * e.OC + oc : oc * pixels + q;
}

template <typename scalar_t, bool kMma, typename Sampler>
__global__ void __launch_bounds__(kIgThreads, 1)
igemm_forward(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w_okc,
              const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
              at::opmath_type<scalar_t>* __restrict__ partial, Sampler sampler, EngineParams e) {
#if CONVOPS_TENSOR_CORES || !defined(__CUDA_ARCH__)
  using acc_t = at::opmath_type<scalar_t>;
  using L = TileLayout<scalar_t, kBM>;
  CONVOPS_DYNAMIC_SHARED(unsigned char, smem);
  CONVOPS_SHARED_ARRAY(int, tap_flag, 1);
  CONVOPS_SHARED_ARRAY(int64_t, out_offset, kBN);  // per pixel of the tile; -1: past the end
  scalar_t* As = reinterpret_cast<scalar_t*>(smem);
  scalar_t* Bs = reinterpret_cast<scalar_t*>(smem + L::a_bytes);
  acc_t* Cs = reinterpret_cast<acc_t*>(smem);
  const int tid = threadIdx.x;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int bz = blockIdx.z, split = bz / e.groups32, grp = bz - split * e.groups32;
  const int tap_begin = split * static_cast<int>(e.per_split);
  const int tap_end = std::min(static_cast<int>(e.taps), tap_begin + static_cast<int>(e.per_split));
  const int bp = tid % kBN, bh = tid / kBN;  // staging: pixel, channel half
  const PixelPos pp = pixel_at(pixel_cursor(q0, e), bp, e);
  if (bh == 0) out_offset[bp] = pp.valid ? pp.n * e.o_sn + pp.oh * e.o_sy + pp.ow * e.o_sx : -1;
  const Sampler s_img = sampler.image(pp.n);
  const scalar_t* x_img = x + pp.n * e.x_sn;
  const int am = tid / 2, ak = (tid % 2) * 16;  // staging of A: row, first column
  const bool a_row_valid = m0 + am < e.OCg;
  const scalar_t* w_row = w_okc + (grp * e.OCg + m0 + am) * e.taps * e.Cg;
  const int64_t c_begin = grp * e.Cg, c_end = c_begin + e.Cg;
  BlockMath<scalar_t, kMma, kBM> math;
  math.zero();
  for (int64_t tap = tap_begin, ky = tap_begin / e.kw32, kx = tap_begin - ky * e.kw32;
       tap < tap_end; ++tap, kx = kx + 1 == e.kw ? 0 : kx + 1, ky += kx == 0) {
    if (Sampler::kIntegerGrid &&
        !tap_reaches_image<Sampler, acc_t>(tap_flag, s_img, pp, ky, kx))
      continue;
    int64_t og_cache = -1;
    Sample<acc_t, int64_t> smp;
    acc_t m = acc_t(1);
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kBK) {
#pragma unroll 4
      for (int j = 0; j < 16; ++j) {
        const int64_t c = c0 + ak + j;
        As[am * L::ld + ak + j] = (a_row_valid && c < c_end)
                                      ? w_row[tap * e.Cg + (c - c_begin)]
                                      : static_cast<scalar_t>(0);
      }
      stage_columns<scalar_t, Sampler, acc_t>(x_img, e, s_img, pp.valid, ky, kx, pp.oh, pp.ow,
                                              c0 + bh * kStageChannels, c_end, og_cache, smp, m,
                                              Bs + bp * L::ld + bh * kStageChannels, 1);
      __syncthreads();
      math.step(As, Bs);
      __syncthreads();  // the next slice overwrites the tiles
    }
  }
  math.store(Cs);
  __syncthreads();
  const int64_t pixels = e.N * e.HoWo;
  acc_t* part = partial != nullptr ? partial + split * e.OC * pixels : nullptr;
  for (int i = tid; i < kBM * kBN; i += kIgThreads) {
    const int mm = e.out_channels_last ? i % kBM : i / kBN;
    const int p = e.out_channels_last ? i / kBM : i % kBN;
    const int64_t at = out_offset[p];
    if (at < 0 || m0 + mm >= e.OCg) continue;
    const int64_t oc = grp * e.OCg + m0 + mm;
    acc_t v = Cs[mm * L::ldc + p];
    if (part != nullptr) {  // a tap split: igemm_forward_reduce adds the splits and the bias
      part[partial_index(e, oc, q0 + p, pixels)] = v;
      continue;
    }
    if (bias != nullptr) v += static_cast<acc_t>(bias[oc]);
    out[at + oc * e.o_sc] = static_cast<scalar_t>(v);
  }
#endif
}

// out = bias + the tap splits' partial sums, added in split order (deterministic).
template <typename scalar_t>
__global__ void __launch_bounds__(256)
igemm_forward_reduce(const at::opmath_type<scalar_t>* __restrict__ partial,
                     const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                     EngineParams e) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixels = e.N * e.HoWo;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= e.OC * pixels) return;
  const int64_t oc = e.out_channels_last ? i % e.OC : i / pixels;
  const int64_t q = e.out_channels_last ? i / e.OC : i % pixels;
  acc_t sum = 0;
  for (int64_t s = 0; s < e.splits; ++s) sum += partial[s * e.OC * pixels + i];
  if (bias != nullptr) sum += static_cast<acc_t>(bias[oc]);
  const PixelPos pp = pixel_at(pixel_cursor(q, e), 0, e);
  out[pp.n * e.o_sn + oc * e.o_sc + pp.oh * e.o_sy + pp.ow * e.o_sx] = static_cast<scalar_t>(sum);
}

// Depthwise layers (groups == C, one input channel per group): the GEMM degenerates to K =
// taps, so the forward is direct: one thread per output, summing its taps over the sampled
// input channel (no tensor cores, no shared memory). Threads walk the output in its memory
// order, so loads and stores are coalesced in either layout.
template <typename scalar_t, typename Sampler>
__global__ void __launch_bounds__(256)
igemm_forward_depthwise(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                        const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                        Sampler sampler, EngineParams e) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= e.N * e.OC * e.HoWo) return;
  int64_t oc, q;
  if (e.out_channels_last) {
    oc = i % e.OC;
    q = i / e.OC;
  } else {
    q = (i / (e.OC * e.HoWo)) * e.HoWo + i % e.HoWo;
    oc = i / e.HoWo % e.OC;
  }
  const PixelPos pp = pixel_at(pixel_cursor(q, e), 0, e);
  const int64_t c = oc / e.OCg, og = c / e.cpo;
  const Sampler s_img = sampler.image(pp.n);
  const scalar_t* plane = x + pp.n * e.x_sn + c * e.x_sc;
  acc_t sum = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
  for (int64_t tap = 0, ky = 0, kx = 0; tap < e.taps;
       ++tap, kx = kx + 1 == e.kw ? 0 : kx + 1, ky += kx == 0) {
    acc_t m;
    const auto smp = s_img.sample_at(og, ky, kx, pp.oh, pp.ow, &m);
    sum += static_cast<acc_t>(w[oc * e.taps + tap]) * m *
           sample_value<acc_t, scalar_t, int64_t>(plane, e.x_sy, e.x_sx, smp);
  }
  out[pp.n * e.o_sn + oc * e.o_sc + pp.oh * e.o_sy + pp.ow * e.o_sx] = static_cast<scalar_t>(sum);
}

// --- weight gradient ------------------------------------------------------------------------

// partial[split][oc][tap * Cg + c] over the split's slices of 32 pixels. Grid: (column tiles
// of 64 = taps * ceil(Cg / 64), ceil(OCg / 64), groups * splits).
template <typename scalar_t, bool kMma, typename Sampler>
__global__ void __launch_bounds__(kIgThreads, 1)
igemm_weight_grad(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_out,
                  at::opmath_type<scalar_t>* __restrict__ partial, Sampler sampler,
                  EngineParams e) {
#if CONVOPS_TENSOR_CORES || !defined(__CUDA_ARCH__)
  using acc_t = at::opmath_type<scalar_t>;
  using L = TileLayout<scalar_t, kBM>;
  CONVOPS_DYNAMIC_SHARED(unsigned char, smem);
  scalar_t* As = reinterpret_cast<scalar_t*>(smem);
  scalar_t* Bs = reinterpret_cast<scalar_t*>(smem + L::a_bytes);
  acc_t* Cs = reinterpret_cast<acc_t*>(smem);
  const int tid = threadIdx.x;
  // 32-bit divisions only (block indices, tap counts and groups fit): no division calls.
  const int col_tiles = (e.Cg32 + kBN - 1) / kBN, bx = blockIdx.x;
  const int tap = bx / col_tiles, ky = tap / e.kw32, kx = tap - ky * e.kw32;
  const int64_t c0 = static_cast<int64_t>(bx - tap * col_tiles) * kBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int bz = blockIdx.z, split = bz / e.groups32, grp = bz - split * e.groups32;
  const int64_t c_begin = grp * e.Cg, c_end = c_begin + e.Cg;
  const int64_t s_begin = split * e.per_split, s_end = std::min(e.slices, s_begin + e.per_split);
  // staging: each thread one pixel of the slice; A rows bc, bc + 4, ...; B columns
  // bc * 16 .. bc * 16 + 15
  const int bq = tid % kBK, bc = tid / kBK;
  BlockMath<scalar_t, kMma, kBM> math;
  math.zero();
  PixelCursor slice = pixel_cursor(s_begin * kBK, e);
  for (int64_t s = s_begin; s < s_end; ++s, slice = advance(slice, kBK, e)) {
    const PixelPos pp = pixel_at(slice, bq, e);
    const scalar_t* go = grad_out + pp.n * e.o_sn + (grp * e.OCg + m0) * e.o_sc +
                         pp.oh * e.o_sy + pp.ow * e.o_sx;
#pragma unroll 4
    for (int j = 0; j < kBM / 4; ++j) {
      const int mm = bc + 4 * j;
      As[mm * L::ld + bq] = (pp.valid && m0 + mm < e.OCg) ? go[mm * e.o_sc]
                                                          : static_cast<scalar_t>(0);
    }
    const Sampler s_img = sampler.image(pp.n);
    int64_t og_cache = -1;
    Sample<acc_t, int64_t> smp;
    acc_t m = acc_t(1);
    stage_columns<scalar_t, Sampler, acc_t>(x + pp.n * e.x_sn, e, s_img, pp.valid, ky, kx,
                                            pp.oh, pp.ow, c_begin + c0 + bc * kStageChannels, c_end,
                                            og_cache, smp, m,
                                            Bs + (bc * kStageChannels) * L::ld + bq, L::ld);
    __syncthreads();
    math.step(As, Bs);
    __syncthreads();
  }
  math.store(Cs);
  __syncthreads();
  const int64_t row = e.taps * e.Cg;
  acc_t* dst = partial + split * e.OC * row;
  for (int i = tid; i < kBM * kBN; i += kIgThreads) {
    const int mm = i / kBN, cc = i % kBN;
    if (m0 + mm >= e.OCg || c0 + cc >= e.Cg) continue;
    dst[(grp * e.OCg + m0 + mm) * row + tap * e.Cg + c0 + cc] = Cs[mm * L::ldc + cc];
  }
#endif
}

// Depthwise layers (Cg == 1): grad_weight[oc][tap] reduces over pixels only, and GEMM tiles
// would be 1/64 full, so it is direct. Block (oc, split) of 256 threads: per tap each thread
// sums grad_out * mask * sample over its pixels of the split, then the block adds the 256 sums
// in a fixed tree into partial[split][oc][tap] (igemm_weight_grad_reduce adds the splits).
template <typename scalar_t, typename Sampler>
__global__ void __launch_bounds__(256)
igemm_weight_grad_depthwise(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_out,
                            at::opmath_type<scalar_t>* __restrict__ partial, Sampler sampler,
                            EngineParams e) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kThreads = 256;
  CONVOPS_SHARED_ARRAY(acc_t, sums, kThreads);
  const int tid = threadIdx.x;
  // 32-bit divisions: channel counts fit (checked on the host)
  const int oc = blockIdx.x, split = blockIdx.y, c = oc / static_cast<int>(e.OCg);
  const int og = c / e.cpo32;
  const int64_t q_begin = split * e.per_split;
  const int64_t q_end = std::min(e.N * e.HoWo, q_begin + e.per_split);
  const PixelCursor first = pixel_cursor(q_begin + tid, e);
  const scalar_t* go_channel = grad_out + oc * e.o_sc;
  const scalar_t* x_channel = x + c * e.x_sc;
  for (int tap = 0, ky = 0, kx = 0; tap < e.taps;
       ++tap, kx = kx + 1 == e.kw32 ? 0 : kx + 1, ky += kx == 0) {
    acc_t sum = 0;
    PixelCursor cur = first;
    for (int64_t q = q_begin + tid; q < q_end; q += kThreads, cur = advance(cur, kThreads, e)) {
      const int oh = cur.r / e.Wo32, ow = cur.r - oh * e.Wo32;
      acc_t m;
      const auto smp = sampler.image(cur.n).sample_at(og, ky, kx, oh, ow, &m);
      const acc_t go = static_cast<acc_t>(
          go_channel[cur.n * e.o_sn + oh * e.o_sy + ow * e.o_sx]);
      sum += go * m *
             sample_value<acc_t, scalar_t, int64_t>(x_channel + cur.n * e.x_sn, e.x_sy, e.x_sx,
                                                    smp);
    }
    sums[tid] = sum;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (tid < half) sums[tid] += sums[tid + half];
      __syncthreads();
    }
    if (tid == 0) partial[(split * e.OC + oc) * e.taps + tap] = sums[0];
    __syncthreads();  // sums is rewritten by the next tap
  }
}

// grad_weight (OC, Cg, kh, kw) = sum over splits, in split order.
template <typename scalar_t>
__global__ void __launch_bounds__(256)
igemm_weight_grad_reduce(const at::opmath_type<scalar_t>* __restrict__ partial,
                         scalar_t* __restrict__ grad_weight, int64_t OC, int64_t Cg,
                         int64_t taps, int64_t splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= OC * Cg * taps) return;
  const int64_t tap = i % taps, c = i / taps % Cg, oc = i / (taps * Cg);
  const int64_t at = oc * taps * Cg + tap * Cg + c;
  at::opmath_type<scalar_t> sum = 0;
  for (int64_t s = 0; s < splits; ++s) sum += partial[s * OC * taps * Cg + at];
  grad_weight[i] = static_cast<scalar_t>(sum);
}

// --- input, offset and mask gradients ----------------------------------------------------------

// Where the scatter adds: fp32/fp64 atomics, or fixed-point int64 (deterministic mode).
template <typename acc_t>
struct GradInputTarget {
  acc_t* values;                     // float mode: (N_chunk, C, H, W) through strides
  unsigned long long* fixed;         // fixed-point mode, same strides
  const double* scale;               // fixed-point units per 1.0 (device scalar)
  int64_t sn, sc, sy, sx;
};

template <bool kFixedPoint, typename acc_t>
__device__ __forceinline__ void scatter_add(const GradInputTarget<acc_t>& t, double scale,
                                            int64_t at, acc_t v) {
  if (kFixedPoint) {
    const long long units = llrint(static_cast<double>(v) * scale);
    atomic_add_u64(t.fixed + at, static_cast<unsigned long long>(units));
  } else {
    atomic_add(t.values + at, v);
  }
}

// Adds v times each corner's bilinear weight to the corners of a sample in one plane (base:
// the plane's offset); corners of weight 0 (outside, or an integer sample's three others) are
// skipped.
template <bool kFixedPoint, typename acc_t>
__device__ __forceinline__ void scatter_corners(const GradInputTarget<acc_t>& t, double scale,
                                                int64_t base, const Sample<acc_t, int64_t>& smp,
                                                acc_t v) {
  const int64_t at = base + smp.y0 * t.sy + smp.x0 * t.sx;
  if (smp.w00 != acc_t(0)) scatter_add<kFixedPoint>(t, scale, at, v * smp.w00);
  if (smp.w01 != acc_t(0)) scatter_add<kFixedPoint>(t, scale, at + t.sx, v * smp.w01);
  if (smp.w10 != acc_t(0)) scatter_add<kFixedPoint>(t, scale, at + t.sy, v * smp.w10);
  if (smp.w11 != acc_t(0)) scatter_add<kFixedPoint>(t, scale, at + t.sy + t.sx, v * smp.w11);
}

// Grid: one block per 64-pixel tile and tap split. Loops over the split's taps and slices of
// <= kBK channels that stay inside one group and one offset group. grad_offset / grad_mask:
// contiguous, or nullptr.
// Two kernels: igemm_data_grad_atomic (fp32/fp64 atomics) and igemm_data_grad_fixed (integer
// atomics only: deterministic mode), so the compiler report can tell them apart.
template <typename scalar_t, bool kMma, typename Sampler, bool kFixedPoint>
__device__ __forceinline__ void data_grad_body(const scalar_t* __restrict__ x,
                                               const scalar_t* __restrict__ grad_out,
                                               const scalar_t* __restrict__ w_gkco,
                                               const Sampler& sampler, const EngineParams& e,
                                               const GradInputTarget<at::opmath_type<scalar_t>>& gi,
                                               scalar_t* __restrict__ grad_offset,
                                               scalar_t* __restrict__ grad_mask) {
#if CONVOPS_TENSOR_CORES || !defined(__CUDA_ARCH__)
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsA = kBK;  // dcols tile: 32 channels x 64 pixels
  using L = TileLayout<scalar_t, kRowsA>;
  CONVOPS_DYNAMIC_SHARED(unsigned char, smem);
  CONVOPS_SHARED_ARRAY(int, tap_flag, 1);
  CONVOPS_SHARED_ARRAY(acc_t, pair_sums, 3 * kBN);  // offset/mask sums of the channel half 1
  CONVOPS_SHARED_ARRAY(int64_t, go_offset, kBN);  // per pixel; -1: past the end
  scalar_t* As = reinterpret_cast<scalar_t*>(smem);
  scalar_t* Bs = reinterpret_cast<scalar_t*>(smem + L::a_bytes);
  acc_t* Ds = reinterpret_cast<acc_t*>(smem + L::ab_bytes);  // dcols (32 x ldc)
  scalar_t* Gs = reinterpret_cast<scalar_t*>(smem + L::ab_bytes + L::c_bytes_aligned);
  const int tid = threadIdx.x;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int bp = tid % kBN, bh = tid / kBN;
  const PixelPos pp = pixel_at(pixel_cursor(q0, e), bp, e);
  if (e.go_resident) {  // grad_out of the tile, once: coalesced along the layout's inner dim
    if (bh == 0) go_offset[bp] = pp.valid ? pp.n * e.o_sn + pp.oh * e.o_sy + pp.ow * e.o_sx : -1;
    __syncthreads();
    const int cols = e.go_cols32;  // int32: the tile fits in shared memory
    const bool by_channel = e.o_sc == 1;
    for (int i = tid; i < kBN * cols; i += kIgThreads) {
      const int p = by_channel ? i / cols : i % kBN, col = by_channel ? i % cols : i / kBN;
      const int grp = col / e.go_ocp32, oc = col - grp * e.go_ocp32;
      const int64_t at = go_offset[p];
      Gs[p * e.go_ld + col] = (at >= 0 && oc < e.OCg) ? grad_out[at + (grp * e.OCg + oc) * e.o_sc]
                                                      : static_cast<scalar_t>(0);
    }
    __syncthreads();
  }
  const Sampler s_img = sampler.image(pp.n);
  const scalar_t* x_img = x + pp.n * e.x_sn;
  const int64_t gi_img = (pp.n - e.n0) * gi.sn;
  const bool want_input = kFixedPoint ? gi.fixed != nullptr : gi.values != nullptr;
  // no scale exists when only the offset / mask gradients are wanted
  const double scale = kFixedPoint && want_input ? *gi.scale : 0.0;
  const bool offset_grads = !Sampler::kIntegerGrid && (grad_offset != nullptr || grad_mask != nullptr);
  const int ac = tid / 4, ak = (tid % 4) * 8;  // staging of A (W^T): channel row, 8 out-channels
  const int tap_begin = static_cast<int>(blockIdx.y) * static_cast<int>(e.per_split);
  const int tap_end = std::min(static_cast<int>(e.taps), tap_begin + static_cast<int>(e.per_split));
  for (int64_t tap = tap_begin, ky = tap_begin / e.kw32, kx = tap_begin - ky * e.kw32;
       tap < tap_end; ++tap, kx = kx + 1 == e.kw ? 0 : kx + 1, ky += kx == 0) {
    if (Sampler::kIntegerGrid &&
        !tap_reaches_image<Sampler, acc_t>(tap_flag, s_img, pp, ky, kx))
      continue;
    acc_t gy = 0, gx = 0, gm = 0;  // this thread's offset/mask sums for the current group
    int64_t grp = 0, grp_end = e.Cg, og = 0, og_end = e.cpo;  // no divisions in the loop
    for (int64_t c0 = 0; c0 < e.C;) {
      const int64_t c1 = std::min(std::min(c0 + kBK, grp_end), og_end);
      // dcols[c - c0][p] = sum over the group's out-channels of W[oc, c, tap] * grad_out[oc, p]
      BlockMath<scalar_t, kMma, kRowsA> math;
      math.zero();
      for (int64_t oc0 = 0; oc0 < e.OCg; oc0 += kBK) {
        const int64_t c = c0 + ac;
        const scalar_t* wrow = w_gkco + ((grp * e.taps + tap) * e.Cg + (c - grp * e.Cg)) * e.OCg;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int64_t oc = oc0 + ak + j;
          As[ac * L::ld + ak + j] = (c < c1 && oc < e.OCg) ? wrow[oc] : static_cast<scalar_t>(0);
        }
        if (!e.go_resident) {
#pragma unroll 4
          for (int j = 0; j < 16; ++j) {
            const int64_t oc = oc0 + bh * 16 + j;
            Bs[bp * L::ld + bh * 16 + j] =
                (pp.valid && oc < e.OCg)
                    ? grad_out[pp.n * e.o_sn + (grp * e.OCg + oc) * e.o_sc + pp.oh * e.o_sy +
                               pp.ow * e.o_sx]
                    : static_cast<scalar_t>(0);
          }
        }
        __syncthreads();
        if (e.go_resident) math.step(As, Gs + grp * e.go_ocp + oc0, static_cast<int>(e.go_ld));
        else math.step(As, Bs);
        __syncthreads();
      }
      math.store(Ds);
      __syncthreads();
      // Scatter this thread's pixel and channels, and sum its offset/mask terms.
      if (pp.valid) {
        acc_t m;
        const auto smp = s_img.sample_at(og, ky, kx, pp.oh, pp.ow, &m);
        for (int j = 0; j < kStageChannels; ++j) {
          const int64_t c = c0 + bh * kStageChannels + j;
          if (c >= c1) break;
          const acc_t d = Ds[(c - c0) * L::ldc + bp];
          if (want_input)
            scatter_corners<kFixedPoint>(gi, scale, gi_img + c * gi.sc, smp, d * m);
          if (offset_grads && smp.near)
            deform_sample_grad_term<acc_t, scalar_t, int64_t>(x_img + c * e.x_sc, e.x_sy, e.x_sx,
                                                              e.H, e.W, smp, d, &gy, &gx, &gm);
        }
      }
      const bool og_ends = c1 == og_end;
      if (offset_grads && og_ends) {  // fixed order: channel half 0, then half 1
        if (bh == 1) {
          pair_sums[bp] = gy;
          pair_sums[kBN + bp] = gx;
          pair_sums[2 * kBN + bp] = gm;
        }
        __syncthreads();
        if (bh == 0 && pp.valid) {
          acc_t m;
          s_img.sample_at(og, ky, kx, pp.oh, pp.ow, &m);
          gy += pair_sums[bp];
          gx += pair_sums[kBN + bp];
          gm += pair_sums[2 * kBN + bp];
          const int64_t row = og * e.taps + tap, pix = pp.oh * e.Wo + pp.ow;
          if (grad_offset != nullptr) {
            const int64_t base = pp.n * 2 * e.offset_groups * e.taps * e.HoWo;
            grad_offset[base + (2 * row) * e.HoWo + pix] = static_cast<scalar_t>(gy * m);
            grad_offset[base + (2 * row + 1) * e.HoWo + pix] = static_cast<scalar_t>(gx * m);
          }
          if (grad_mask != nullptr)
            grad_mask[pp.n * e.offset_groups * e.taps * e.HoWo + row * e.HoWo + pix] =
                static_cast<scalar_t>(gm);
        }
        gy = gx = gm = 0;
      }
      __syncthreads();  // Ds and pair_sums are rewritten by the next slice
      c0 = c1;
      if (c0 == grp_end) {
        ++grp;
        grp_end += e.Cg;
      }
      if (c0 == og_end) {
        ++og;
        og_end += e.cpo;
      }
    }
  }
#endif
}

#define CONVOPS_DATA_GRAD_KERNEL(name, fixed_point)                                             \
  template <typename scalar_t, bool kMma, typename Sampler>                                    \
  __global__ void __launch_bounds__(kIgThreads, 1)                                             \
  name(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_out,                  \
       const scalar_t* __restrict__ w_gkco, Sampler sampler, EngineParams e,                   \
       GradInputTarget<at::opmath_type<scalar_t>> gi, scalar_t* __restrict__ grad_offset,      \
       scalar_t* __restrict__ grad_mask) {                                                     \
    data_grad_body<scalar_t, kMma, Sampler, fixed_point>(x, grad_out, w_gkco, sampler, e, gi,  \
                                                         grad_offset, grad_mask);             \
  }
CONVOPS_DATA_GRAD_KERNEL(igemm_data_grad_atomic, false)
CONVOPS_DATA_GRAD_KERNEL(igemm_data_grad_fixed, true)
#undef CONVOPS_DATA_GRAD_KERNEL


// Depthwise layers (Cg == 1): dcols of channel c is sum over its multiplier's out-channels of
// W[oc, tap] * grad_out[oc], no GEMM. One thread per (image of the chunk, offset group, tap,
// pixel), pixels fastest (coalesced grad_out, grad_offset and grad_mask): it samples once,
// walks the offset group's channels in order, scatters each and sums the offset/mask terms.
// Grid: (pixel blocks, rows = image * offset group * tap, looped by gridDim.y); rows and
// Ho * Wo fit in 32 bits (checked on the host), so no 64-bit division runs.
template <typename scalar_t, typename Sampler, bool kFixedPoint>
__device__ __forceinline__ void data_grad_depthwise_pixel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ w, const Sampler& sampler, const EngineParams& e,
    const GradInputTarget<at::opmath_type<scalar_t>>& gi, scalar_t* __restrict__ grad_offset,
    scalar_t* __restrict__ grad_mask, int64_t n, int64_t og, int tap, int oh, int ow, int pix) {
  using acc_t = at::opmath_type<scalar_t>;
  const int ky = tap / e.kw32, kx = tap - ky * e.kw32;
  acc_t m;
  const auto smp = sampler.image(n).sample_at(og, ky, kx, oh, ow, &m);
  const bool want_input = kFixedPoint ? gi.fixed != nullptr : gi.values != nullptr;
  // no scale exists when only the offset / mask gradients are wanted
  const double scale = kFixedPoint && want_input ? *gi.scale : 0.0;
  const bool offset_grads = !Sampler::kIntegerGrid && (grad_offset != nullptr || grad_mask != nullptr);
  const scalar_t* go = grad_out + n * e.o_sn + oh * e.o_sy + ow * e.o_sx;
  acc_t gy = 0, gx = 0, gm = 0;
  for (int64_t c = og * e.cpo; c < (og + 1) * e.cpo; ++c) {
    acc_t d = 0;
    for (int64_t oc = c * e.OCg; oc < (c + 1) * e.OCg; ++oc)
      d += static_cast<acc_t>(w[oc * e.taps + tap]) * static_cast<acc_t>(go[oc * e.o_sc]);
    if (want_input)
      scatter_corners<kFixedPoint>(gi, scale, (n - e.n0) * gi.sn + c * gi.sc, smp, d * m);
    if (offset_grads && smp.near)
      deform_sample_grad_term<acc_t, scalar_t, int64_t>(x + n * e.x_sn + c * e.x_sc, e.x_sy,
                                                        e.x_sx, e.H, e.W, smp, d, &gy, &gx, &gm);
  }
  if (!offset_grads) return;
  const int64_t base = n * e.offset_groups * e.taps * e.HoWo, at = og * e.taps + tap;
  if (grad_offset != nullptr) {
    grad_offset[2 * base + (2 * at) * e.HoWo + pix] = static_cast<scalar_t>(gy * m);
    grad_offset[2 * base + (2 * at + 1) * e.HoWo + pix] = static_cast<scalar_t>(gx * m);
  }
  if (grad_mask != nullptr) grad_mask[base + at * e.HoWo + pix] = static_cast<scalar_t>(gm);
}

template <typename scalar_t, typename Sampler, bool kFixedPoint>
__device__ __forceinline__ void data_grad_depthwise_body(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ w, const Sampler& sampler, const EngineParams& e,
    const GradInputTarget<at::opmath_type<scalar_t>>& gi, scalar_t* __restrict__ grad_offset,
    scalar_t* __restrict__ grad_mask) {
  const int pix = static_cast<int>(blockIdx.x) * static_cast<int>(blockDim.x) + threadIdx.x;
  if (pix >= e.HoWo32) return;
  const int oh = pix / e.Wo32, ow = pix - oh * e.Wo32;
  const int taps = static_cast<int>(e.taps), og_taps = static_cast<int>(e.offset_groups) * taps;
  const int rows = static_cast<int>(e.n1 - e.n0) * og_taps;
  for (int row = blockIdx.y; row < rows; row += gridDim.y)
    data_grad_depthwise_pixel<scalar_t, Sampler, kFixedPoint>(
        x, grad_out, w, sampler, e, gi, grad_offset, grad_mask, e.n0 + row / og_taps,
        row % og_taps / taps, row % taps, oh, ow, pix);
}

#define CONVOPS_DATA_GRAD_DEPTHWISE_KERNEL(name, fixed_point)                                  \
  template <typename scalar_t, typename Sampler>                                               \
  __global__ void __launch_bounds__(256)                                                       \
  name(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_out,                  \
       const scalar_t* __restrict__ w, Sampler sampler, EngineParams e,                        \
       GradInputTarget<at::opmath_type<scalar_t>> gi, scalar_t* __restrict__ grad_offset,      \
       scalar_t* __restrict__ grad_mask) {                                                     \
    data_grad_depthwise_body<scalar_t, Sampler, fixed_point>(x, grad_out, w, sampler, e, gi,   \
                                                             grad_offset, grad_mask);         \
  }
CONVOPS_DATA_GRAD_DEPTHWISE_KERNEL(igemm_data_grad_depthwise_atomic, false)
CONVOPS_DATA_GRAD_DEPTHWISE_KERNEL(igemm_data_grad_depthwise_fixed, true)
#undef CONVOPS_DATA_GRAD_DEPTHWISE_KERNEL

// --- NCHW input transpose -------------------------------------------------------------------

// out (N, HW, C) = x (N, C, HW), contiguous both: 32 x 32 tiles through shared memory (padded
// against bank conflicts), so both the reads along HW and the writes along C are coalesced.
// Grid: (ceil(HW / 32), ceil(C / 32), N); block 32 x 8, each thread 4 rows.
template <typename scalar_t>
__global__ void __launch_bounds__(256)
nchw_to_nhwc(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t C, int64_t HW) {
  CONVOPS_SHARED_ARRAY(scalar_t, tile, 32 * 33);
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * 32, c0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int64_t image = static_cast<int64_t>(blockIdx.z) * C * HW;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int i = ty; i < 32; i += 8)
    if (c0 + i < C && p0 + tx < HW) tile[i * 33 + tx] = x[image + (c0 + i) * HW + p0 + tx];
  __syncthreads();
  for (int i = ty; i < 32; i += 8)
    if (p0 + i < HW && c0 + tx < C) out[image + (p0 + i) * C + c0 + tx] = tile[tx * 33 + i];
}

// --- host side ------------------------------------------------------------------------------

// The engine runs unless CONVOPS_CUDA_IMPL=plain or the GPU lacks bf16/TF32 tensor cores.
// It also needs channel counts below 2^31 and Ho * Wo below 2^30 (its 32-bit divisions).
inline bool implicit_gemm_enabled(const DeformGeometry& g) {
  return !env_is("CONVOPS_CUDA_IMPL", "plain") && device_has_tensor_cores() &&
         g.C < INT32_MAX && g.OC < INT32_MAX && g.Ho * g.Wo < (int64_t(1) << 30);
}

// Elements of the input-gradient accumulation buffer; CONVOPS_CUDA_ACCUM_BUDGET lowers it so
// tests run the image chunks.
inline int64_t accum_budget() {
  const char* v = std::getenv("CONVOPS_CUDA_ACCUM_BUDGET");
  const int64_t forced = v != nullptr ? std::atoll(v) : 0;
  return forced > 0 ? std::min(forced, kAccumBudget) : kAccumBudget;
}

// fp16/bf16 always on tensor cores; fp32 as F.conv2d decides (cudnn.allow_tf32); fp64 never.
template <typename scalar_t>
bool uses_tensor_cores() {
  if (std::is_same<scalar_t, double>::value) return false;
  if (std::is_same<scalar_t, float>::value) return at::globalContext().allowTF32CuDNN();
  return true;
}

// Calls f(std::integral_constant<bool, kMma>) with the math this dtype uses.
template <typename scalar_t, typename F>
void with_math(const F& f) {
  if constexpr (std::is_same<scalar_t, double>::value) {
    f(std::false_type());
  } else if constexpr (std::is_same<scalar_t, float>::value) {
    if (uses_tensor_cores<float>()) f(std::true_type());
    else f(std::false_type());
  } else {
    f(std::true_type());
  }
}

inline EngineParams engine_params(const DeformGeometry& g, const at::Tensor& x,
                                  const at::Tensor& o) {
  EngineParams e;
  e.N = g.N; e.C = g.C; e.H = g.H; e.W = g.W; e.OC = g.OC; e.taps = g.taps(); e.kw = g.kw;
  e.Cg = g.channels_per_group(); e.OCg = g.out_channels_per_group(); e.groups = g.groups;
  e.cpo = g.channels_per_offset_group(); e.offset_groups = g.offset_groups;
  e.Ho = g.Ho; e.Wo = g.Wo; e.HoWo = g.Ho * g.Wo;
  e.cpo32 = static_cast<int>(e.cpo); e.Wo32 = static_cast<int>(e.Wo);
  e.HoWo32 = static_cast<int>(e.HoWo);
  e.howo_inv = e.HoWo > 0 ? UINT64_MAX / static_cast<uint64_t>(e.HoWo) : 0;
  e.Cg32 = static_cast<int>(e.Cg); e.kw32 = static_cast<int>(e.kw);
  e.groups32 = static_cast<int>(e.groups);
  e.slices = e.per_split = 0;
  e.n0 = 0; e.n1 = g.N;
  e.x_sn = x.stride(0); e.x_sc = x.stride(1); e.x_sy = x.stride(2); e.x_sx = x.stride(3);
  e.o_sn = o.stride(0); e.o_sc = o.stride(1); e.o_sy = o.stride(2); e.o_sx = o.stride(3);
  e.out_channels_last = o.stride(1) == 1 && g.OC > 1;
  // Every 16-channel run the engine stages starts at a group start plus a multiple of 16.
  const int64_t elem = x.element_size();
  e.vec_channels = x.stride(1) == 1 && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                   (x.stride(0) * elem) % 16 == 0 && (x.stride(2) * elem) % 16 == 0 &&
                   (x.stride(3) * elem) % 16 == 0 && (e.Cg * elem) % 16 == 0;
  e.splits = 1;
  e.go_resident = false;
  e.go_ocp = e.go_ld = 0;
  e.go_ocp32 = e.go_cols32 = 0;
  return e;
}

// Small maps and batch 1 give fewer output tiles than the GPU has room for: the forward and
// the input gradient then also split the taps over blocks (the forward adds the splits in a
// fixed order; the input gradient's scatter adds them anyway). Splits depend on the shapes
// only; CONVOPS_CUDA_TAP_SPLITS forces a count (1: never split), for the tests.
inline void set_tap_splits(EngineParams& e, int64_t tiles, int64_t grid_z) {
  int64_t wanted = blocks_for(kTapSplitTargetBlocks, std::max<int64_t>(tiles, 1));
  const char* v = std::getenv("CONVOPS_CUDA_TAP_SPLITS");
  if (v != nullptr && std::atoll(v) > 0) wanted = std::atoll(v);
  const int64_t splits = std::max<int64_t>(1, std::min({wanted, e.taps, kMaxGridYZ / grid_z}));
  e.per_split = blocks_for(e.taps, splits);
  e.splits = blocks_for(e.taps, e.per_split);
}

inline Dim3 checked_grid(const char* name, int64_t x, int64_t y, int64_t z);

// The tensor the engine gathers from. A contiguous NCHW input of a grouped layer (Cg > 1) is
// first transposed to channels_last when the copy fits the accumulation budget: one pass
// (reading and writing the input once, counted by the model) buys 16-byte channel packs for the
// four corner reads of every sample. Otherwise, and for channel counts that break the 16-byte
// packs, the kernels gather plane by plane, coalesced along W across the tile's adjacent
// pixels; extra memory stays bounded by the budget whatever the batch.
// CONVOPS_CUDA_NCHW_TRANSPOSE=0 turns the transpose off (tests of the plane gathers).
template <typename scalar_t>
at::Tensor gather_source(const at::Tensor& x, const DeformGeometry& g) {
  const int64_t cg = g.channels_per_group();
  if (cg == 1 || !x.is_contiguous() || x.numel() == 0 ||
      (cg * static_cast<int64_t>(sizeof(scalar_t))) % 16 != 0 || x.numel() > accum_budget() ||
      x.size(0) > kMaxGridYZ || blocks_for(x.size(1), 32) > kMaxGridYZ ||
      env_is("CONVOPS_CUDA_NCHW_TRANSPOSE", "0"))
    return x;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  const int64_t HW = x.size(2) * x.size(3);
  launch_kernel("nchw_to_nhwc", nchw_to_nhwc<scalar_t>,
                {checked_grid("nchw_to_nhwc", blocks_for(HW, 32), blocks_for(x.size(1), 32),
                              x.size(0)),
                 Dim3(32, 8), 0, 256},
                x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.size(1), HW);
  return out;
}

inline Dim3 checked_grid(const char* name, int64_t x, int64_t y, int64_t z) {
  TORCH_CHECK(x <= kMaxGridX && y <= kMaxGridYZ && z <= kMaxGridYZ, "convops: ", name,
              ": the problem needs a grid of (", x, ", ", y, ", ", z,
              ") blocks, beyond the device limits");
  return Dim3(x, y, z);
}

template <typename scalar_t, typename Sampler>
void igemm_forward_run(const at::Tensor& source, const at::Tensor& weight,
                       const at::Tensor& bias, const DeformGeometry& g, const Sampler& sampler,
                       at::Tensor& out) {
  const at::Tensor input = gather_source<scalar_t>(source, g);
  EngineParams e = engine_params(g, input, out);
  const at::Tensor bias_c = bias.defined() ? bias.contiguous() : bias;  // kernels index bias[oc]
  if (e.Cg == 1) {  // depthwise: the direct kernel
    const at::Tensor w = weight.contiguous();
    const int64_t total = g.N * g.OC * e.HoWo;
    launch_kernel("igemm_forward_depthwise", igemm_forward_depthwise<scalar_t, Sampler>,
                  {checked_grid("igemm_forward_depthwise", blocks_for(total, 256), 1, 1),
                   Dim3(256), 0, 256},
                  input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                  bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
                  out.mutable_data_ptr<scalar_t>(), sampler, e);
    return;
  }
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor w_okc = weight.permute({0, 2, 3, 1}).contiguous();  // (OC, kh, kw, Cg)
  const int64_t pixels = g.N * e.HoWo, tiles_x = blocks_for(pixels, kBN);
  const int64_t tiles_y = blocks_for(e.OCg, kBM);
  set_tap_splits(e, tiles_x * tiles_y * g.groups, g.groups);
  at::Tensor partial;  // tap splits: (splits, OC * pixels) in the output's order, O(tiles)
  if (e.splits > 1)
    partial = at::empty({e.splits, g.OC * pixels},
                        input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const Dim3 grid = checked_grid("igemm_forward", tiles_x, tiles_y, g.groups * e.splits);
  const scalar_t* bias_ptr = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
  with_math<scalar_t>([&](auto mma) {
    constexpr bool kMma = decltype(mma)::value;
    launch_kernel("igemm_forward", igemm_forward<scalar_t, kMma, Sampler>,
                  {grid, Dim3(kIgThreads), TileLayout<scalar_t, kBM>::bytes, kIgThreads},
                  input.const_data_ptr<scalar_t>(), w_okc.const_data_ptr<scalar_t>(), bias_ptr,
                  out.mutable_data_ptr<scalar_t>(),
                  partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr, sampler, e);
  });
  if (e.splits > 1)
    launch_kernel("igemm_forward_reduce", igemm_forward_reduce<scalar_t>,
                  {checked_grid("igemm_forward_reduce", blocks_for(g.OC * pixels, 256), 1, 1),
                   Dim3(256), 0, 256},
                  partial.const_data_ptr<acc_t>(), bias_ptr, out.mutable_data_ptr<scalar_t>(), e);
}

// The dilated input gradient (groups < C) as the forward engine over grad_output: the
// transposed problem (channels C <-> OC, map H x W <-> Ho x Wo) with the flipped-tap sampler
// (common/dilated.h) and the weight as (C, OC / groups, kh, kw). A gather on tensor cores: no
// atomics (deterministic in both modes) and no fp32 accumulation buffer. Returns false when
// the transposed problem is beyond the engine's 32-bit limits (the caller scatters instead).
template <typename scalar_t>
bool igemm_dilated_input_grad_run(const at::Tensor& grad_output, const at::Tensor& weight,
                                  const DeformGeometry& g, at::Tensor& grad_input) {
  if (grad_input.numel() == 0) return true;  // an empty input map: nothing to write
  DeformGeometry t = g;
  t.C = g.OC; t.OC = g.C; t.H = g.Ho; t.W = g.Wo; t.Ho = g.H; t.Wo = g.W;
  // The flipped-tap sampler computes positions in int (in_pos + pad - tap * dilation).
  const auto fits_int = [](int64_t v) { return v <= INT32_MAX; };
  if (!implicit_gemm_enabled(t) || !fits_int(g.sh) || !fits_int(g.sw) ||
      !fits_int(g.H + g.ph) || !fits_int(g.W + g.pw) ||
      !fits_int((g.kh - 1) * g.dh + g.ph) || !fits_int((g.kw - 1) * g.dw + g.pw))
    return false;
  const int64_t ocg = g.out_channels_per_group(), cg = g.channels_per_group();
  const at::Tensor w_t = weight.reshape({g.groups, ocg, cg, g.kh, g.kw})
                             .transpose(1, 2)
                             .reshape({g.C, ocg, g.kh, g.kw});
  using acc_t = at::opmath_type<scalar_t>;
  igemm_forward_run<scalar_t>(grad_output, w_t, at::Tensor(), t,
                              grid_transpose_sampler<acc_t, scalar_t>(g), grad_input);
  return true;
}

// grad_weight (OC, Cg, kh, kw), contiguous, overwritten.
template <typename scalar_t, typename Sampler>
void igemm_weight_grad_run(const at::Tensor& grad_output, const at::Tensor& source,
                           const DeformGeometry& g, const Sampler& sampler,
                           at::Tensor& grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor input = gather_source<scalar_t>(source, g);
  EngineParams e = engine_params(g, input, grad_output);
  if (e.Cg == 1) {  // depthwise: the direct kernel, split over pixel ranges of 256 or more
    const int64_t pixels = g.N * e.HoWo;
    e.splits = std::max<int64_t>(1, std::min({blocks_for(kWgTargetBlocks, g.OC), kMaxWgSplits,
                                              blocks_for(pixels, 256)}));
    e.per_split = blocks_for(pixels, e.splits);
    const at::Tensor partial = at::empty(
        {e.splits, g.OC, g.taps()}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    launch_kernel("igemm_weight_grad_depthwise", igemm_weight_grad_depthwise<scalar_t, Sampler>,
                  {checked_grid("igemm_weight_grad_depthwise", g.OC, e.splits, 1), Dim3(256), 0,
                   256},
                  input.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                  partial.mutable_data_ptr<acc_t>(), sampler, e);
    launch_kernel("igemm_weight_grad_reduce", igemm_weight_grad_reduce<scalar_t>,
                  {checked_grid("igemm_weight_grad_reduce", blocks_for(g.OC * g.taps(), 256), 1, 1),
                   Dim3(256), 0, 256},
                  partial.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
                  g.OC, int64_t(1), g.taps(), e.splits);
    return;
  }
  const int64_t tiles_x = g.taps() * blocks_for(e.Cg, kBN), tiles_y = blocks_for(e.OCg, kBM);
  const int64_t slices = blocks_for(g.N * e.HoWo, kBK);
  // Splits depend on the shapes only, so the summation order is the same on every run.
  const int64_t wanted = blocks_for(kWgTargetBlocks, tiles_x * tiles_y * g.groups);
  e.splits = std::max<int64_t>(
      1, std::min({wanted, kMaxWgSplits, slices, kMaxGridYZ / g.groups}));
  e.slices = slices;
  e.per_split = blocks_for(slices, e.splits);
  const at::Tensor partial =
      at::empty({e.splits, g.OC, g.taps() * e.Cg},
                input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const Dim3 grid = checked_grid("igemm_weight_grad", tiles_x, tiles_y, g.groups * e.splits);
  with_math<scalar_t>([&](auto mma) {
    constexpr bool kMma = decltype(mma)::value;
    launch_kernel("igemm_weight_grad", igemm_weight_grad<scalar_t, kMma, Sampler>,
                  {grid, Dim3(kIgThreads), TileLayout<scalar_t, kBM>::bytes, kIgThreads},
                  input.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                  partial.mutable_data_ptr<acc_t>(), sampler, e);
  });
  const int64_t total = g.OC * e.Cg * g.taps();
  launch_kernel("igemm_weight_grad_reduce", igemm_weight_grad_reduce<scalar_t>,
                {checked_grid("igemm_weight_grad_reduce", blocks_for(total, 256), 1, 1),
                 Dim3(256), 0, 256},
                partial.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
                g.OC, e.Cg, g.taps(), e.splits);
}

// Fixed-point units per 1.0 for the deterministic input-gradient scatter, as a device scalar:
// 2^(62 - ceil(log2 B)) with B a bound on |grad_input| (file header).
inline at::Tensor fixed_point_scale(const at::Tensor& grad_output, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& mask,
                                    const DeformGeometry& g) {
  at::Tensor bound = grad_output.abs().amax().to(at::kDouble)
                         .mul(weight.abs().to(at::kDouble).sum(0).amax())
                         .mul(static_cast<double>(g.taps() * g.Ho * g.Wo));
  if (mask.has_value() && mask->defined() && mask->numel() > 0)
    bound = bound.mul(mask->abs().amax().to(at::kDouble));
  return at::exp2(at::ceil(at::log2(bound.clamp_min(std::ldexp(1.0, -900)))).neg().add(62.0));
}

// grad_input (input's layout; undefined when not wanted), grad_offset and grad_mask
// (contiguous; undefined when not wanted).
template <typename scalar_t, typename Sampler>
void igemm_data_grad_run(const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                         const DeformGeometry& g, const Sampler& sampler, at::Tensor grad_input,
                         at::Tensor grad_offset, at::Tensor grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const bool want_input = grad_input.defined() && grad_input.numel() > 0;
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const bool direct = want_input && !deterministic && std::is_same<scalar_t, acc_t>::value;
  const bool depthwise = g.channels_per_group() == 1;
  // (G, taps, Cg, OCg) for the GEMM kernels; depthwise: (OC, taps)
  const at::Tensor w_gkco = depthwise ? at::Tensor()
                                      : weight.reshape({g.groups, g.out_channels_per_group(),
                                                        g.channels_per_group(), g.taps()})
                                            .permute({0, 3, 2, 1}).contiguous();
  const at::Tensor w_depthwise = depthwise ? weight.reshape({g.OC, g.taps()}).contiguous()
                                           : at::Tensor();
  EngineParams e = engine_params(g, input, grad_output);
  using Layout = TileLayout<scalar_t, kBK>;
  int64_t smem = Layout::ab_bytes + Layout::c_bytes;
  e.go_ocp = (e.OCg + kBK - 1) / kBK * kBK;
  e.go_ld = g.groups * e.go_ocp + Layout::kPad;
  e.go_ocp32 = static_cast<int>(e.go_ocp);
  e.go_cols32 = static_cast<int>(std::min<int64_t>(g.groups * e.go_ocp, INT32_MAX / kBN));
  const int64_t resident_smem = Layout::ab_bytes + Layout::c_bytes_aligned +
                                int64_t(kBN) * e.go_ld * static_cast<int64_t>(sizeof(scalar_t));
  // Static shared memory (flags, pair sums, offsets) takes about 2 KiB of the block's limit.
  e.go_resident = resident_smem + 4096 <= kOptInSharedLimit &&
                  !env_is("CONVOPS_CUDA_RESIDENT_GRAD_OUT", "0");
  if (e.go_resident) smem = resident_smem;
  at::Tensor scale;
  if (want_input && deterministic) scale = fixed_point_scale(grad_output, weight, mask, g);
  // The accumulation buffer (fp32 or fixed point) covers at most kAccumBudget elements.
  const int64_t image_elems = g.C * g.H * g.W;
  const int64_t chunk = (want_input && !direct)
                            ? std::max<int64_t>(1, std::min(g.N, accum_budget() / image_elems))
                            : g.N;
  at::Tensor buffer;
  if (want_input && !direct) {
    buffer = at::empty({chunk, g.C, g.H, g.W},
                       input.options().dtype(deterministic ? at::kLong : acc_type),
                       layout_of(prefers_channels_last(input)));
  }
  if (direct) grad_input.zero_();
  for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
    e.n0 = n0;
    e.n1 = std::min(g.N, n0 + chunk);
    GradInputTarget<acc_t> gi{nullptr, nullptr, nullptr, 0, 0, 0, 0};
    const at::Tensor& target = direct ? grad_input : buffer;
    if (want_input) {
      target.zero_();
      gi.sn = target.stride(0); gi.sc = target.stride(1);
      gi.sy = target.stride(2); gi.sx = target.stride(3);
      if (deterministic) {
        gi.fixed = reinterpret_cast<unsigned long long*>(target.mutable_data_ptr<int64_t>());
        gi.scale = scale.const_data_ptr<double>();
      } else {
        gi.values = target.mutable_data_ptr<acc_t>();
      }
    }
    scalar_t* go_ptr = grad_offset.defined() ? grad_offset.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gm_ptr = grad_mask.defined() ? grad_mask.mutable_data_ptr<scalar_t>() : nullptr;
    if (e.Cg == 1) {  // depthwise: the direct kernels
      const int64_t rows = (e.n1 - e.n0) * g.offset_groups * g.taps();
      TORCH_CHECK(rows <= INT32_MAX - kMaxGridYZ, "convops: the depthwise input gradient: batch * "
                  "offset groups * taps = ", rows, " needs 32-bit indexing");
      const LaunchConfig config{
          checked_grid("igemm_data_grad_depthwise", blocks_for(e.HoWo, 256),
                       std::min(rows, kMaxGridYZ), 1),
          Dim3(256), 0, 256};
      if (deterministic)
        launch_kernel("igemm_data_grad_depthwise_fixed",
                      igemm_data_grad_depthwise_fixed<scalar_t, Sampler>, config,
                      input.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                      w_depthwise.const_data_ptr<scalar_t>(), sampler, e, gi, go_ptr, gm_ptr);
      else
        launch_kernel("igemm_data_grad_depthwise_atomic",
                      igemm_data_grad_depthwise_atomic<scalar_t, Sampler>, config,
                      input.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                      w_depthwise.const_data_ptr<scalar_t>(), sampler, e, gi, go_ptr, gm_ptr);
    } else {
      const int64_t tiles = blocks_for((e.n1 - e.n0) * e.HoWo, kBN);
      set_tap_splits(e, tiles, 1);
      const Dim3 grid = checked_grid("igemm_data_grad", tiles, e.splits, 1);
      with_math<scalar_t>([&](auto mma) {
        constexpr bool kMma = decltype(mma)::value;
        const LaunchConfig config{grid, Dim3(kIgThreads), smem, kIgThreads};
        const int64_t allowance = smem;  // static + dynamic may then pass 48 KiB
        if (deterministic) {
          allow_dynamic_shared(igemm_data_grad_fixed<scalar_t, kMma, Sampler>, allowance);
          launch_kernel("igemm_data_grad_fixed", igemm_data_grad_fixed<scalar_t, kMma, Sampler>,
                        config, input.const_data_ptr<scalar_t>(),
                        grad_output.const_data_ptr<scalar_t>(), w_gkco.const_data_ptr<scalar_t>(),
                        sampler, e, gi, go_ptr, gm_ptr);
        } else {
          allow_dynamic_shared(igemm_data_grad_atomic<scalar_t, kMma, Sampler>, allowance);
          launch_kernel("igemm_data_grad_atomic", igemm_data_grad_atomic<scalar_t, kMma, Sampler>,
                        config, input.const_data_ptr<scalar_t>(),
                        grad_output.const_data_ptr<scalar_t>(), w_gkco.const_data_ptr<scalar_t>(),
                        sampler, e, gi, go_ptr, gm_ptr);
        }
      });
    }
    if (want_input && !direct) {
      const at::Tensor part = buffer.narrow(0, 0, e.n1 - e.n0);
      at::Tensor dst = grad_input.narrow(0, e.n0, e.n1 - e.n0);
      if (deterministic) {  // non-finite inputs make the scale 0 or NaN: the result is NaN
        dst.copy_(at::where(scale.gt(0), part.to(at::kDouble).div(scale),
                            at::full({}, std::nan(""), scale.options())));
      } else {
        dst.copy_(part);
      }
    }
  }
}

}  // namespace cuda
}  // namespace convops
