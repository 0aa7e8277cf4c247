// The AVX-512 float vector words of cpu/direct_conv_kernels.h, shared by its float32 and
// bf16-pair instantiations in cpu/direct_conv.h (no include guard: the kernels header #undefs
// them after each use).
#define VREG __m512
#define VLANES 16
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VSET1(x) _mm512_set1_ps(x)
#define VZERO() _mm512_setzero_ps()
