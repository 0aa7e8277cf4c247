// The depthwise forward micro-kernels, written once over a small vector vocabulary and compiled
// once per ISA: cpu/depthwise_forward.h includes this header (no include guard on purpose)
// inside a `#pragma GCC target` region, in a namespace that already defines
//   V, kLanes          the float vector type and its lane count
//   vload/vstore       for float and c10::BFloat16 (bf16 is widened / rounded in registers)
//   vfma(a, b, c)      a * b + c;  vset1(x)
//   load8/store8, transpose8  (only where kHasTranspose8: AVX2 and AVX-512)
// and kBlockW, the output pixels of one register block.

// acc[r] += w[tap] * in[ow0 + r][tap] over the valid taps of one block of R output pixels and
// one channel vector; the R accumulators stay in registers over all kh*kw taps. Checked blocks
// touch the border: per tap, pixels outside [lo[kx], hi[kx]) read nothing (no padded copy).
template <typename in_t, typename out_t, int R, bool kChecked, bool kFull>
__attribute__((always_inline)) inline void pixel_block(const DwForwardJob& j,
                                                       const in_t* const* rows, int64_t c0,
                                                       int64_t in_px, const float* w, V bias,
                                                       int64_t ow0, out_t* out, int64_t out_px,
                                                       int nch) {
  V acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = bias;
  const int64_t px_step = j.sw * in_px, tap_step = j.dw * in_px;
  for (int64_t ky = 0; ky < j.kh; ++ky) {
    const in_t* row = rows[ky];
    if (row == nullptr) continue;
    const in_t* base = row + c0 + (ow0 * j.sw - j.pw) * in_px;
    const float* wk = w + ky * j.kw * kLanes;
    for (int64_t kx = 0; kx < j.kw; ++kx) {
      const V wv = vload(wk + kx * kLanes);
      const in_t* p = base + kx * tap_step;
      if (!kChecked || (ow0 >= j.lo[kx] && ow0 + R <= j.hi[kx])) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          acc[r] = vfma(wv, kFull ? vload(p + r * px_step) : vload_part(p + r * px_step, nch),
                        acc[r]);
      } else {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          if (ow0 + r >= j.lo[kx] && ow0 + r < j.hi[kx])
            acc[r] = vfma(wv, kFull ? vload(p + r * px_step) : vload_part(p + r * px_step, nch),
                          acc[r]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (kFull) vstore(out + (ow0 + r) * out_px, acc[r]);
    else vstore_part(out + (ow0 + r) * out_px, acc[r], nch);
  }
}

template <typename in_t, typename out_t, bool kFull>
__attribute__((always_inline)) inline void pixel_blocks(const DwForwardJob& j,
                                                        const in_t* const* rows, int64_t c0,
                                                        int64_t in_px, const float* w, V bias,
                                                        int64_t ow, bool block, bool inner,
                                                        out_t* out, int64_t out_px, int nch) {
  if (inner)
    pixel_block<in_t, out_t, kBlockW, false, kFull>(j, rows, c0, in_px, w, bias, ow, out, out_px, nch);
  else if (block)
    pixel_block<in_t, out_t, kBlockW, true, kFull>(j, rows, c0, in_px, w, bias, ow, out, out_px, nch);
  else
    pixel_block<in_t, out_t, 1, true, kFull>(j, rows, c0, in_px, w, bias, ow, out, out_px, nch);
}

// One output row over `blocks` channel vectors (+ a tail of nch_tail channels): register
// blocks of kBlockW pixels along W outermost, so the few input pixels a block reads stay in L1
// while every channel vector uses them; single pixels finish a row that kBlockW does not divide.
template <typename in_t, typename out_t>
__attribute__((always_inline)) inline void conv_row(const DwForwardJob& j, const in_t* const* rows,
                                                    int64_t in_px, int64_t blocks, int nch_tail,
                                                    out_t* out, int64_t out_px) {
  const int64_t taps = j.kh * j.kw;
  for (int64_t ow = 0; ow < j.Wo;) {
    const bool block = ow + kBlockW <= j.Wo;
    const bool inner = block && ow >= j.inner_lo && ow + kBlockW <= j.inner_hi;
    for (int64_t cb = 0; cb < blocks; ++cb) {
      const V b = j.bias ? vload(j.bias + cb * kLanes) : vset1(0.f);
      pixel_blocks<in_t, out_t, true>(j, rows, cb * kLanes, in_px, j.w + cb * taps * kLanes, b, ow,
                                      block, inner, out + cb * kLanes, out_px, kLanes);
    }
    if (nch_tail) {
      const V b = j.bias ? vload(j.bias + blocks * kLanes) : vset1(0.f);
      pixel_blocks<in_t, out_t, false>(j, rows, blocks * kLanes, in_px,
                                       j.w + blocks * taps * kLanes, b, ow, block, inner,
                                       out + blocks * kLanes, out_px, nch_tail);
    }
    ow += block ? kBlockW : 1;
  }
}

// NHWC, multiplier 1: one task per output row (n, oh), reading the input rows in place.
template <typename T>
void nhwc_rows(const DwForwardJob& j, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x);
  T* y = static_cast<T*>(j.y);
  const T* rows[kDwMaxK];
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / j.Ho, oh = p % j.Ho;
    for (int64_t ky = 0; ky < j.kh; ++ky) {
      const int64_t ih = oh * j.sh - j.ph + ky * j.dh;
      rows[ky] = (ih >= 0 && ih < j.H) ? x + (n * j.H + ih) * j.W * j.C : nullptr;
    }
    conv_row<T, T>(j, rows, j.C, j.C / kLanes, static_cast<int>(j.C % kLanes),
                   y + (n * j.Ho + oh) * j.Wo * j.OC, j.OC);
  }
}

// dst[iw][l] = planes[l][iw] for iw < W, l < nch; lanes past nch are zero.
template <typename T>
inline void transpose_in(const T* const* planes, int nch, int64_t offset, int64_t W,
                         float* dst) {
  int64_t iw = 0;
#if DWF_HAS_TRANSPOSE8
  if (nch == kLanes) {
    for (; iw + 8 <= W; iw += 8)
      for (int g = 0; g < kLanes; g += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = load8(planes[g + i] + offset + iw);
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (iw + i) * kLanes + g, r[i]);
      }
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
  if (nch == kLanes) {
    for (; ow + 8 <= Wo; ow += 8)
      for (int g = 0; g < kLanes; g += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (ow + i) * kLanes + g);
        transpose8(r);
        for (int i = 0; i < 8; ++i) store8(planes[g + i] + offset + ow, r[i]);
      }
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
    DwForwardJob jb = j;  // this block's weights and bias
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

static const DwForwardIsa kIsa{kIsaName,           kLanes,
                               nhwc_rows<float>,   nhwc_rows<c10::BFloat16>,
                               nchw_tasks<float>,  nchw_tasks<c10::BFloat16>};
