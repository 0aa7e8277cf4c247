// Register-blocked micro-kernels of the direct (implicit-GEMM) CPU convolution used by
// cpu/dilated_conv2d.cpp. They are written once over a five-word vector vocabulary and
// compiled once per ISA: that file includes this header (no include guard on purpose) inside a
// `#pragma GCC target` region after defining
//   DIRECT_NS         namespace of this instantiation (avx512, avx2)
//   VREG              vector register type; VLANES floats per register
//   VLOAD(p) VSTORE(p, v) VSET1(x) VZERO() VFMA(a, b, c) = a * b + c
// and DIRECT_MAX_NV / DIRECT_MAX_R (how many vectors x rows of accumulators fit the register
// file; the rest of the file holds the loaded weight vectors and one broadcast). It #undefs
// them all at its end.
//
// Both kernels keep an R x NV tile of accumulators in registers over the whole reduction, so
// each broadcast feeds NV fused multiply-adds and each vector load feeds R of them.

namespace DIRECT_NS {

constexpr int kLanes = VLANES;
constexpr int kMaxNV = DIRECT_MAX_NV;
constexpr int kMaxR = DIRECT_MAX_R;

// The step both kernels repeat: acc[r][v] += s[r * step] * (NV vectors at vec)[v], a rank-1
// update of the R x NV register tile (each broadcast feeds NV FMAs, each vector R of them).
template <int NV, int R>
inline void rank1_update(VREG (&acc)[R][NV], const float* vec, const float* s, int64_t step) {
  VREG vv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) vv[v] = VLOAD(vec + v * kLanes);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const VREG b = VSET1(s[r * step]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = VFMA(b, vv[v], acc[r][v]);
  }
}

// The R x NV tile from rows (r * row_step) of NV vectors, or to them.
template <int NV, int R>
inline void load_tile(VREG (&acc)[R][NV], const float* p, int64_t row_step) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = p ? VLOAD(p + r * row_step + v * kLanes) : VZERO();
}

template <int NV, int R>
inline void store_tile(const VREG (&acc)[R][NV], float* p, int64_t row_step) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) VSTORE(p + r * row_step + v * kLanes, acc[r][v]);
}

// out[r][v] = bias[v] + sum over the listed taps t and channels c of
// x[r * pixel_step + tap_offset[t] + c] * w[tap_weight[t] + c * NV * lanes + v * lanes + lane]:
// R output pixels of one row x NV vectors of output channels.
template <int NV, int R>
inline void forward_tile(const DirectForwardTile& a) {
  constexpr int64_t wstep = NV * kLanes;
  VREG acc[R][NV];
  load_tile<NV, R>(acc, a.bias, 0);  // every pixel starts from the bias (or zero)
  for (int64_t t = 0; t < a.taps; ++t) {
    const float* x = a.x + a.tap_offset[t];
    const float* w = a.w + a.tap_weight[t];
    for (int64_t c = 0; c < a.channels; ++c, w += wstep)
      rank1_update<NV, R>(acc, w, x + c, a.pixel_step);
  }
  store_tile<NV, R>(acc, a.y, a.y_pixel_step);
}

// dw[r][v] += sum over the chunk's pixels p of x[p][r] * dy[p][v]: R input channels x NV
// vectors of output channels of one tap, reduced over rows x cols output pixels.
template <int NV, int R>
inline void weight_grad_tile(const DirectWeightGradTile& a) {
  VREG acc[R][NV];
  load_tile<NV, R>(acc, a.dw, a.dw_row_step);
  for (int64_t row = 0; row < a.rows; ++row) {
    const float* x = a.x + row * a.x_row_step;
    const float* dy = a.dy + row * a.dy_row_step;
    for (int64_t col = 0; col < a.cols; ++col, x += a.x_pixel_step, dy += a.dy_pixel_step)
      rank1_update<NV, R>(acc, dy, x, 1);
  }
  store_tile<NV, R>(acc, a.dw, a.dw_row_step);
}

// Runtime (nv, r) -> the instantiation; tails of rows and channel blocks use smaller tiles.
template <int NV, int R>
inline void pick_forward(int r, const DirectForwardTile& a) {
  if constexpr (R > 0) {
    if (r == R) return forward_tile<NV, R>(a);
    pick_forward<NV, R - 1>(r, a);
  }
}

template <int NV, int R>
inline void pick_weight_grad(int r, const DirectWeightGradTile& a) {
  if constexpr (R > 0) {
    if (r == R) return weight_grad_tile<NV, R>(a);
    pick_weight_grad<NV, R - 1>(r, a);
  }
}

template <int NV>
inline void pick_nv(int nv, int r, const DirectForwardTile* f, const DirectWeightGradTile* wg) {
  if constexpr (NV > 0) {
    if (nv != NV) return pick_nv<NV - 1>(nv, r, f, wg);
    if (f) pick_forward<NV, kMaxR>(r, *f);
    else pick_weight_grad<NV, kMaxR>(r, *wg);
  }
}

inline void forward(int nv, int r, const DirectForwardTile& a) { pick_nv<kMaxNV>(nv, r, &a, nullptr); }
inline void weight_grad(int nv, int r, const DirectWeightGradTile& a) {
  pick_nv<kMaxNV>(nv, r, nullptr, &a);
}

}  // namespace DIRECT_NS

// The vocabulary is per inclusion: the next ISA defines its own.
#undef DIRECT_NS
#undef VREG
#undef VLANES
#undef VLOAD
#undef VSTORE
#undef VSET1
#undef VZERO
#undef VFMA
#undef DIRECT_MAX_NV
#undef DIRECT_MAX_R
