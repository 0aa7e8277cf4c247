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
// as c10) straight into the output.
//
// NCHW (any multiplier): to fill lanes on small maps (14x14, 7x7) the same kernel runs over a
// block of kLanes output channels. Each task transposes the rows of its kLanes input planes
// into a ring of (kh-1)*dh+1 rows of [W][kLanes] floats (4*kLanes bytes per input pixel of the
// block, written once per row and strip and read from L1/L2 by every tap; an input row is
// re-transposed only for the halo of the next strip) and transposes each output row back
// ([Wo][kLanes] floats, L1). The only memory the forward keeps is per-thread scratch: the ring,
// the output row, and the weights packed per channel block as [block][tap][kLanes] floats.
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

struct DwForwardJob {
  const void* x;
  void* y;
  const float* w;     // [channel block][tap][lanes], zero past OC
  const float* bias;  // [blocks * lanes] or null
  int64_t N, C, H, W, OC, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, multiplier;
  int64_t strips, strip_rows;  // NCHW: output rows split into strips of strip_rows
  int64_t lo[kDwMaxK], hi[kDwMaxK];  // per kx: output columns whose input column is inside
  int64_t inner_lo, inner_hi;        // columns where every tap is inside
};

using DwTaskFn = void (*)(const DwForwardJob&, int64_t, int64_t);

struct DwForwardIsa {
  const char* name;
  int lanes;
  DwTaskFn nhwc_f32, nhwc_bf16, nchw_f32, nchw_bf16;
};

#ifdef CONVOPS_DW_FORWARD_X86

// GCC 12's AVX-512 intrinsics trip -Wmaybe-uninitialized on their own _mm512_undefined_*.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace dw_avx512 {
using V = __m512;
constexpr int kLanes = 16;
constexpr int kBlockW = 8, kVecRegs = 32;
constexpr const char* kIsaName = "avx512";
#define DWF_HAS_TRANSPOSE8 1
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vload(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void vstore(c10::BFloat16* p, V v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
}
#include "cpu/depthwise_forward_x86_8.h"
#include "cpu/depthwise_forward_kernels.h"
#undef DWF_HAS_TRANSPOSE8
}  // namespace dw_avx512
#pragma GCC pop_options
#pragma GCC diagnostic pop

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace dw_avx2 {
using V = __m256;
constexpr int kLanes = 8;
constexpr int kBlockW = 4, kVecRegs = 16;
constexpr const char* kIsaName = "avx2";
#define DWF_HAS_TRANSPOSE8 1
#include "cpu/depthwise_forward_x86_8.h"
inline V vset1(float x) { return _mm256_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vload(const c10::BFloat16* p) { return load8(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void vstore(c10::BFloat16* p, V v) { store8(p, v); }
#include "cpu/depthwise_forward_kernels.h"
#undef DWF_HAS_TRANSPOSE8
}  // namespace dw_avx2
#pragma GCC pop_options

// x86-64 baseline (SSE2): no FMA, bf16 rounded through c10 on store.
namespace dw_sse2 {
using V = __m128;
constexpr int kLanes = 4;
constexpr int kBlockW = 4, kVecRegs = 16;
constexpr const char* kIsaName = "baseline";
#define DWF_HAS_TRANSPOSE8 0
inline V vset1(float x) { return _mm_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
inline V vload(const float* p) { return _mm_loadu_ps(p); }
inline V vload(const c10::BFloat16* p) {
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64((const __m128i*)p)));
}
inline void vstore(float* p, V v) { _mm_storeu_ps(p, v); }
inline void vstore(c10::BFloat16* p, V v) {
  alignas(16) float t[4];
  _mm_store_ps(t, v);
  for (int i = 0; i < 4; ++i) p[i] = c10::BFloat16(t[i]);
}
#include "cpu/depthwise_forward_kernels.h"
#undef DWF_HAS_TRANSPOSE8
}  // namespace dw_sse2

// The build this CPU runs: the widest it has, unless CONVOPS_CPU_ISA asks for a narrower one.
inline const DwForwardIsa* depthwise_forward_isa() {
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512vl") &&
                                 __builtin_cpu_supports("avx512dq");
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                               __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool want_avx2 = env_is("CONVOPS_CPU_ISA", "avx2");
  const bool want_base = env_is("CONVOPS_CPU_ISA", "baseline");
  if (has_avx512 && !want_avx2 && !want_base) return &dw_avx512::kIsa;
  if (has_avx2 && !want_base) return &dw_avx2::kIsa;
  return &dw_sse2::kIsa;
}

#else

inline const DwForwardIsa* depthwise_forward_isa() { return nullptr; }

#endif  // CONVOPS_DW_FORWARD_X86

}  // namespace cpu
}  // namespace convops
