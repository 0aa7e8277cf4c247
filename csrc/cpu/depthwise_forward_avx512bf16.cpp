// The bf16 kernels of the CPU depthwise forward (cpu/depthwise_forward.h) compiled for AVX-512
// with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4): stores round with vcvtneps2bf16.
// Its float32 kernels are the AVX-512 build's (merged in cpu/depthwise_forward.h).
#include "cpu/depthwise_forward.h"

#if defined(CONVOPS_DW_FORWARD_X86) && !defined(CONVOPS_DW_FORWARD_NO_AVX512BF16)
namespace convops {
namespace cpu {

// GCC 12's AVX-512 intrinsics trip -Wmaybe-uninitialized on their own _mm512_undefined_*.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512bf16")
namespace dw_avx512bf16 {
#define DWF_NATIVE_BF16_STORE 1
#define DWF_BF16_ONLY 1
#include "cpu/depthwise_forward_avx512.h"
#undef DWF_NATIVE_BF16_STORE
#undef DWF_BF16_ONLY
}  // namespace dw_avx512bf16
#pragma GCC pop_options
#pragma GCC diagnostic pop

}  // namespace cpu
}  // namespace convops
#endif  // CONVOPS_DW_FORWARD_X86
