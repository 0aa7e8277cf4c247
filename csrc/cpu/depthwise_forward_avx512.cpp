// The CPU depthwise forward of cpu/depthwise_forward.h compiled for
// AVX-512 (x86-64-v4: 16 float lanes, 32 vector registers).
#include "cpu/depthwise_forward.h"

#if defined(CONVOPS_DW_FORWARD_X86) && !defined(CONVOPS_DW_FORWARD_NO_AVX512)
namespace convops {
namespace cpu {

// GCC 12's AVX-512 intrinsics trip -Wmaybe-uninitialized on their own _mm512_undefined_*.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace dw_avx512 {
#define DWF_NATIVE_BF16_STORE 0
#include "cpu/depthwise_forward_avx512.h"
#undef DWF_NATIVE_BF16_STORE
}  // namespace dw_avx512
#pragma GCC pop_options
#pragma GCC diagnostic pop

}  // namespace cpu
}  // namespace convops
#endif  // CONVOPS_DW_FORWARD_X86
