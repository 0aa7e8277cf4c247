// The CPU depthwise forward of cpu/depthwise_forward.h compiled for
// AVX-512 (x86-64-v4: 16 float lanes, 32 vector registers).
#include "cpu/depthwise_forward.h"

#if defined(CONVOPS_DW_FORWARD_X86) && !defined(CONVOPS_DW_FORWARD_NO_AVX512)
namespace convops {
namespace cpu {

// Whether this CPU has AVX512_BF16's float32 -> bf16 conversions (used below). Outside the
// target pragma: it runs when the library loads, on any CPU.
static const bool kCpuHasBf16Convert = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") != 0;
}();

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
inline void vstream(float* p, V v) { _mm512_stream_ps(p, v); }  // p aligned to sizeof(V)
// Where the CPU has AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4), bf16 stores round with
// vcvtneps2bf16: round to nearest even as c10, but float32 denormals flush to zero and NaN
// payloads are kept, so vectors holding either (rare) take the emulated rounding below and the
// bits stay those of every other build. One conversion and one class test in place of 7 ALU ops
// per stored vector (A/B, 2 threads, N4 bf16 channels_last against oneDNN: 144@56 0.89-0.91 ->
// 0.93-0.94x, s2-144@56 0.86 -> 0.89-0.90x, 240@28 k5 0.94-0.95 -> 0.97x, 32@112 (even / odd
// pairs) 1.00-1.01 -> 1.11-1.12x, 576@14 1.08 -> 1.11-1.12x). Chosen at run time, so the
// instructions are inline assembly: this file is compiled for x86-64-v4, which lacks them (a
// build of its own with them, tried first, cost 10 more CPU minutes of compiling).
constexpr int kBf16ConvertUnexact = 0x01 | 0x20 | 0x80;  // vfpclassps: QNaN, denormal, SNaN
inline bool bf16_convert_exact(V v) {
  return kCpuHasBf16Convert && _mm512_fpclass_ps_mask(v, kBf16ConvertUnexact) == 0;
}
// The same test over a whole register block (store_block of the kernels header): one branch.
template <int CV, int R>
inline bool block_converts_exact(const V (&acc)[CV][R]) {
  if (!kCpuHasBf16Convert) return false;
  __mmask16 unexact = 0;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int h = 0; h < CV; ++h) unexact |= _mm512_fpclass_ps_mask(acc[h][r], kBf16ConvertUnexact);
  return unexact == 0;
}
constexpr bool tests_store_blocks(const c10::BFloat16*) { return true; }
// v's bits rounded to nearest even at bit 16 (c10's rule: the bf16 is the high half); NaN ->
// 0x7FC0. Shared by the channel-order store below and the even / odd pair store.
inline __m512i bf16_rounded_high(V v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7FC00000));
}
// v rounded to 16 bf16 (c10's bits), as a 256-bit vector. Emulated, the rounded bf16 are the odd
// (high) words; one word permute gathers them into the low 256 bits, in place of a shift and a
// narrowing vpmovdw (A/B, 1 thread, bf16 channels_last against oneDNN: 144@56 0.80-0.84 ->
// 0.87-0.88x, s2-144@56 0.70-0.71 -> 0.76-0.77x, 240@28 k5 0.87 -> 0.90x). Widening loads
// through a word permute instead of vpmovzxwd + shift measured slower on 5x5 and 7x7 (240@28
// 0.88 -> 0.79x) and was not kept.
// std::true_type: through vcvtneps2bf16, where the caller has tested v (bf16_convert_exact);
// std::false_type: emulated; no tag: tests v.
inline __m256i bf16_rounded(V v, std::true_type) {
  __m256i r;
  asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(v));
  return r;
}
inline __m256i bf16_rounded(V v, std::false_type) {
  const __m512i odd_words = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, (31 << 16) | 29,
                                             (27 << 16) | 25, (23 << 16) | 21, (19 << 16) | 17,
                                             (15 << 16) | 13, (11 << 16) | 9, (7 << 16) | 5,
                                             (3 << 16) | 1);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi16(odd_words, bf16_rounded_high(v)));
}
inline __m256i bf16_rounded(V v) {
  if (__builtin_expect(bf16_convert_exact(v), 1)) return bf16_rounded(v, std::true_type());
  return bf16_rounded(v, std::false_type());
}
template <typename... Rounding>
inline void vstore(c10::BFloat16* p, V v, Rounding... how) {
  _mm256_storeu_si256((__m256i*)p, bf16_rounded(v, how...));
}
// Channel tails (the first n < 16 lanes) through a lane mask: masked-off lanes are neither read
// nor written (and cannot fault), and the kept lanes get the same arithmetic, so results equal
// the generic tails' of the kernels header, which go through a stack buffer one element at a
// time. That buffer made a tail vector cost several full ones: 24@56 k3 fp32 channels_last (one
// vector + an 8-channel tail) ran at 0.35x oneDNN, 0.051 ms instead of 0.233 ms (1.59x) with
// masks; 72@56 k3 0.50 -> 1.21x, 40@28 k5 0.59 -> 1.88x, 120@28 k5 0.72 -> 1.44x (2 threads).
inline __mmask16 first_lanes(int n) { return static_cast<__mmask16>((1u << n) - 1); }
inline V vload_part(const float* p, int n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
inline V vload_part(const c10::BFloat16* p, int n) {
  const __m256i h = _mm256_maskz_loadu_epi16(first_lanes(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void vstore_part(float* p, V v, int n) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
template <typename... Rounding>
inline void vstore_part(c10::BFloat16* p, V v, int n, Rounding... how) {
  _mm256_mask_storeu_epi16(p, first_lanes(n), bf16_rounded(v, how...));
}
#include "cpu/depthwise_forward_x86_8.h"

// Lane permutes and masked FMAs for the NCHW narrow-map planes of the kernels header.
#define DWF_HAS_LANE_PERMUTE 1
using LaneIndex = __m512i;
using LaneMask = __mmask16;
// lane i takes element i * step + shift (its low 4 bits; the lanes that matter are in range)
inline LaneIndex lane_index(int64_t step, int64_t shift) {
  return _mm512_add_epi32(_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7,
                                                              6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(int(step))),
                          _mm512_set1_epi32(int(shift)));
}
inline LaneMask lanes_between(int64_t lo, int64_t hi) {  // lanes [lo, hi), 0 <= lo <= hi <= 16
  return static_cast<LaneMask>(((1u << hi) - 1) & ~((1u << lo) - 1));
}
inline V vpermute(V v, LaneIndex i) { return _mm512_permutexvar_ps(i, v); }
inline V vfma_lanes(V a, V b, V c, LaneMask m) { return _mm512_mask3_fmadd_ps(a, b, c, m); }

// bf16 channel pairs (NHWC in place), even / odd: a pair's 32 bf16 channels are one 64-byte load,
// and each 32-bit word of it holds channels 2i (low half) and 2i + 1 (high half), so a shift
// widens the even channels and a mask the odd ones: 2 ALU ops per pair, against 2 widening
// loads and 2 shifts in channel order. The store rounds both vectors (as vstore) and interleaves
// their halves back with one word blend. The pair's weights and bias are packed in the same
// order (cpu/depthwise_conv2d.cpp), so each channel sums the same terms in the same order:
// results identical to the channel-order kernels. The rule and its measurements are in
// depthwise_conv2d.cpp.
struct PairedBF16 : c10::BFloat16 {
  PairedBF16() = default;
  PairedBF16(float f) : c10::BFloat16(f) {}  // NOLINT: converts like c10::BFloat16
};
constexpr bool pair_loads_together(const PairedBF16*) { return true; }
inline void vload_pair(const PairedBF16* p, V& even, V& odd) {
  const __m512i u = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(int(0xFFFF0000u))));
}
inline void vstore_pair(PairedBF16* p, V even, V odd, std::true_type) {
  __m512i halves;  // even channels in words 0-15, odd ones in 16-31; the permute interleaves
  asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(halves) : "v"(odd), "v"(even));
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                              25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
                                              18, 2, 17, 1, 16, 0);
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(interleave, halves));
}
inline void vstore_pair(PairedBF16* p, V even, V odd, std::false_type) {
  const __m512i low = _mm512_srli_epi32(bf16_rounded_high(even), 16);
  _mm512_storeu_si512(p, _mm512_mask_blend_epi16(0xAAAAAAAAu, low, bf16_rounded_high(odd)));
}
inline void vstore_pair(PairedBF16* p, V even, V odd) {
  if (__builtin_expect(bf16_convert_exact(even) && bf16_convert_exact(odd), 1))
    vstore_pair(p, even, odd, std::true_type());
  else
    vstore_pair(p, even, odd, std::false_type());
}
// the single vectors and channel tails of the even / odd rows are in channel order
inline V vload_part(const PairedBF16* p, int n) { return vload_part(static_cast<const c10::BFloat16*>(p), n); }
template <typename... Rounding>
inline void vstore_part(PairedBF16* p, V v, int n, Rounding... how) {
  vstore_part(static_cast<c10::BFloat16*>(p), v, n, how...);
}
#define DWF_PAIRED_BF16 1

#include "cpu/depthwise_forward_kernels.h"
#undef DWF_PAIRED_BF16
#undef DWF_HAS_TRANSPOSE8
#undef DWF_HAS_LANE_PERMUTE
}  // namespace dw_avx512
#pragma GCC pop_options
#pragma GCC diagnostic pop

}  // namespace cpu
}  // namespace convops
#endif  // CONVOPS_DW_FORWARD_X86
