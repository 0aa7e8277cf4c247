// The AVX-512 vocabulary of cpu/depthwise_forward_kernels.h and the kernels themselves, for
// the two AVX-512 builds: depthwise_forward_avx512.cpp (x86-64-v4) and
// depthwise_forward_avx512bf16.cpp (x86-64-v4 + AVX512_BF16, DWF_NATIVE_BF16_STORE: rounds to bf16
// with vcvtneps2bf16, and holds only the bf16 kernels; its float32 ones are the other build's).
// Included inside each build's namespace and target pragma; no include guard.
constexpr const char* kIsaName = DWF_NATIVE_BF16_STORE ? "avx512bf16" : "avx512";
using V = __m512;
constexpr int kLanes = 16;
constexpr int kBlockW = 8, kVecRegs = 32;
#define DWF_HAS_TRANSPOSE8 1
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vload(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
#if DWF_NATIVE_BF16_STORE
// vcvtneps2bf16 (AVX512_BF16) rounds to nearest even as c10 does, but flushes float32 denormals
// to zero and keeps NaN payloads; vectors with such lanes (rare) take the emulated rounding, so
// the two builds give identical bits. In place of 7 ALU ops per stored vector: one conversion
// and one class test (A/B, 2 threads, bf16 channels_last against oneDNN: 144@56 0.84 -> 0.89-0.99x,
// s2-144@56 0.82-0.85 -> 0.90x, 32@112 0.89-0.92 -> 1.09-1.15x).
constexpr int kNativeBf16Unexact = 0x01 | 0x20 | 0x80;  // vfpclassps: QNaN, denormal, SNaN
inline bool native_bf16_exact(V v) { return _mm512_fpclass_ps_mask(v, kNativeBf16Unexact) == 0; }
#endif
// v's bits rounded to nearest even at bit 16 (c10's rule: the bf16 is the high half); NaN ->
// 0x7FC0. Shared by the channel-order store below and the even / odd pair store.
inline __m512i bf16_rounded_high(V v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7FC00000));
}
// The rounded bf16 are the odd (high) words; one word permute gathers them into the low 256 bits,
// in place of a shift and a narrowing vpmovdw (A/B, 1 thread, bf16 channels_last against oneDNN:
// 144@56 0.80-0.84 -> 0.87-0.88x, s2-144@56 0.70-0.71 -> 0.76-0.77x, 240@28 k5 0.87 -> 0.90x).
// Widening loads through a word permute instead of vpmovzxwd + shift measured slower on 5x5 and
// 7x7 (240@28 0.88 -> 0.79x) and was not kept.
inline void vstore(c10::BFloat16* p, V v) {
#if DWF_NATIVE_BF16_STORE
  if (__builtin_expect(native_bf16_exact(v), 1)) {
    _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
    return;
  }
#endif
  const __m512i odd_words = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, (31 << 16) | 29,
                                             (27 << 16) | 25, (23 << 16) | 21, (19 << 16) | 17,
                                             (15 << 16) | 13, (11 << 16) | 9, (7 << 16) | 5,
                                             (3 << 16) | 1);
  const __m512i r = _mm512_permutexvar_epi16(odd_words, bf16_rounded_high(v));
  _mm256_storeu_si256((__m256i*)p, _mm512_castsi512_si256(r));
}
#include "cpu/depthwise_forward_x86_8.h"

// bf16 channel pairs (NHWC in place), even / odd: a pair's 32 bf16 channels are one 64-byte load,
// and each 32-bit word of it holds channels 2i (low half) and 2i + 1 (high half), so a shift
// widens the even channels and a mask the odd ones: 2 ALU ops per pair, against 2 widening
// loads and 2 shifts in channel order. The store rounds both vectors (as vstore) and interleaves
// their halves back with one word blend. The pair's weights and bias are packed in the same
// order (cpu/depthwise_conv2d.cpp), so each channel sums the same terms in the same order:
// results identical to the channel-order kernels. Used where every pair is one cache line
// (channels a multiple of 32; the rule and its measurements are in depthwise_conv2d.cpp).
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
inline void vstore_pair(PairedBF16* p, V even, V odd) {
#if DWF_NATIVE_BF16_STORE
  if (__builtin_expect(native_bf16_exact(even) && native_bf16_exact(odd), 1)) {
    // even channels in words 0-15, odd ones in 16-31; the permute interleaves them
    const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                                25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
                                                18, 2, 17, 1, 16, 0);
    _mm512_storeu_si512(p, _mm512_permutexvar_epi16(interleave, halves));
    return;
  }
#endif
  const __m512i low = _mm512_srli_epi32(bf16_rounded_high(even), 16);
  _mm512_storeu_si512(p, _mm512_mask_blend_epi16(0xAAAAAAAAu, low, bf16_rounded_high(odd)));
}
#define DWF_PAIRED_BF16 1

#include "cpu/depthwise_forward_kernels.h"
#undef DWF_PAIRED_BF16
#undef DWF_HAS_TRANSPOSE8
