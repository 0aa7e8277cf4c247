// The depthwise forward for float32 and bfloat16 on CPU, both layouts, without a padded copy.
//
// NHWC (multiplier 1): channels fill the vector lanes (16 floats with AVX-512, 8 with AVX2, 4
// baseline). One task per output row; per channel vector the kernel walks the row in register
// blocks of output pixels whose accumulators stay in registers over all kh*kw taps. At stride 1
// with 3-, 5- or 7-wide filters the blocks slide: each input column of a block's window is loaded
// once and feeds every (pixel, tap) pair that reads it, dilated rows in blocks of one phase, and
// border blocks skip the columns outside the image. Other filters apply each tap's weight vector
// to a block of pixels, only to the pixels in its valid output range [lo[kx], hi[kx]) at the
// borders. Rows outside the image are skipped. Input rows are read in place: no padded copies.
// bf16 is loaded and widened in registers, accumulated in float32 and rounded (to nearest even,
// as c10) straight into the output. In place, 3x3 stride-1 rows and strided rows of filters up
// to 7 wide take two channel vectors per register block (dw_rows_in_pairs), so each pixel's
// channels are read and written as whole cache lines; with AVX-512, bf16 pairs hold even
// channels in one vector and odd ones in the other (cheaper to widen and round; the weights are
// packed to match). Large float32 layers (input + output over a third of the last-level cache)
// store their output rows with non-temporal stores: no read for ownership of lines that would
// not stay in cache anyway (the rule and its measurements: cpu/depthwise_conv2d.cpp). Where a
// float32 block's input columns would lie a multiple of 4 KB apart (256 channels at dilation 4)
// in a layer that stays in cache, the rows are first staged at a padded pixel pitch
// (dw_stage_pitch).
//
// NHWC row ring (bf16, and stride-1 filters spanning many rows; the rule and its measurements are
// in cpu/depthwise_conv2d.cpp): each input row a thread needs is copied once (per dilation
// phase) into a per-thread ring of kh rows laid out [channel block][W][kLanes] floats, and each
// channel block's row kernel runs on its own contiguous sub-rows. Bytes: one extra write and read
// of 4*W*C per input row, to a ring of at most kDwRingBudgetBytes (about L2-sized for the suite's
// layers: 192 KB at d4-256@64, 0.9 MB at 31x31), against kh*kw strided reads of every input
// vector in place (at a 4 KB stride, L1-set aliasing, for d4 with 256 channels); for bf16 it
// also widens each input once instead of once per tap.
//
// NCHW (any multiplier): to fill lanes on small maps (14x14, 7x7) the same kernel runs over a
// block of kLanes output channels. Each task transposes the rows of its kLanes input planes
// into a ring of (kh-1)*dh+1 rows of [W][kLanes] floats (4*kLanes bytes per input pixel of the
// block, written once per row and strip and read from L1/L2 by every tap; an input row is
// re-transposed only for the halo of the next strip) and transposes each output row back
// ([Wo][kLanes] floats, L1). Maps whose rows fit one vector (AVX-512: at most 16 wide) under
// filters up to 3 wide skip the transposes: one plane per task, each output row in the lanes of
// one vector, each tap column a lane permute of the input row (dw_nchw_narrow). The only memory
// the forward keeps is per-thread scratch: the ring, the output row, and the weights packed per
// channel block as [block][tap][kLanes] floats.
//
// Every output element is summed in one fixed order (taps in row-major order) whatever the
// thread count: deterministic. The ISA is chosen at run time (AVX-512, AVX2+FMA, SSE2);
// CONVOPS_CPU_ISA=avx512|avx2|baseline forces one (a missing ISA falls back to the next).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/conv_geometry.h"
#include "common/tensor_utils.h"
#include "cpu/scratch.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CONVOPS_DW_FORWARD_X86 1
#include <immintrin.h>
#endif

namespace convops {
namespace cpu {

constexpr int64_t kDwMaxK = 64;  // larger kernels take the generic path
constexpr int kDwRingSlot = 4, kDwRowSlot = 5, kDwWeightSlot = 6, kDwBiasSlot = 7;
constexpr int64_t kDwRingBudgetBytes = int64_t(4) << 20;  // per-thread NHWC row ring, at most

struct DwForwardJob {
  const void* x;
  void* y;
  const float* w;     // [channel block][tap][lanes], zero past OC
  const float* bias;  // [blocks * lanes] or null
  int64_t N, C, H, W, OC, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, multiplier;
  int64_t strips, strip_rows;  // NCHW: output rows split into strips of strip_rows
  int64_t lo[kDwMaxK], hi[kDwMaxK];  // per kx: output columns whose input column is inside
  int64_t inner_lo, inner_hi;        // columns where every tap is inside
  int64_t stage_pitch;               // NHWC in place: staged rows' pixel pitch, or 0 (in place)
};

using DwTaskFn = void (*)(const DwForwardJob&, int64_t, int64_t);

// The output columns [lo, hi) where every tap reads inside the row, clamped to [0, Wo).
struct DwInterior {
  int64_t lo, hi;
};
inline DwInterior dw_interior(const DwForwardJob& j) {
  const int64_t lo = std::clamp<int64_t>(j.inner_lo, 0, j.Wo);
  return {lo, std::clamp(j.inner_hi, lo, j.Wo)};
}

// The slot of input row ih in a per-thread ring of kh rows (nhwc_ring_rows, and staged
// nhwc_rows): distinct for the kh taps of one output row, whose rows are dh apart.
inline int64_t dw_ring_slot(const DwForwardJob& j, int64_t ih) { return (ih / j.dh) % j.kh; }

// The indices q in [0, count) whose input column start + q * step lies inside the row: a
// border pixel's valid taps (step = dilation) and a wide block's window columns inside the image.
inline OutputRange<int64_t> dw_columns_inside(const DwForwardJob& j, int64_t start, int64_t step,
                                              int64_t count) {
  return valid_output_range<int64_t>(0, j.W, count, step, -start, 0);  // o * step + start
}

// Whether the NHWC in-place rows take two channel vectors at a time (at least two full ones):
// 3x3 stride-1 rows at least slide_w * dw wide (or 7 wide), and strided rows of filters up to 7 wide whose
// interior holds a block of block_w pixels.
inline bool dw_rows_in_pairs(const DwForwardJob& j, int lanes, int slide_w, int block_w) {
  if (j.C / lanes < 2) return false;
  if (j.sw == 1)  // 7-wide rows too where blocks of 7 slide (slide_w 8: AVX-512)
    return j.kw == 3 && (j.Wo >= slide_w * j.dw || (j.dw == 1 && j.Wo == 7 && slide_w == 8));
  const DwInterior in = dw_interior(j);
  return j.kw <= 7 && in.hi - in.lo >= block_w;
}

// Whether 7-wide stride-1 rows (7x7 maps) run as one sliding block of 7 pixels per channel
// vector (cpu/depthwise_forward_kernels.h): 7 accumulator chains instead of one pixel at a time.
inline bool dw_seven_wide(const DwForwardJob& j) {
  return j.sw == 1 && j.dw == 1 && j.Wo == 7 && (j.kw == 3 || j.kw == 5 || j.kw == 7);
}

// Whether NHWC rows run in wide sliding blocks (cpu/depthwise_forward_kernels.h): stride 1,
// filters at least kDwWideBlock wide, rows holding a run of kDwWideBlock pixels per dilation phase.
constexpr int kDwWideBlock = 8;
inline bool dw_wide_sliding(const DwForwardJob& j) {
  return j.sw == 1 && j.kw >= kDwWideBlock && j.Wo >= kDwWideBlock * j.dw;
}

// Whether those rows run in blocks of 7 pixels instead of kDwWideBlock: undilated rows that 7
// divides and 8 does not (14, 21, 28, 35, ... wide), with 16 lanes (AVX-512: 7 chains cover its one
// 512-bit FMA pipe's latency; AVX2's two pipes need 8). Blocks of 8 computed 16 pixels for 14.
inline bool dw_wide_sevens(const DwForwardJob& j, int lanes) {
  return lanes >= 16 && dw_wide_sliding(j) && j.dw == 1 && j.Wo % 7 == 0 &&
         j.Wo % kDwWideBlock != 0;
}

// NHWC in place: the pixel pitch (elements) of the staged input rows, or 0 to read the rows in
// place (cpu/depthwise_forward_kernels.h, nhwc_rows). Staged: float32 layers that stay in
// cache (in_cache: input + output within a third of the last-level cache, as for streamed
// stores) whose register blocks read input columns a multiple of 4 KB apart; a stride-1 block's
// columns are dw pixels apart (one dilation phase), other blocks' columns are neighbours. There
// each block's 3 * kh columns fall in the same L1 sets: float32 d4-256@64 at batch 1 ran in
// 0.226 ms where 240 channels took 0.121 (2 threads, kernel lab). The staged rows sit C + 64
// bytes apart per pixel; each input row is copied once per phase (one extra read and write of
// the input: 0.046 ms of 240 channels' 0.121 when forced). In-process A/B on the 2-core Zen 4
// VM, 2 threads, batch 1, in place -> staged, ms: d4-256@64 0.33-0.34 -> 0.29-0.31 (lab 0.221 ->
// 0.186), d2-512@32 0.158-0.180 -> 0.144-0.171; d8-128@64 ties (0.12); d1-1024@16 ran 0.115 ->
// 0.082 and 0.099 -> 0.110. Left in place: bf16 (4 KB steps from 512 channels: d4-512@32
// 0.098-0.113 -> 0.108-0.125, d2-1024@16 0.081-0.085 -> 0.090-0.094, 2048@12 ties), steps of 1
// or 2 KB (float32 d2-256@64 0.23 -> 0.33, d1-256@64 0.160 -> 0.204, s2-512@28 0.086 -> 0.106),
// and layers past the cache, which wait on memory and streamed stores (d4-256@64 N4 1.10-1.29
// -> 1.25-1.66 ms at 2 threads, N2 0.57 -> 0.60). Not above the ring's budget per thread.
// CONVOPS_CPU_NHWC_STAGE=1|0 forces staging on or off.
constexpr int64_t kDwStagePadBytes = 64;
inline int64_t dw_stage_pitch(const DwForwardJob& j, int64_t elem_bytes, bool in_cache) {
  const int64_t pitch = j.C + kDwStagePadBytes / elem_bytes;
  if (env_is("CONVOPS_CPU_NHWC_STAGE", "1")) return pitch;
  if (env_is("CONVOPS_CPU_NHWC_STAGE", "0") || elem_bytes != 4 || !in_cache) return 0;
  const int64_t column_step = j.C * elem_bytes * (j.sw == 1 ? j.dw : 1);
  const bool fits = j.kh * j.W * pitch * elem_bytes <= kDwRingBudgetBytes;
  return column_step % 4096 == 0 && fits ? pitch : 0;
}

template <typename T>
using DwPackFn = void (*)(const T* const* planes, int nch, int64_t taps, float* dst);

struct DwForwardIsa {
  const char* name;
  int lanes, pair_slide_w, pair_block_w;
  // one channel block's weights, [tap][lanes] floats from nch weight planes of taps each
  DwPackFn<float> pack_f32;
  DwPackFn<c10::BFloat16> pack_bf16;
  DwTaskFn nhwc_f32, nhwc_bf16, nhwc_ring_f32, nhwc_ring_bf16, nchw_f32, nchw_bf16;
  // NHWC bf16 in place whose channel pairs hold even channels in the first vector and odd ones
  // in the second (weights packed to match in cpu/depthwise_conv2d.cpp), or null: see the AVX-512 build
  DwTaskFn nhwc_bf16_even_odd;
  // NHWC float32 in place with non-temporal output stores (full vectors aligned to lanes * 4)
  DwTaskFn nhwc_f32_streamed;
  // NCHW maps whose input and output rows fit one vector (dw_nchw_narrow), one plane per task,
  // or null (ISAs without lane permutes and masks: AVX-512 only)
  DwTaskFn nchw_narrow_f32, nchw_narrow_bf16;
};

// Whether NCHW runs on the narrow-map planes (cpu/depthwise_forward_kernels.h): input and output
// rows at most `lanes` wide, filters up to 3 wide. (7x7 at 14 wide ran 0.33 -> 0.49 ms there:
// 14 of 16 lanes, a permute per input row and tap column, and its 49 weights did not fit in
// registers.)
inline bool dw_nchw_narrow(const DwForwardJob& j, int lanes) {
  return j.W <= lanes && j.Wo <= lanes && j.kw <= 3;
}

#ifdef CONVOPS_DW_FORWARD_X86

// One build of cpu/depthwise_forward_kernels.h per ISA, each in its own translation unit
// (depthwise_forward_{avx512,avx2,baseline}.cpp): they are the slowest files of the build to
// compile, and apart they compile in parallel.
#ifndef CONVOPS_DW_FORWARD_NO_AVX512  // defined by sanitized builds on machines without it
namespace dw_avx512 { extern const DwForwardIsa kIsa; }
#endif
namespace dw_avx2 { extern const DwForwardIsa kIsa; }
#ifndef CONVOPS_DW_FORWARD_NO_BASELINE  // defined by sanitized builds on machines with AVX2
namespace dw_sse2 { extern const DwForwardIsa kIsa; }
#endif

// The build this CPU runs: the widest it has, unless CONVOPS_CPU_ISA asks for a narrower one.
inline const DwForwardIsa* depthwise_forward_isa() {
  [[maybe_unused]] static const bool has_avx512 =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                               __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  [[maybe_unused]] const bool want_avx2 = env_is("CONVOPS_CPU_ISA", "avx2");
  const bool want_base = env_is("CONVOPS_CPU_ISA", "baseline");
#ifndef CONVOPS_DW_FORWARD_NO_AVX512
  if (has_avx512 && !want_avx2 && !want_base) return &dw_avx512::kIsa;
#endif
  if (has_avx2 && !want_base) return &dw_avx2::kIsa;
#ifndef CONVOPS_DW_FORWARD_NO_BASELINE
  return &dw_sse2::kIsa;
#else
  return has_avx2 ? &dw_avx2::kIsa : nullptr;  // a sanitized build has only this machine's
#endif
}

#else

inline const DwForwardIsa* depthwise_forward_isa() { return nullptr; }

#endif  // CONVOPS_DW_FORWARD_X86

}  // namespace cpu
}  // namespace convops
