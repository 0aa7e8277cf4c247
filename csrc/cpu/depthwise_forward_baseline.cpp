// The CPU depthwise forward of cpu/depthwise_forward.h compiled for
// x86-64 baseline (SSE2: 4 float lanes, no FMA).
#include "cpu/depthwise_forward.h"

#if defined(CONVOPS_DW_FORWARD_X86) && !defined(CONVOPS_DW_FORWARD_NO_BASELINE)
namespace convops {
namespace cpu {

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
inline void vstream(float* p, V v) { _mm_stream_ps(p, v); }  // p aligned to sizeof(V)
inline void vstore(c10::BFloat16* p, V v) {
  alignas(16) float t[4];
  _mm_store_ps(t, v);
  for (int i = 0; i < 4; ++i) p[i] = c10::BFloat16(t[i]);
}
#include "cpu/depthwise_forward_kernels.h"
#undef DWF_HAS_TRANSPOSE8
}  // namespace dw_sse2

}  // namespace cpu
}  // namespace convops
#endif  // CONVOPS_DW_FORWARD_X86
