// The CPU depthwise forward of cpu/depthwise_forward.h compiled for
// AVX2 + FMA (x86-64-v3: 8 float lanes, 16 vector registers).
#include "cpu/depthwise_forward.h"

#ifdef CONVOPS_DW_FORWARD_X86
namespace convops {
namespace cpu {

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
inline void vstream(float* p, V v) { _mm256_stream_ps(p, v); }  // p aligned to sizeof(V)
inline void vstore(c10::BFloat16* p, V v) { store8(p, v); }
// float channel tails (the first n < 8 lanes) through a lane mask, as in the AVX-512 build;
// bf16 tails take the kernels header's generic ones (AVX2 has no 16-bit masked moves).
inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V vload_part(const float* p, int n) { return _mm256_maskload_ps(p, first_lanes(n)); }
inline void vstore_part(float* p, V v, int n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
#include "cpu/depthwise_forward_kernels.h"
#undef DWF_HAS_TRANSPOSE8
}  // namespace dw_avx2
#pragma GCC pop_options

}  // namespace cpu
}  // namespace convops
#endif  // CONVOPS_DW_FORWARD_X86
