// The depthwise forward micro-kernels, written once over a small vector vocabulary and compiled
// once per ISA: each cpu/depthwise_forward_<isa>.cpp includes this header (no include guard on
// purpose) inside a `#pragma GCC target` region, in a namespace that already defines
//   V, kLanes          the float vector type and its lane count
//   vload/vstore       for float and c10::BFloat16 (bf16 is widened / rounded in registers)
//   vfma(a, b, c)      a * b + c;  vset1(x)
//   load8/store8, transpose8  (only where kHasTranspose8: AVX2 and AVX-512)
// and kBlockW, the output pixels of one register block, and kVecRegs, the vector registers.

#ifdef CONVOPS_DW_FORWARD_UNOPTIMIZED
// Sanitized builds (setup.py): at -O1 under ASan each ISA build of these kernels took 5-6
// minutes to compile, at -O0 30 s. ASan checks every access at either level. Each ISA file's
// `pop_options` ends this.
#pragma GCC optimize("O0")
#endif

// The first n lanes of a vector from / to memory (channel tails), through an aligned stack
// buffer; the other lanes load as zero. An ISA with masked moves defines exact overloads for its
// element types (AVX-512: float and bf16, AVX2: float), which overload resolution prefers.
template <typename T>
inline V vload_part(const T* p, int n) {
  alignas(sizeof(V)) float t[kLanes] = {};
  for (int i = 0; i < n; ++i) t[i] = static_cast<float>(p[i]);
  return vload(t);
}
template <typename T>
inline void vstore_part(T* p, V v, int n) {
  alignas(sizeof(V)) float t[kLanes];
  vstore(t, v);
  for (int i = 0; i < n; ++i) p[i] = static_cast<T>(t[i]);
}

// The two channel vectors of a pair (2 * kLanes channels from p), lanes in channel order. An ISA
// may define exact overloads for its own element types that order lanes differently (AVX-512's
// PairedBF16: even channels, then odd); the packed weights follow the same order.
template <typename T>
inline void vload_pair(const T* p, V& a, V& b) {
  a = vload(p), b = vload(p + kLanes);
}
template <typename T, typename... Rounding>
inline void vstore_pair(T* p, V a, V b, Rounding... how) {
  vstore(p, a, how...), vstore(p + kLanes, b, how...);
}
// Float output through non-temporal (streaming) stores: each full vector goes to memory
// without its line being read first (no read for ownership) and without evicting cached input.
// Only where every full vector's address is a multiple of sizeof(V) (cpu/depthwise_conv2d.cpp
// checks, and has the rule); channel tails take the ordinary masked stores.
struct StreamedF32 {
  float value;
};
inline void vstore(StreamedF32* p, V v) { vstream(&p->value, v); }
inline void vstore_part(StreamedF32* p, V v, int n) { vstore_part(&p->value, v, n); }

// Whether a pair's two vectors come from one vload_pair (lanes in another order); channel-order
// pairs load each vector next to its FMAs, as the single-vector kernels do.
constexpr bool pair_loads_together(const void*) { return false; }
template <typename T>
constexpr bool kPairLoadsTogether = pair_loads_together(static_cast<const T*>(nullptr));

// The R output pixels of a register block (pixel r at o + r * px_step), CV channel vectors each.
// Where an ISA rounds bf16 with an instruction that is exact on all but rare values (AVX-512
// with AVX512_BF16: not on float32 denormals and NaN payloads), it declares
// tests_store_blocks for the element type, and one test of the whole block (its
// block_converts_exact) picks how every vector of it rounds: vstore(..., std::true_type) through
// the instruction, std::false_type emulated. (AVX-512 kernel lab, N4, 1 thread, per-vector ->
// per-block test, ms: bf16 pairs s2-144@56 0.142 -> 0.135, channel order 240@28 k5 0.719 ->
// 0.691; 144@56 and 32@112 tie. The tests' class checks still cost: testing one vector of the
// block ran 144@56 in 0.365 ms, none 0.345, all 0.392; flushing denormals as oneDNN does would
// take that, but not c10's bits.)
constexpr bool tests_store_blocks(const void*) { return false; }
template <typename T>
constexpr bool kTestsStoreBlocks = tests_store_blocks(static_cast<const T*>(nullptr));
template <typename out_t, bool kFull, int CV, int R, typename... Rounding>
__attribute__((always_inline)) inline void store_each(out_t* o, int64_t px_step,
                                                      const V (&acc)[CV][R], int nch,
                                                      Rounding... how) {
  static_assert(kFull || CV == 1, "channel tails come one vector at a time");
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if constexpr (CV == 2) vstore_pair(o + r * px_step, acc[0][r], acc[1][r], how...);
    else if constexpr (kFull) vstore(o + r * px_step, acc[0][r], how...);
    else vstore_part(o + r * px_step, acc[0][r], nch, how...);
  }
}
template <typename out_t, bool kFull, int CV, int R>
__attribute__((always_inline)) inline void store_block(out_t* o, int64_t px_step,
                                                       const V (&acc)[CV][R], int nch) {
  if constexpr (kTestsStoreBlocks<out_t>) {
    if (__builtin_expect(block_converts_exact(acc), 1))
      store_each<out_t, kFull>(o, px_step, acc, nch, std::true_type());
    else
      store_each<out_t, kFull>(o, px_step, acc, nch, std::false_type());
  } else {
    store_each<out_t, kFull>(o, px_step, acc, nch);
  }
}

// acc[r] += w[tap] * in[ow0 + r][tap] over the valid taps of one block of R output pixels and
// one channel vector; the R accumulators stay in registers over all kh*kw taps. Checked blocks
// touch the border: per tap, pixels outside [lo[kx], hi[kx]) read nothing (no padded copy).
template <typename in_t, typename out_t, int R, bool kChecked, bool kFull, int KW = 0, int CV = 1>
__attribute__((always_inline)) inline void pixel_block(const DwForwardJob& j,
                                                       const in_t* const* rows, int64_t c0,
                                                       int64_t in_px, const float* w, V bias,
                                                       int64_t ow0, out_t* out, int64_t out_px,
                                                       int nch, V bias_hi = V()) {
  static_assert(kFull || CV == 1, "channel tails come one vector at a time");
  V acc[CV][R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int h = 0; h < CV; ++h) acc[h][r] = h == 0 ? bias : bias_hi;
  const int64_t px_step = j.sw * in_px, tap_step = j.dw * in_px;
  const int64_t w_step = j.kh * j.kw * kLanes;  // the next channel vector's weights
  for (int64_t ky = 0; ky < j.kh; ++ky) {
    const in_t* row = rows[ky];
    if (row == nullptr) continue;
    const in_t* base = row + c0 + (ow0 * j.sw - j.pw) * in_px;
    const int64_t kw = KW ? KW : j.kw;
    const float* wk = w + ky * kw * kLanes;
#pragma GCC unroll 8
    for (int64_t kx = 0; kx < kw; ++kx) {
      const in_t* p = base + kx * tap_step;
      if constexpr (CV == 2 && kPairLoadsTogether<in_t>) {
        static_assert(!kChecked, "pairs run unchecked interior blocks");
        const V w0 = vload(wk + kx * kLanes), w1 = vload(wk + w_step + kx * kLanes);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          V a, b;
          vload_pair(p + r * px_step, a, b);
          acc[0][r] = vfma(w0, a, acc[0][r]);
          acc[1][r] = vfma(w1, b, acc[1][r]);
        }
      } else {
#pragma GCC unroll 2
        for (int h = 0; h < CV; ++h) {
          const V wv = vload(wk + h * w_step + kx * kLanes);
          const in_t* ph = p + h * kLanes;
          if (!kChecked || (ow0 >= j.lo[kx] && ow0 + R <= j.hi[kx])) {
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r)
              acc[h][r] = vfma(wv, kFull ? vload(ph + r * px_step) : vload_part(ph + r * px_step, nch),
                               acc[h][r]);
          } else {
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r)
              if (ow0 + r >= j.lo[kx] && ow0 + r < j.hi[kx])
                acc[h][r] = vfma(wv, kFull ? vload(ph + r * px_step) : vload_part(ph + r * px_step, nch),
                                 acc[h][r]);
          }
        }
      }
    }
  }
  store_block<out_t, kFull>(out + ow0 * out_px, out_px, acc, nch);
}

// One output pixel at a border: only the taps whose input column is inside (a contiguous kx
// range, since the input column grows with kx) are applied, with no per-tap test. Four
// accumulators take the taps kx0, kx0+1, ... in turn, so the sum is four FMA chains, not one
// latency-bound chain (31x31 rows at 56 wide have 14 such pixels: one chain ran them at a
// quarter of the FMA rate); they are added in a fixed order. CV = 2: a channel pair.
template <typename in_t, typename out_t, bool kFull, int CV = 1>
__attribute__((always_inline)) inline void pixel_single(const DwForwardJob& j,
                                                        const in_t* const* rows, int64_t c0,
                                                        int64_t in_px, const float* w, V bias,
                                                        int64_t ow, out_t* out, int64_t out_px,
                                                        int nch, V bias_hi = V()) {
  static_assert(kFull || CV == 1, "channel tails come one vector at a time");
  const int64_t iw0 = ow * j.sw - j.pw;  // input column of tap 0
  const OutputRange<int64_t> taps = dw_columns_inside(j, iw0, j.dw, j.kw);
  const int64_t kx0 = taps.first, kx1 = taps.last;
  const int64_t tap_step = j.dw * in_px, w_step = j.kh * j.kw * kLanes;
  V acc[CV][4];
#pragma GCC unroll 2
  for (int h = 0; h < CV; ++h)
    acc[h][0] = h == 0 ? bias : bias_hi, acc[h][1] = acc[h][2] = acc[h][3] = vset1(0.f);
  // tap u of a group: weights at wq + u * kLanes (+ w_step for the pair's second vector)
  auto tap = [&](const in_t* q, const float* wq, int u) __attribute__((always_inline)) {
    if constexpr (CV == 2) {
      V a, b;
      vload_pair(q, a, b);
      acc[0][u] = vfma(vload(wq + u * kLanes), a, acc[0][u]);
      acc[1][u] = vfma(vload(wq + w_step + u * kLanes), b, acc[1][u]);
    } else {
      acc[0][u] = vfma(vload(wq + u * kLanes), kFull ? vload(q) : vload_part(q, nch), acc[0][u]);
    }
  };
  for (int64_t ky = 0; ky < j.kh; ++ky) {
    if (rows[ky] == nullptr) continue;
    const in_t* q = rows[ky] + c0 + (iw0 + kx0 * j.dw) * in_px;
    const float* wq = w + (ky * j.kw + kx0) * kLanes;
    int64_t n = kx1 - kx0;
    for (; n >= 4; n -= 4, q += 4 * tap_step, wq += 4 * kLanes) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) tap(q + u * tap_step, wq, u);
    }
#pragma GCC unroll 3
    for (int u = 0; u < 3; ++u)
      if (u < n) tap(q + u * tap_step, wq, u);
  }
  const V one = vset1(1.f);  // a * 1 + b: an exact add
  V sum[CV];
#pragma GCC unroll 2
  for (int h = 0; h < CV; ++h)
    sum[h] = vfma(vfma(acc[h][0], one, acc[h][1]), one, vfma(acc[h][2], one, acc[h][3]));
  if constexpr (CV == 2) vstore_pair(out + ow * out_px, sum[0], sum[1]);
  else if (kFull) vstore(out + ow * out_px, sum[0]);
  else vstore_part(out + ow * out_px, sum[0], nch);
}

// One block of R output pixels ow0 + r * dw, for a compile-time width KW at stride S (1, or 2
// without dilation). Pixel r's tap kx reads window column r * S + kx (input column
// ow0 * S - pw + (r * S + kx) * dw), so each of the window's (R - 1) * S + KW columns per input
// row is loaded once and feeds every (pixel, tap) pair that reads it: a 3x3 block of 4 pixels
// does 6 loads per row instead of 12 at stride 1, 9 at stride 2, and the loads walk one
// pointer (per-tap address registers spilled in the profile). With dilation the block's pixels
// are dw apart (one phase of the row), which is what makes their windows overlap. kChecked
// blocks touch the border: columns outside the image are skipped, issuing no FMA, so borders
// run at the interior's speed. kHold keeps each loaded column in a register: without it GCC
// folds the float load into every FMA that uses it (a memory operand each), undoing the sliding
// (2 threads, fp32 channels_last, oneDNN / convops: 32@112 0.87-0.89 -> 1.07-1.13x, 144@56
// 0.89 -> 1.10, 576@14 1.22-1.27 -> 1.47-1.54; neutral on 5x5, 7x7 and stride 2). Dilated
// single-vector rows go without: held, d4-256@64 ran 5% slower.
template <typename in_t, typename out_t, bool kFull, int KW, int R, bool kChecked, int CV = 1,
          int S = 1, bool kHold = true>
__attribute__((always_inline)) inline void sliding_block(const DwForwardJob& j,
                                                         const in_t* const* rows, int64_t c0,
                                                         int64_t in_px, const float* w, V bias,
                                                         int64_t ow0, out_t* out, int64_t out_px,
                                                         int nch, V bias_hi = V()) {
  static_assert(kFull || CV == 1, "channel tails come one vector at a time");
  constexpr int Q = (R - 1) * S + KW;
  const int64_t w_step = j.kh * KW * kLanes;  // the next channel vector's weights
  V acc[CV][R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int h = 0; h < CV; ++h) acc[h][r] = h == 0 ? bias : bias_hi;
  const int64_t ic0 = ow0 * S - j.pw;  // input column of the window's first column
  const int64_t dw = j.dw, col_step = dw * in_px;
  for (int64_t ky = 0; ky < j.kh; ++ky) {
    const in_t* p = rows[ky];
    if (p == nullptr) continue;
    p += c0 + ic0 * in_px;
    V wv[CV][KW];
#pragma GCC unroll 8
    for (int kx = 0; kx < KW; ++kx)
#pragma GCC unroll 2
      for (int h = 0; h < CV; ++h) wv[h][kx] = vload(w + h * w_step + (ky * KW + kx) * kLanes);
#pragma GCC unroll 32
    for (int q = 0; q < Q; ++q, p += col_step) {
      if (kChecked && (ic0 + q * dw < 0 || ic0 + q * dw >= j.W)) continue;
      V v[CV];
      if constexpr (CV == 2 && kPairLoadsTogether<in_t>) vload_pair(p, v[0], v[1]);
#pragma GCC unroll 2
      for (int h = 0; h < CV; ++h) {
        if constexpr (!(CV == 2 && kPairLoadsTogether<in_t>)) {
          v[h] = kFull ? vload(p + h * kLanes) : vload_part(p, nch);
          if constexpr (kHold) asm("" : "+v"(v[h]));  // an opaque use: one load, in a register
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const int kx = q - r * S;  // the tap of pixel r that reads column q
          if (kx >= 0 && kx < KW) acc[h][r] = vfma(wv[h][kx], v[h], acc[h][r]);
        }
      }
    }
  }
  store_block<out_t, kFull>(out + ow0 * out_px, dw * out_px, acc, nch);
}

template <typename in_t, typename out_t, bool kFull, int KW, int R, int CV = 1, int S = 1,
          bool kHold = true>
__attribute__((always_inline)) inline void sliding_block_at(const DwForwardJob& j,
                                                            const in_t* const* rows, int64_t c0,
                                                            int64_t in_px, const float* w, V bias,
                                                            int64_t ow0, out_t* out,
                                                            int64_t out_px, int nch,
                                                            V bias_hi = V()) {
  if (ow0 >= j.inner_lo && ow0 + (R - 1) * j.dw < j.inner_hi)
    sliding_block<in_t, out_t, kFull, KW, R, false, CV, S, kHold>(j, rows, c0, in_px, w, bias, ow0,
                                                           out, out_px, nch, bias_hi);
  else
    sliding_block<in_t, out_t, kFull, KW, R, true, CV, S, kHold>(j, rows, c0, in_px, w, bias, ow0,
                                                          out, out_px, nch, bias_hi);
}

// A whole row (at least kBlockW * dw wide), borders included, in sliding blocks. Without
// dilation: wide blocks (R accumulators + KW weights + one input vector fill the register file
// without spilling), then narrow ones, the last shifted left, recomputing a few pixels
// bit-identically. With dilation: runs of kBlockW * dw pixels, one narrow block per phase, the
// last run shifted left.
template <typename in_t, typename out_t, bool kFull, int KW>
__attribute__((always_inline)) inline void sliding_row(const DwForwardJob& j,
                                                       const in_t* const* rows, int64_t c0,
                                                       int64_t in_px, const float* w, V bias,
                                                       out_t* out, int64_t out_px, int nch) {
  constexpr int kWide = std::max(kBlockW, std::min(2 * kBlockW, kVecRegs - KW - 2));
  if (j.dw > 1) {
    // wide runs first (kBlockW accumulators alone leave the FMA pipes waiting on latency:
    // d4-256@64 at batch 1 ran at 0.74x oneDNN), then narrow ones, the last shifted left
    int64_t next = 0;
    for (const int64_t wide_span = kWide * j.dw; j.Wo - next >= wide_span; next += wide_span)
      for (int64_t phase = 0; phase < j.dw; ++phase)
        sliding_block_at<in_t, out_t, kFull, KW, kWide, 1, 1, false>(
            j, rows, c0, in_px, w, bias, next + phase, out, out_px, nch);
    const int64_t span = kBlockW * j.dw;
    for (; next < j.Wo; next += span) {
      const int64_t ow0 = std::min(next, j.Wo - span);
      for (int64_t phase = 0; phase < j.dw; ++phase)
        sliding_block_at<in_t, out_t, kFull, KW, kBlockW, 1, 1, false>(
            j, rows, c0, in_px, w, bias, ow0 + phase, out, out_px, nch);
    }
    return;
  }
  // 14- and 28-wide rows (AVX-512) in blocks of 14 that divide them: blocks of 16 and 8 computed
  // 16 pixels for 14 and 32 for 28 (the last block shifted left)
  constexpr int kFourteen = 14;
  if constexpr (kWide >= kFourteen) {
    if (j.Wo % kFourteen == 0 && j.Wo % kBlockW != 0) {
      for (int64_t ow0 = 0; ow0 < j.Wo; ow0 += kFourteen)
        sliding_block_at<in_t, out_t, kFull, KW, kFourteen>(j, rows, c0, in_px, w, bias, ow0,
                                                            out, out_px, nch);
      return;
    }
  }
  int64_t ow = 0;
  for (; j.Wo - ow >= kWide; ow += kWide)
    sliding_block_at<in_t, out_t, kFull, KW, kWide>(j, rows, c0, in_px, w, bias, ow, out, out_px, nch);
  for (; ow < j.Wo; ow += kBlockW)
    sliding_block_at<in_t, out_t, kFull, KW, kBlockW>(j, rows, c0, in_px, w, bias,
                                                      std::min(ow, j.Wo - kBlockW), out, out_px,
                                                      nch);
}

// Stride-1 rows of filters at least kWideR wide (the 27x27 and 31x31 layers): sliding blocks of
// kWideR pixels ow0 + r * dw whose weights come from memory. Each input column q of the block's
// window (kWideR + kw - 1 columns) is loaded once and feeds pixel r through tap kx = q - r, with
// that tap's weight as the FMA's memory operand: the same loads per FMA as a pixel block (one
// weight, 1/kWideR of an input), but columns outside the image are simply not visited, so a
// border block costs only its valid taps and runs at the interior's rate. (The blocks of
// interior_run could not cover a 14-wide row under a 27-wide filter at all: every pixel was a
// border pixel, run one by one or in blocks with a test per pixel and tap.) Only the first and
// last kWideR - 1 columns of the window feed part of the block. Eight accumulators: the FMA
// latency times the pipes on AVX2 (2 x 4) and on Zen 4's AVX-512 (1 x 4); R = 7 for the rows
// of dw_wide_sevens.
constexpr int kWideR = kDwWideBlock;

template <typename in_t, typename out_t, bool kFull, int R = kWideR>
__attribute__((always_inline)) inline void wide_sliding_block(const DwForwardJob& j,
                                                              const in_t* const* rows, int64_t c0,
                                                              int64_t in_px, const float* w,
                                                              V bias, int64_t ow0, out_t* out,
                                                              int64_t out_px, int nch) {
  const int64_t kw = j.kw, dw = j.dw, col_step = dw * in_px;
  const int64_t ic0 = ow0 - j.pw;  // input column of window column 0
  const OutputRange<int64_t> cols = dw_columns_inside(j, ic0, dw, R + kw - 1);
  const int64_t qa = cols.first, qb = cols.last;  // the window columns inside the image
  const int64_t head_end = std::min<int64_t>(qb, R - 1), mid_end = std::min<int64_t>(qb, kw);
  V acc[1][R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[0][r] = bias;
  for (int64_t ky = 0; ky < j.kh; ++ky) {
    if (rows[ky] == nullptr) continue;
    const in_t* p = rows[ky] + c0 + (ic0 + qa * dw) * in_px;
    const float* wq = w + (ky * kw + qa) * kLanes;  // tap q: pixel r's weight is wq - r * kLanes
    int64_t q = qa;
    // head: pixels r <= q
    for (; q < head_end; ++q, p += col_step, wq += kLanes) {
      const V v = kFull ? vload(p) : vload_part(p, nch);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        if (r <= q) acc[0][r] = vfma(vload(wq - r * kLanes), v, acc[0][r]);
    }
    // middle: every pixel
    for (; q < mid_end; ++q, p += col_step, wq += kLanes) {
      const V v = kFull ? vload(p) : vload_part(p, nch);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[0][r] = vfma(vload(wq - r * kLanes), v, acc[0][r]);
    }
    // tail: pixels r > q - kw
    for (; q < qb; ++q, p += col_step, wq += kLanes) {
      const V v = kFull ? vload(p) : vload_part(p, nch);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        if (r > q - kw) acc[0][r] = vfma(vload(wq - r * kLanes), v, acc[0][r]);
    }
  }
  store_block<out_t, kFull>(out + ow0 * out_px, dw * out_px, acc, nch);
}

// A whole row (at least kWideR * dw wide) in wide sliding blocks: runs of kWideR * dw pixels,
// one block per dilation phase, the last run shifted left (recomputing a few pixels); rows of
// dw_wide_sevens in blocks of 7, recomputing none (512@14 k27: 2 of 16 pixels were recomputed).
template <typename in_t, typename out_t, bool kFull>
__attribute__((always_inline)) inline void wide_sliding_row(const DwForwardJob& j,
                                                            const in_t* const* rows, int64_t c0,
                                                            int64_t in_px, const float* w, V bias,
                                                            out_t* out, int64_t out_px, int nch) {
  if (dw_wide_sevens(j, kLanes)) {
    for (int64_t ow0 = 0; ow0 < j.Wo; ow0 += 7)
      wide_sliding_block<in_t, out_t, kFull, 7>(j, rows, c0, in_px, w, bias, ow0, out, out_px,
                                                nch);
    return;
  }
  const int64_t span = kWideR * j.dw;
  for (int64_t next = 0; next < j.Wo; next += span) {
    const int64_t ow0 = std::min(next, j.Wo - span);
    for (int64_t phase = 0; phase < j.dw; ++phase)
      wide_sliding_block<in_t, out_t, kFull>(j, rows, c0, in_px, w, bias, ow0 + phase, out,
                                             out_px, nch);
  }
}

// Unchecked blocks over the interior [lo, hi) (hi - lo >= kBlockW), the last one shifted left,
// for what does not slide (stride 2, large or other filters; sliding at stride 2 measured no
// faster). Narrower interiors: 3x3 filters with all three input rows inside hold their nine
// weight vectors in registers for the whole run, and 5- and 7-wide filters get a compile-time
// tap loop.
template <typename in_t, typename out_t, bool kFull, int KW>
__attribute__((always_inline)) inline void interior_run(const DwForwardJob& j,
                                                        const in_t* const* rows, int64_t c0,
                                                        int64_t in_px, const float* w, V bias,
                                                        int64_t lo, int64_t hi, out_t* out,
                                                        int64_t out_px, int nch) {
  // Wide blocks where the interior has room: 2 * kBlockW accumulators keep both FMA pipes busy
  // over the 4-cycle FMA latency (kBlockW chains cannot), measured 14% faster on the 31x31 and
  // stride-2 rows than the held-weight blocks below, whose 9 weights leave room for kBlockW only.
  constexpr int kR = std::min(2 * kBlockW, kVecRegs - 4);
  if (hi - lo >= kR) {
    int64_t ow = lo;
    for (; hi - ow >= kR; ow += kR)
      pixel_block<in_t, out_t, kR, false, kFull, KW>(j, rows, c0, in_px, w, bias, ow, out,
                                                     out_px, nch);
    // the rest in narrow blocks, the last shifted left (27 pixels: 8+8+8+4, 1 recomputed)
    for (; ow < hi; ow += kBlockW)
      pixel_block<in_t, out_t, kBlockW, false, kFull, KW>(j, rows, c0, in_px, w, bias,
                                                          std::min(ow, hi - kBlockW), out,
                                                          out_px, nch);
    return;
  }
  if (KW == 3 && j.kh == 3 && rows[0] && rows[1] && rows[2]) {
    V wv[9];
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) wv[t] = vload(w + t * kLanes);
    const int64_t px_step = j.sw * in_px, tap_step = j.dw * in_px;
    for (int64_t next = lo; next < hi; next += kBlockW) {
      const int64_t ow0 = std::min(next, hi - kBlockW);
      V acc[1][kBlockW];
#pragma GCC unroll 16
      for (int r = 0; r < kBlockW; ++r) acc[0][r] = bias;
#pragma GCC unroll 3
      for (int ky = 0; ky < 3; ++ky) {
        const in_t* base = rows[ky] + c0 + (ow0 * j.sw - j.pw) * in_px;
#pragma GCC unroll 3
        for (int kx = 0; kx < 3; ++kx) {
          const in_t* p = base + kx * tap_step;
#pragma GCC unroll 16
          for (int r = 0; r < kBlockW; ++r)
            acc[0][r] = vfma(wv[ky * 3 + kx],
                             kFull ? vload(p + r * px_step) : vload_part(p + r * px_step, nch),
                             acc[0][r]);
        }
      }
      store_block<out_t, kFull>(out + ow0 * out_px, out_px, acc, nch);
    }
    return;
  }
  for (int64_t next = lo; next < hi; next += kBlockW)
    pixel_block<in_t, out_t, kBlockW, false, kFull, KW>(j, rows, c0, in_px, w, bias,
                                                        std::min(next, hi - kBlockW), out,
                                                        out_px, nch);
}

// One output row of one channel vector (nch < kLanes: a channel tail). Stride-1 rows of 3-, 5-
// and 7-wide filters slide from border to border (above). Elsewhere the interior, where every
// tap is inside, runs in unchecked register blocks of kBlockW pixels (a width that kBlockW does
// not divide ends with a block shifted left, recomputing a few pixels bit-identically); a border
// at least kBlockW wide runs in checked blocks, narrower ones pixel by pixel over their valid
// taps. (Shifted checked blocks instead of single pixels measured 2.4x slower on 512@14 k27:
// their per-pixel tap tests.)
template <typename in_t, typename out_t, bool kFull>
__attribute__((always_inline)) inline void conv_row_vector(const DwForwardJob& j,
                                                           const in_t* const* rows, int64_t c0,
                                                           int64_t in_px, const float* w, V bias,
                                                           out_t* out, int64_t out_px, int nch) {
  if (dw_seven_wide(j)) {
    switch (j.kw) {
      case 3: return sliding_block_at<in_t, out_t, kFull, 3, 7>(j, rows, c0, in_px, w, bias, 0, out, out_px, nch);
      case 5: return sliding_block_at<in_t, out_t, kFull, 5, 7>(j, rows, c0, in_px, w, bias, 0, out, out_px, nch);
      case 7: return sliding_block_at<in_t, out_t, kFull, 7, 7>(j, rows, c0, in_px, w, bias, 0, out, out_px, nch);
      default: break;
    }
  }
  if (j.sw == 1 && j.Wo >= kBlockW * j.dw) {
    switch (j.kw) {
      case 3: return sliding_row<in_t, out_t, kFull, 3>(j, rows, c0, in_px, w, bias, out, out_px, nch);
      case 5: return sliding_row<in_t, out_t, kFull, 5>(j, rows, c0, in_px, w, bias, out, out_px, nch);
      case 7: return sliding_row<in_t, out_t, kFull, 7>(j, rows, c0, in_px, w, bias, out, out_px, nch);
      default: break;
    }
  }
  if (dw_wide_sliding(j))
    return wide_sliding_row<in_t, out_t, kFull>(j, rows, c0, in_px, w, bias, out, out_px, nch);
  // left border [0, lo), interior [lo, hi), right border [hi, Wo)
  const auto [lo, hi] = dw_interior(j);
  int64_t ow = 0;
  for (; ow + kBlockW <= lo; ow += kBlockW)
    pixel_block<in_t, out_t, kBlockW, true, kFull>(j, rows, c0, in_px, w, bias, ow, out, out_px, nch);
  for (; ow < lo; ++ow)
    pixel_single<in_t, out_t, kFull>(j, rows, c0, in_px, w, bias, ow, out, out_px, nch);
  if (hi - lo >= kBlockW) {
    switch (j.kw) {
      case 3: interior_run<in_t, out_t, kFull, 3>(j, rows, c0, in_px, w, bias, lo, hi, out, out_px, nch); break;
      case 5: interior_run<in_t, out_t, kFull, 5>(j, rows, c0, in_px, w, bias, lo, hi, out, out_px, nch); break;
      case 7: interior_run<in_t, out_t, kFull, 7>(j, rows, c0, in_px, w, bias, lo, hi, out, out_px, nch); break;
      default: interior_run<in_t, out_t, kFull, 0>(j, rows, c0, in_px, w, bias, lo, hi, out, out_px, nch);
    }
  } else {
    for (ow = lo; ow < hi; ++ow)
      pixel_single<in_t, out_t, kFull>(j, rows, c0, in_px, w, bias, ow, out, out_px, nch);
  }
  for (ow = hi; ow + kBlockW <= j.Wo; ow += kBlockW)
    pixel_block<in_t, out_t, kBlockW, true, kFull>(j, rows, c0, in_px, w, bias, ow, out, out_px, nch);
  for (; ow < j.Wo; ++ow)
    pixel_single<in_t, out_t, kFull>(j, rows, c0, in_px, w, bias, ow, out, out_px, nch);
}

// Rows of two adjacent channel vectors at once (NHWC in place, where dw_rows_in_pairs says):
// each pixel's 2 * kLanes channels are whole cache lines, read and written in one visit
// instead of two. 3x3 stride-1 rows slide (dilated ones in runs of one phase, the last run
// shifted left), and so do 3x3 stride-2 rows without dilation; other strided rows of filters up
// to 7 wide run their interior in blocks of pixels and their few border pixels one by one
// (a pair at a time). Same taps in the same order as the single-vector
// kernels: bit-identical results.
constexpr int kPairW = std::min(8, (kVecRegs - 8) / 2);  // 2R accumulators + 6 weights + 2
constexpr int kPairB = std::min(8, (kVecRegs - 4) / 2);  // 2R accumulators + 2 weights + 2

template <typename in_t, typename out_t, int KW>
__attribute__((always_inline)) inline void blocked_row_pair(const DwForwardJob& j,
                                                            const in_t* const* rows, int64_t c0,
                                                            int64_t in_px, const float* w,
                                                            V bias0, V bias1, out_t* out,
                                                            int64_t out_px) {
  const auto [lo, hi] = dw_interior(j);
  const int64_t borders[2][2] = {{0, lo}, {hi, j.Wo}};
  for (const auto& border : borders)
    for (int64_t ow = border[0]; ow < border[1]; ++ow)
      pixel_single<in_t, out_t, true, 2>(j, rows, c0, in_px, w, bias0, ow, out, out_px, kLanes,
                                         bias1);
  for (int64_t next = lo; next < hi; next += kPairB)
    pixel_block<in_t, out_t, kPairB, false, true, KW, 2>(j, rows, c0, in_px, w, bias0,
                                                         std::min(next, hi - kPairB), out,
                                                         out_px, kLanes, bias1);
}

// The bias vector of channel block cb (zero past OC, or no bias).
inline V block_bias(const DwForwardJob& j, int64_t cb) {
  return j.bias ? vload(j.bias + cb * kLanes) : vset1(0.f);
}

// The first `vectors` full channel vectors of an output row, two at a time; with kSingles, the
// sliding rows also run an odd last one and the channel tail (see singles_block) and return
// true, else the caller runs those. Sliding rows (3x3
// stride 1, and stride 2 without dilation) run pixel block outer, channel pairs inner: each
// block reads its kh input rows as contiguous runs over all the pairs' channels, where a whole
// row per pair reads R pixels at a stride of the pixel size. (1 thread, fp32, interleaved with
// oneDNN: 576@14 N4 0.80 -> 0.95x, N8 0.61 -> 0.91x, 576@16 N8 0.52 -> 0.79x, 256@28 N8
// 0.66 -> 0.84x; 144@56 and 32@112 unchanged.) 14- and 28-wide rows (AVX-512) run in blocks of
// kPairW - 1 pixels that divide them, with no recomputed pixels of a shifted last block
// (576@14 0.93 -> 0.98x oneDNN in float32); 7-wide rows are one such block. Only where the
// narrower block still holds 14 accumulators; AVX2's would hold 6, fewer than its 2 pipes x 4
// cycles of latency.
template <typename in_t, typename out_t, bool kSingles>
__attribute__((always_inline)) inline bool pair_rows(const DwForwardJob& j,
                                                     const in_t* const* rows, int64_t in_px,
                                                     int64_t vectors, int nch_tail,
                                                     out_t* out, int64_t out_px) {
  const int64_t taps = j.kh * j.kw;
  auto each_pair = [&](auto&& run) {
    for (int64_t cb = 0; cb + 1 < vectors; cb += 2)
      run(cb * kLanes, j.w + cb * taps * kLanes, block_bias(j, cb), block_bias(j, cb + 1));
  };
  // An odd last full vector (144 channels: 4 pairs + 1) and the channel tail join each sliding
  // block of the rows below as blocks of the same pixels, so every pixel's lines are read and
  // written in one visit; after the pairs, along the whole row, they came back to lines that
  // had left L1. (Kernel lab, N4 144@56, oneDNN / convops: fp32 1 thread 0.95-1.00 ->
  // 0.98-1.03x, s2 1.13-1.20 -> 1.18-1.21; 2 threads s2 1.43 -> 1.47; bf16 s2 1 / 2 threads
  // 1.06 -> 1.11, 1.34 -> 1.41.) Rows without either keep a loop of pairs alone (kSingles
  // false): with the single blocks compiled in, 32@112 ran 3-5% slower. Not with AVX2, whose
  // 4-pixel blocks leave a single vector 4 accumulator chains (72@56 and 40@56 stride 1, 1
  // thread: 0.295 -> 0.309 ms, 0.164 -> 0.179; stride 2 tied).
  const int64_t odd = vectors % 2;
  auto singles_block = [&](int64_t ow0, auto width, auto stride) {
    if constexpr (!kSingles) return;
    constexpr int R = decltype(width)::value, S = decltype(stride)::value;
    const int64_t cb = vectors - odd;
    if (odd)
      sliding_block_at<in_t, out_t, true, 3, R, 1, S>(j, rows, cb * kLanes, in_px,
                                                      j.w + cb * taps * kLanes, block_bias(j, cb),
                                                      ow0, out + cb * kLanes, out_px, kLanes);
    if (nch_tail)
      sliding_block_at<in_t, out_t, false, 3, R, 1, S>(j, rows, vectors * kLanes, in_px,
                                                       j.w + vectors * taps * kLanes,
                                                       block_bias(j, vectors), ow0,
                                                       out + vectors * kLanes, out_px, nch_tail);
  };
  // Rows that 7 divides and 8 does not, undilated, at stride 1 and (3x3) stride 2, in blocks
  // of kPairW - 1 (stride 2, kernel lab, s2-144@56 N4 into 28 columns, 1 / 2 threads: fp32
  // 0.197 -> 0.188 / 0.097 -> 0.094 ms, bf16 channel order 0.172 -> 0.158 / 0.093 -> 0.086)
  constexpr int kNarrow = kPairW - 1;
  if (kNarrow >= 7 && j.dw == 1 && j.Wo % kNarrow == 0 && j.Wo % kPairW != 0 &&
      (j.sw == 1 || (j.sw == 2 && j.kw == 3))) {
    auto narrow_blocks = [&](auto stride) {
      for (int64_t ow0 = 0; ow0 < j.Wo; ow0 += kNarrow) {
        each_pair([&](int64_t c0, const float* w, V b0, V b1) {
          sliding_block_at<in_t, out_t, true, 3, kNarrow, 2, decltype(stride)::value>(
              j, rows, c0, in_px, w, b0, ow0, out + c0, out_px, kLanes, b1);
        });
        singles_block(ow0, std::integral_constant<int, kNarrow>(), stride);
      }
    };
    if (j.sw == 1) narrow_blocks(std::integral_constant<int, 1>());
    else narrow_blocks(std::integral_constant<int, 2>());
    return kSingles;
  }
  if (j.sw == 1) {  // dilated rows in runs of one phase, the last run shifted left
    const int64_t span = kPairW * j.dw;
    for (int64_t next = 0; next < j.Wo; next += span)
      for (int64_t phase = 0; phase < j.dw; ++phase) {
        each_pair([&](int64_t c0, const float* w, V b0, V b1) {
          sliding_block_at<in_t, out_t, true, 3, kPairW, 2>(
              j, rows, c0, in_px, w, b0, std::min(next, j.Wo - span) + phase, out + c0, out_px,
              kLanes, b1);
        });
        singles_block(std::min(next, j.Wo - span) + phase, std::integral_constant<int, kPairW>(),
                      std::integral_constant<int, 1>());
      }
    return kSingles;
  }
  // stride 2 without dilation slides too: 2R + 1 loads per row and vector instead of 3R
  // (s2-144@56 channels_last, 2 threads: bf16 0.70 -> 0.80x oneDNN, fp32 0.83 -> 0.87)
  if (j.sw == 2 && j.kw == 3 && j.dw == 1 && j.Wo >= kPairW) {
    for (int64_t next = 0; next < j.Wo; next += kPairW) {
      each_pair([&](int64_t c0, const float* w, V b0, V b1) {
        sliding_block_at<in_t, out_t, true, 3, kPairW, 2, 2>(
            j, rows, c0, in_px, w, b0, std::min(next, j.Wo - kPairW), out + c0, out_px, kLanes,
            b1);
      });
      singles_block(std::min(next, j.Wo - kPairW), std::integral_constant<int, kPairW>(),
                    std::integral_constant<int, 2>());
    }
    return kSingles;
  }
  each_pair([&](int64_t c0, const float* w, V b0, V b1) {
    switch (j.kw) {
      case 3: return blocked_row_pair<in_t, out_t, 3>(j, rows, c0, in_px, w, b0, b1, out + c0, out_px);
      case 5: return blocked_row_pair<in_t, out_t, 5>(j, rows, c0, in_px, w, b0, b1, out + c0, out_px);
      case 7: return blocked_row_pair<in_t, out_t, 7>(j, rows, c0, in_px, w, b0, b1, out + c0, out_px);
      default: return blocked_row_pair<in_t, out_t, 0>(j, rows, c0, in_px, w, b0, b1, out + c0, out_px);
    }
  });
  return false;
}

// One output row over `blocks` channel vectors (+ a tail of nch_tail channels). With `pairs`,
// full vectors go two at a time through pair_rows (in-process A/B, fp32 channels_last against
// the single vectors, geomean over 3x3 s1, s2 and d4 layers at 1/2 threads and batch 1/suite:
// 1.02-1.16 -> 1.06-1.40x oneDNN; 576@14 at 2 threads 1.12 -> 1.46x); the rest run one vector
// at a time along the whole row. (Column tiles of 8-32 pixels sized for L1 measured slower at 2
// threads than whole rows per pair, 0.87-0.92 vs 1.13-1.17 of oneDNN on 144@56, 1.02 vs 1.21
// on d4-256@64; tiles of one sliding block, pair_rows' order, tie there and win on wide-channel
// small maps: see pair_rows.)
template <typename in_t, typename out_t>
__attribute__((always_inline)) inline void conv_row(const DwForwardJob& j, const in_t* const* rows,
                                                    int64_t in_px, int64_t blocks, int nch_tail,
                                                    out_t* out, int64_t out_px,
                                                    bool pairs = false) {
  const int64_t taps = j.kh * j.kw;
  constexpr bool kSinglesInPairBlocks = kPairW >= 8;  // AVX-512 (see pair_rows)
  if (pairs && (kSinglesInPairBlocks && (blocks % 2 || nch_tail)
                    ? pair_rows<in_t, out_t, true>(j, rows, in_px, blocks, nch_tail, out, out_px)
                    : pair_rows<in_t, out_t, false>(j, rows, in_px, blocks, 0, out, out_px)))
    return;
  for (int64_t cb = pairs ? blocks / 2 * 2 : 0; cb < blocks; ++cb) {
    conv_row_vector<in_t, out_t, true>(j, rows, cb * kLanes, in_px, j.w + cb * taps * kLanes,
                                       block_bias(j, cb), out + cb * kLanes, out_px, kLanes);
  }
  if (nch_tail) {
    conv_row_vector<in_t, out_t, false>(j, rows, blocks * kLanes, in_px,
                                        j.w + blocks * taps * kLanes, block_bias(j, blocks),
                                        out + blocks * kLanes, out_px, nch_tail);
  }
}

// Asks for the cache lines of [p, p + bytes) to be brought into L2.
inline void prefetch_l2(const void* p, int64_t bytes, bool for_write) {
  const char* c = static_cast<const char*>(p);
  for (const char* e = c + bytes; c < e; c += 64) {
    if (for_write) __builtin_prefetch(c, 1, 2);
    else __builtin_prefetch(c, 0, 2);
  }
}

// NHWC, multiplier 1: one task per output row (n, oh), reading the input rows in place. Before
// each row, the lines that the task's next row first touches are prefetched into L2: its new
// input rows and its output row. Where they are not in cache (an input or an output buffer
// larger than the free part of L3), their first use otherwise stalls every channel vector on
// memory latency; the output's lines are read before they are written (read for ownership), so
// a cold output costs as much as a cold input. (Adding the output row, oneDNN / convops at 2
// threads: fp32 32@112 1.09 -> 1.14x, s2-144@56 1.18 -> 1.30, 576@14 1.50 -> 1.60, bf16
// s2-144@56 1.05 -> 1.15; 1 thread: bf16 s2 0.88 -> 0.96, fp32 32@112 +6-8%; fp32 144@56 ties
// at 1 and 2 threads where its outputs stay in cache, and ran 0.45 -> 0.29-0.35 ms where they
// were evicted between calls. PREFETCHW, prefetching each block's lines one block ahead, and
// for the input: spreading the prefetches over the channel vectors, 2 or 3 rows ahead, or none
// at all, measured no better.)
// With O = StreamedF32 the output row is not prefetched: its stores bypass the cache.
template <typename T, typename O = T>
void nhwc_rows(const DwForwardJob& j, int64_t begin, int64_t end) {
  constexpr bool kStreamed = std::is_same_v<O, StreamedF32>;
  const T* x = static_cast<const T*>(j.x);
  O* y = static_cast<O*>(j.y);
  const T* rows[kDwMaxK];
  const bool pairs = dw_rows_in_pairs(j, kLanes, kPairW, kPairB);
  const int64_t in_row_bytes = j.W * j.C * int64_t(sizeof(T));
  const int64_t out_row_bytes = j.Wo * j.OC * int64_t(sizeof(T));
  // Dilated stride-1 rows run in phase order (oh mod dh) within each image of the task range,
  // as the ring does: consecutive rows then share kh - 1 input rows, where rows oh and oh + 1
  // share none (d4-256@64: an input row came back after 4 output rows, about 1 MB of rows
  // later, at the edge of L2). Kernel lab, fp32, row order -> phase order: batch 1 0.288 ->
  // 0.267 ms at 2 threads, 0.617 -> 0.531 at 1; N2 0.99 -> 0.71 ms; d2 and bf16 tie.
  const int64_t phases = j.sh == 1 && j.dh > 1 ? j.dh : 1;
  auto first_ih = [&](int64_t oh) { return oh * j.sh - j.ph; };
  // Staged rows (j.stage_pitch > 0; the rule and its measurements: dw_stage_pitch): each input
  // row the thread needs is copied once (per phase) into a per-thread ring of kh rows whose
  // pixels lie stage_pitch elements apart, so a block's columns no longer share L1 sets, and the
  // rows are read there, in the slots of nhwc_ring_rows (dw_ring_slot).
  const int64_t pitch = j.stage_pitch > 0 ? j.stage_pitch : j.C;
  const int64_t stage_row = j.W * pitch;
  T* stage = j.stage_pitch > 0 ? reinterpret_cast<T*>(scratch<float>(
                                     kDwRingSlot, (j.kh * stage_row * int64_t(sizeof(T)) + 3) / 4))
                               : nullptr;
  int64_t* held = stage ? scratch<int64_t>(kDwRingSlot, j.kh) : nullptr;
  if (held) std::fill(held, held + j.kh, int64_t(-1));
  auto staged = [&](int64_t key, int64_t ih) -> const T* {
    const int64_t slot = dw_ring_slot(j, ih);
    T* dst = stage + slot * stage_row;
    if (int64_t& h = held[slot]; h != key) {
      h = key;
      const T* src = x + key * j.W * j.C;
      for (int64_t iw = 0; iw < j.W; ++iw)
        std::memcpy(dst + iw * pitch, src + iw * j.C, j.C * sizeof(T));
    }
    return dst;
  };
  for (int64_t p0 = begin; p0 < end;) {
    const int64_t n = p0 / j.Ho, oh_a = p0 % j.Ho, oh_end = oh_a + (std::min(end, (n + 1) * j.Ho) - p0);
    for (int64_t phase = 0; phase < phases; ++phase) {
      for (int64_t oh = oh_a + phase; oh < oh_end; oh += phases) {
        for (int64_t ky = 0; ky < j.kh; ++ky) {
          const int64_t ih = first_ih(oh) + ky * j.dh;
          rows[ky] = (ih >= 0 && ih < j.H) ? (stage ? staged(n * j.H + ih, ih)
                                                    : x + (n * j.H + ih) * j.W * j.C)
                                           : nullptr;
        }
        // the next row of this order (the next phase's first, or the next image's first)
        int64_t n2 = n, oh2 = oh + phases;
        if (oh2 >= oh_end) oh2 = phase + 1 < phases ? oh_a + phase + 1 : -1;
        if (oh2 < 0 && oh_end - oh_a + (n * j.Ho + oh_a) < end) n2 = n + 1, oh2 = 0;
        if (oh2 >= 0) {
          // its input rows that this row does not read, and its output row
          for (int64_t ky = 0; ky < j.kh; ++ky) {
            const int64_t ih = first_ih(oh2) + ky * j.dh, rel = ih - first_ih(oh);
            const bool shared = n2 == n && rel >= 0 && rel % j.dh == 0 && rel / j.dh < j.kh;
            if (!shared && ih >= 0 && ih < j.H)
              prefetch_l2(x + (n2 * j.H + ih) * j.W * j.C, in_row_bytes, false);
          }
          if (!kStreamed) prefetch_l2(y + (n2 * j.Ho + oh2) * j.Wo * j.OC, out_row_bytes, true);
        }
        conv_row<T, O>(j, rows, pitch, j.C / kLanes, static_cast<int>(j.C % kLanes),
                       y + (n * j.Ho + oh) * j.Wo * j.OC, j.OC, pairs);
      }
    }
    p0 += oh_end - oh_a;
  }
  if (kStreamed) _mm_sfence();  // streamed stores are weakly ordered: drain before the join
}

// NHWC through a ring of input rows reordered per channel block: one task per output row (n, oh)
// as above, but each input row the thread needs is first copied into a ring of kh rows of
// [channel block][W][kLanes] floats (bf16 widened on the way), and every channel block's row
// kernel then runs on its own contiguous [W][kLanes] sub-rows. Input row ih lives in slot
// dw_ring_slot(j, ih), distinct for the kh taps of one output row. Dilated stride-1 rows run in
// phase order (oh mod dh) within each image, so consecutive rows share all but one input row and
// each input row is copied once per phase run: a ring of kh rows, not (kh-1)*dh+1 (d4-256@64:
// 192 KB, inside L2, instead of 576 KB).
template <typename T>
void nhwc_ring_rows(const DwForwardJob& j, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x);
  T* y = static_cast<T*>(j.y);
  const int64_t full = j.C / kLanes;
  const int tail = static_cast<int>(j.C % kLanes);
  const int64_t blocks = full + (tail ? 1 : 0), sub_row = j.W * kLanes;
  const int64_t ring_row = blocks * sub_row;
  float* ring = scratch<float>(kDwRingSlot, j.kh * ring_row);
  int64_t* held = scratch<int64_t>(kDwRingSlot, j.kh);  // the input row (n * H + ih) per slot
  std::fill(held, held + j.kh, int64_t(-1));
  const int64_t taps = j.kh * j.kw, phases = j.sh == 1 ? j.dh : 1;
  const float* slot_rows[kDwMaxK];
  const float* rows[kDwMaxK];
  for (int64_t p0 = begin; p0 < end;) {
    const int64_t n = p0 / j.Ho, oh_a = p0 % j.Ho;
    const int64_t p1 = std::min(end, (n + 1) * j.Ho);  // this image's rows of the task range
    for (int64_t phase = 0; phase < phases; ++phase) {
      for (int64_t oh = oh_a + phase; oh < oh_a + (p1 - p0); oh += phases) {
        for (int64_t ky = 0; ky < j.kh; ++ky) {
          const int64_t ih = oh * j.sh - j.ph + ky * j.dh;
          if (ih < 0 || ih >= j.H) {
            slot_rows[ky] = nullptr;
            continue;
          }
          const int64_t slot = dw_ring_slot(j, ih);
          float* dst = ring + slot * ring_row;
          const int64_t key = n * j.H + ih;  // rows of different images share slots
          if (held[slot] != key) {
            held[slot] = key;
            const T* src = x + key * j.W * j.C;
            for (int64_t iw = 0; iw < j.W; ++iw, src += j.C) {
              for (int64_t cb = 0; cb < full; ++cb)
                vstore(dst + cb * sub_row + iw * kLanes, vload(src + cb * kLanes));
              if (tail)
                vstore(dst + full * sub_row + iw * kLanes, vload_part(src + full * kLanes, tail));
            }
          }
          slot_rows[ky] = dst;
        }
        T* out = y + (n * j.Ho + oh) * j.Wo * j.OC;
        for (int64_t cb = 0; cb < blocks; ++cb) {
          for (int64_t ky = 0; ky < j.kh; ++ky)
            rows[ky] = slot_rows[ky] ? slot_rows[ky] + cb * sub_row : nullptr;
          if (cb < full)
            conv_row_vector<float, T, true>(j, rows, 0, kLanes, j.w + cb * taps * kLanes,
                                            block_bias(j, cb), out + cb * kLanes, j.OC, kLanes);
          else
            conv_row_vector<float, T, false>(j, rows, 0, kLanes, j.w + cb * taps * kLanes,
                                             block_bias(j, cb), out + cb * kLanes, j.OC, tail);
        }
      }
    }
    p0 = p1;
  }
}

// dst[iw][l] = planes[l][iw] for iw < W, l < nch; lanes past nch are zero.
template <typename T>
inline void transpose_in(const T* const* planes, int nch, int64_t offset, int64_t W,
                         float* dst) {
  int64_t iw = 0;
#if DWF_HAS_TRANSPOSE8
  // chunks of 8 pixels; a width that 8 does not divide ends with a chunk shifted left
  if (nch == kLanes && W >= 8) {
    for (int64_t next = 0; next < W; next += 8) {
      iw = std::min(next, W - 8);
      for (int g = 0; g < kLanes; g += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = load8(planes[g + i] + offset + iw);
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (iw + i) * kLanes + g, r[i]);
      }
    }
    iw = W;
  }
#endif
  for (; iw < W; ++iw) {
    int l = 0;
    for (; l < nch; ++l) dst[iw * kLanes + l] = static_cast<float>(planes[l][offset + iw]);
    for (; l < kLanes; ++l) dst[iw * kLanes + l] = 0.f;
  }
}

// planes[l][ow] = src[ow][l] for ow < Wo, l < nch.
template <typename T>
inline void transpose_out(const float* src, int64_t Wo, T* const* planes, int nch,
                          int64_t offset) {
  int64_t ow = 0;
#if DWF_HAS_TRANSPOSE8
  if (nch == kLanes && Wo >= 8) {
    for (int64_t next = 0; next < Wo; next += 8) {
      ow = std::min(next, Wo - 8);
      for (int g = 0; g < kLanes; g += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (ow + i) * kLanes + g);
        transpose8(r);
        for (int i = 0; i < 8; ++i) store8(planes[g + i] + offset + ow, r[i]);
      }
    }
    ow = Wo;
  }
#endif
  for (; ow < Wo; ++ow)
    for (int l = 0; l < nch; ++l) planes[l][offset + ow] = static_cast<T>(src[ow * kLanes + l]);
}

// NCHW: one task per (image, block of kLanes output channels, strip of output rows). The
// block's input rows are transposed into a ring of (kh-1)*dh+1 rows of [W][kLanes] floats as
// the strip first needs them (each input row once per strip, plus the halo of the strip
// above), so the channel-vector row kernel runs on them and small maps fill every lane; each
// output row goes through an L1-resident [Wo][kLanes] row and is transposed back into planes.
template <typename T>
void nchw_tasks(const DwForwardJob& j, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x);
  T* y = static_cast<T*>(j.y);
  const int64_t span = (j.kh - 1) * j.dh + 1, ring_row = j.W * kLanes;
  float* ring = scratch<float>(kDwRingSlot, span * ring_row);
  float* orow = scratch<float>(kDwRowSlot, j.Wo * kLanes);
  const int64_t blocks = (j.OC + kLanes - 1) / kLanes;
  const float* rows[kDwMaxK];
  const T* in_planes[kLanes];
  T* out_planes[kLanes];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t strip = t % j.strips, nb = t / j.strips, cb = nb % blocks, n = nb / blocks;
    const int64_t oc0 = cb * kLanes;
    const int nch = static_cast<int>(std::min<int64_t>(kLanes, j.OC - oc0));
    for (int l = 0; l < nch; ++l) {
      in_planes[l] = x + (n * j.C + (oc0 + l) / j.multiplier) * j.H * j.W;
      out_planes[l] = y + (n * j.OC + oc0 + l) * j.Ho * j.Wo;
    }
    DwForwardJob jb = j;  // this block's weights and bias, whole rows
    jb.w = j.w + cb * j.kh * j.kw * kLanes;
    jb.bias = j.bias ? j.bias + oc0 : nullptr;
    const int64_t oh0 = strip * j.strip_rows, oh1 = std::min(j.Ho, oh0 + j.strip_rows);
    int64_t next = std::numeric_limits<int64_t>::min();  // first input row not in the ring
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      for (int64_t ky = 0; ky < j.kh; ++ky) {
        const int64_t ih = oh * j.sh - j.ph + ky * j.dh;
        if (ih < 0 || ih >= j.H) {
          rows[ky] = nullptr;
          continue;
        }
        if (ih >= next) {
          for (int64_t r = std::max({next, ih - span + 1, int64_t(0)}); r <= ih; ++r)
            transpose_in(in_planes, nch, r * j.W, j.W, ring + (r % span) * ring_row);
          next = ih + 1;
        }
        rows[ky] = ring + (ih % span) * ring_row;
      }
      conv_row<float, float>(jb, rows, kLanes, 1, 0, orow, kLanes);
      transpose_out(orow, j.Wo, out_planes, nch, oh * j.Wo);
    }
  }
}

#if DWF_HAS_LANE_PERMUTE
// NCHW maps at most kLanes wide (14x14 and 7x7 with AVX-512): one output row per vector, its Wo
// pixels in lanes, one plane per task. Each input row the output row needs is one masked load
// (its W <= kLanes pixels), and tap kx's input pixels are a lane permute of it (lane ow takes
// pixel ow * sw + kx * dw - pw), applied by an FMA masked to the lanes [lo[kx], hi[kx]) where
// that pixel is inside: the taps of every pixel in row-major order in one chain, out-of-image
// taps skipped, as the channel-block rows do. No transposes: the channel blocks move each
// input and output element through an 8x8 transpose and a ring row, more ALU work than their
// FMAs. (N4, 1 thread, interleaved with oneDNN, channel blocks -> planes, ms: 576@14 k3 fp32
// 0.24-0.26 -> 0.20, bf16 0.29-0.30 -> 0.19-0.22; stride 2 fp32 0.24 -> 0.17, bf16 0.29 ->
// 0.19; 64@7 N8 fp32 0.052 -> 0.034, bf16 0.058 -> 0.033.)
// One block of R output rows from oh0 of one plane (in, out; w: tap i's weight at
// w[i * kLanes]): each input row the block reads is loaded and permuted once, for all the
// block's rows that read it; their R accumulators are independent chains. K > 0: undilated
// K x K filters at vertical stride 1, where which (row, tap row) pairs meet is known at compile
// time, and the 9 weights stay in registers (576@14 bf16: one row at a time 0.278 ms, blocks
// pairing rows at run time 0.218-0.239, unrolled 0.218, weights held 0.194-0.201).
template <typename T, int K, int R, int KW = K>
__attribute__((always_inline)) inline void narrow_block(const DwForwardJob& j, const T* in,
                                                        T* out, const float* w, const V* wv,
                                                        V bias, int64_t oh0,
                                                        const LaneIndex* index,
                                                        const LaneMask* inside) {
  static_assert(KW > 0 && (K == 0 || K == KW), "a compile-time filter width");
  V acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = bias;
  const int64_t top = oh0 * j.sh - j.ph;  // input row of block row 0's tap row 0
  if constexpr (K != 0) {
#pragma GCC unroll 16
    for (int q = 0; q < R + K - 1; ++q) {  // input row top + q
      const int64_t ih = top + q;
      if (ih < 0 || ih >= j.H) continue;
      const V row = vload_part(in + ih * j.W, static_cast<int>(j.W));
      V tap[K];
#pragma GCC unroll 8
      for (int kx = 0; kx < K; ++kx) tap[kx] = vpermute(row, index[kx]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int ky = q - r;
        if (ky < 0 || ky >= K) continue;
#pragma GCC unroll 8
        for (int kx = 0; kx < K; ++kx)
          acc[r] = vfma_lanes(wv[ky * K + kx], tap[kx], acc[r], inside[kx]);
      }
    }
  } else {
    const int64_t ih0 = std::max<int64_t>(top, 0);
    const int64_t ih1 = std::min(j.H, top + (R - 1) * j.sh + (j.kh - 1) * j.dh + 1);
    for (int64_t ih = ih0; ih < ih1; ++ih) {
      const V row = vload_part(in + ih * j.W, static_cast<int>(j.W));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int64_t dy = ih - (top + r * j.sh);  // = ky * dh for the row's tap row ky
        if (dy < 0 || dy >= j.kh * j.dh) continue;
        int64_t ky = dy;
        if (j.dh != 1) {  // (a division per row and tap row: undilated rows skip it)
          if (dy % j.dh != 0) continue;
          ky = dy / j.dh;
        }
        const float* wk = w + ky * KW * kLanes;
#pragma GCC unroll 8
        for (int kx = 0; kx < KW; ++kx)
          acc[r] = vfma_lanes(vset1(wk[kx * kLanes]), vpermute(row, index[kx]), acc[r],
                              inside[kx]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    vstore_part(out + (oh0 + r) * j.Wo, acc[r], static_cast<int>(j.Wo));
}
template <typename T, int K, int R, int KW = K>
void nchw_narrow_planes(const DwForwardJob& j, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x);
  T* y = static_cast<T*>(j.y);
  const int64_t taps = j.kh * j.kw;
  LaneIndex index[kDwMaxK];
  LaneMask inside[kDwMaxK];
  for (int64_t kx = 0; kx < j.kw; ++kx) {
    index[kx] = lane_index(j.sw, kx * j.dw - j.pw);
    inside[kx] = lanes_between(j.lo[kx], j.hi[kx]);
  }
  for (int64_t t = begin; t < end; ++t) {  // t: output plane n * OC + oc
    const int64_t oc = t % j.OC, n = t / j.OC;
    const T* in = x + (n * j.C + oc / j.multiplier) * j.H * j.W;
    const float* w = j.w + (oc / kLanes) * taps * kLanes + oc % kLanes;
    const V bias = vset1(j.bias ? j.bias[oc] : 0.f);
    // K > 0: the weights in registers, an opaque use each so that GCC does not broadcast
    // them from memory in every FMA (a third slower per FMA on Zen 4)
    V wv[K * K + 1];
#pragma GCC unroll 16
    for (int i = 0; i < K * K; ++i) {
      wv[i] = vset1(w[i * kLanes]);
      asm("" : "+v"(wv[i]));
    }
    for (int64_t next = 0; next < j.Ho; next += R)  // the last block shifted up
      narrow_block<T, K, R, KW>(j, in, y + t * j.Ho * j.Wo, w, wv, bias, std::min(next, j.Ho - R),
                            index, inside);
  }
}
// Blocks of 7 rows where 7 divides Ho (14, 7), else 8 (recomputing a few rows of a shifted
// last block, bit-identically), 4 or 1.
template <typename T, int K>
void nchw_narrow_rows(const DwForwardJob& j, int64_t begin, int64_t end) {
  if (j.Ho % 7 == 0) return nchw_narrow_planes<T, K, 7>(j, begin, end);
  if (j.Ho >= 8) return nchw_narrow_planes<T, K, 8>(j, begin, end);
  if (j.Ho >= 4) return nchw_narrow_planes<T, K, 4>(j, begin, end);
  nchw_narrow_planes<T, K, 1>(j, begin, end);
}
template <typename T>
void nchw_narrow_tasks(const DwForwardJob& j, int64_t begin, int64_t end) {
  if (j.sh == 1 && j.dh == 1 && j.kh == 3 && j.kw == 3) return nchw_narrow_rows<T, 3>(j, begin, end);
  switch (j.kw) {  // other rows one at a time (stride 2 or dilation: few shared input rows)
    case 1: return nchw_narrow_planes<T, 0, 1, 1>(j, begin, end);
    case 2: return nchw_narrow_planes<T, 0, 1, 2>(j, begin, end);
    default: return nchw_narrow_planes<T, 0, 1, 3>(j, begin, end);
  }
}
#endif

// The packed weights of one channel block, dst[tap][l] = planes[l][tap] (lanes past nch zero):
// the input rows' transpose, 8x8 tiles in registers where the ISA has them.
template <typename T>
void pack_block(const T* const* planes, int nch, int64_t taps, float* dst) {
  transpose_in(planes, nch, 0, taps, dst);
}

const DwForwardIsa kIsa{kIsaName,
                        kLanes,
                        kPairW,
                        kPairB,
                        pack_block<float>,
                        pack_block<c10::BFloat16>,
                        nhwc_rows<float>,
                        nhwc_rows<c10::BFloat16>,
                        nhwc_ring_rows<float>,
                        nhwc_ring_rows<c10::BFloat16>,
                        nchw_tasks<float>,
                        nchw_tasks<c10::BFloat16>,
#ifdef DWF_PAIRED_BF16
                        nhwc_rows<PairedBF16>,
#else
                        nullptr,
#endif
                        nhwc_rows<float, StreamedF32>,
#if DWF_HAS_LANE_PERMUTE
                        nchw_narrow_tasks<float>,
                        nchw_narrow_tasks<c10::BFloat16>};
#else
                        nullptr,
                        nullptr};
#endif
