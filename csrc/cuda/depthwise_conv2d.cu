// Depthwise conv2d on CUDA: forward, input gradient and weight gradient, NCHW and NHWC.
//
// Tuned paths (bytes per pass are modelled in bench/model.py, `python -m bench --model`)
// - Forward NHWC (depthwise_forward_nhwc_vec): channels on the thread axis in 16-byte packs
//   (8 fp16/bf16, 4 fp32, 2 fp64 channels); each thread computes a strip of kStrip outputs along
//   W for its pack, accumulating in fp32. Along a filter row the strip's input packs form a
//   sliding window in registers (stride 1, dilation 1: kStrip + kw - 1 loads per row instead of
//   kStrip * kw); the k*k weight packs come from a (kh, kw, C) copy of the weight (k*k*C
//   elements), so every global access is a 16-byte load or store. Neighbouring strips and rows
//   re-read the halo through L1/L2, so DRAM sees each input byte about once. Needs multiplier 1,
//   C a multiple of the pack and 16-byte aligned tensors; otherwise the plain kernel runs.
// - Forward NCHW (depthwise_forward_tiled_nchw): a block stages, for `planes` (n, oc) planes at
//   once, an output tile of tile_w x tile_h plus its halo and the plane's filter in shared memory
//   (in fp32/fp64), then each thread computes kRows outputs down a column with a sliding window
//   of staged values in registers (kRows + kh - 1 shared loads per filter column instead of
//   kRows * kh at stride 1). Tile width follows the map (8, 16 or 32) and small maps put several
//   planes in one block (7x7: 32 planes of an 8x8 tile; 14x14: 8 planes of 16x16), so blocks are
//   not mostly halo. Large kernels (up to 63x63 here) use the same kernel: the input tile and the
//   filter live in shared memory and the window keeps the FMA:load ratio high. A halo too large
//   for 48 KiB shrinks the tile (plan_nchw_tile); past 8x8 outputs the plain kernel runs.
// - Input gradient, stride 1 and multiplier 1: the forward kernels above run on grad_output with
//   the filter flipped and padding (k-1)*d - p. Otherwise a gather (one thread per input
//   element, depthwise_input_grad_value): no atomics, fixed summation order.
// - Weight gradient (depthwise_weight_grad_tiled + depthwise_weight_grad_reduce): each block
//   takes a block of CB output channels and a fixed sequence of tiles (kWgRows x kWgCols output
//   pixels of one image); per tile it stages grad_output and the input tile with its halo once
//   (coalesced in either layout) and accumulates all k*k taps of its channels, each (channel,
//   tap) owned by one thread. Per-block partials (fp32/fp64) go to a buffer of G x OC x k*k
//   (G <= kMaxWgGroups, independent of the batch), which a second kernel sums in a fixed order.
//   Deterministic always, no atomics. Geometries whose staged tile exceeds 48 KiB even for one
//   channel (huge dilation or stride) use the plain kernel.
// Plain path (CONVOPS_CUDA_IMPL=plain forces it): one thread per output / input element (a full
// grid, no loop: 64-bit loop arithmetic made these spill), and one block per (oc, tap) for the
// weight gradient, computed with the common/ helpers the CPU shares.
//
// Geometry: every tile size, shared-memory size and grid dimension is computed in int64 and
// checked before launch; the tuned kernels' 1-D grids are capped at the device limit and the
// kernels loop over their blocks (CONVOPS_CUDA_MAX_GRID lowers the cap so tests run those
// loops); the plain elementwise kernels launch one thread per element, up to the limit. int32
// indexing is used when every tensor, the weight included, has fewer than INT32_MAX elements
// and strides, padding and tap reach fit too; CONVOPS_CUDA_INDEX=int64 forces int64. Written in the device dialect (cuda/dialect.h): the
// emulator runs this same file.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/depthwise.h"
#include "common/op_outputs.h"
#include "common/tensor_utils.h"
#include "cuda/dialect.h"

namespace convops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kStrip = 4;       // NHWC forward: output columns per thread
constexpr int kRows = 8;        // NCHW forward: outputs per thread, down a column
constexpr int kMaxPlanes = kThreads / 8;  // NCHW forward: planes per block (8-wide tiles)
constexpr int kWgRows = 4;      // weight gradient tile: output rows
constexpr int kWgCols = 32;     //                       output columns
constexpr int kWgTaps = 8;      // weight gradient: taps of one filter row per thread
constexpr int64_t kMaxWgGroups = 1024;     // partial sums per (oc, tap): bounds the buffer
constexpr int64_t kTargetBlocks = 528;     // 4 blocks on each of an H100's 132 SMs
constexpr int64_t kMaxSmem = 48 * 1024;
// The NCHW tile's dynamic part; its static plane table takes the rest.
constexpr int64_t kMaxTileSmem = kMaxSmem - 2 * kMaxPlanes * sizeof(int64_t);

// Read on every call, so tests can switch paths inside one process.
bool plain_kernels_forced() { return env_is("CONVOPS_CUDA_IMPL", "plain"); }

// The largest 1-D grid launched; kernels loop over the rest of their blocks.
int64_t max_grid() {
  const char* v = std::getenv("CONVOPS_CUDA_MAX_GRID");
  const int64_t forced = v != nullptr ? std::atoll(v) : 0;
  return forced > 0 ? std::min(forced, kMaxGridX) : kMaxGridX;
}

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

template <typename index_t>
struct Params {
  index_t N, C, H, W, M, OC, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  bool channels_last;
};

template <typename index_t>
Params<index_t> make_params(const DepthwiseGeometry& g, bool channels_last) {
  return {static_cast<index_t>(g.N),  static_cast<index_t>(g.C),  static_cast<index_t>(g.H),
          static_cast<index_t>(g.W),  static_cast<index_t>(g.multiplier),
          static_cast<index_t>(g.OC), static_cast<index_t>(g.kh), static_cast<index_t>(g.kw),
          static_cast<index_t>(g.sh), static_cast<index_t>(g.sw), static_cast<index_t>(g.ph),
          static_cast<index_t>(g.pw), static_cast<index_t>(g.dh), static_cast<index_t>(g.dw),
          static_cast<index_t>(g.Ho), static_cast<index_t>(g.Wo), channels_last};
}

// The input gradient at stride 1, multiplier 1, as a forward convolution: grad_output is the
// input, the filter is flipped (by the caller) and the padding becomes (k-1)*d - p.
DepthwiseGeometry flipped_geometry(const DepthwiseGeometry& g) {
  DepthwiseGeometry f = g;
  f.H = g.Ho; f.W = g.Wo; f.Ho = g.H; f.Wo = g.W;
  f.ph = flipped_tap_padding(g.kh, g.dh, g.ph);
  f.pw = flipped_tap_padding(g.kw, g.dw, g.pw);
  return f;
}

// Splits a linear index in the memory order of an (N, C, H, W) tensor stored NCHW or NHWC.
template <typename index_t>
struct Coord4 {
  index_t n, c, h, w;
};

template <typename index_t>
__device__ __forceinline__ Coord4<index_t> split_index(index_t idx, index_t C, index_t H,
                                                       index_t W, bool channels_last) {
  Coord4<index_t> r;
  if (channels_last) {
    r.c = idx % C; idx /= C;
    r.w = idx % W; idx /= W;
    r.h = idx % H; r.n = idx / H;
  } else {
    r.w = idx % W; idx /= W;
    r.h = idx % H; idx /= H;
    r.c = idx % C; r.n = idx / C;
  }
  return r;
}

// ---- plain kernels -------------------------------------------------------------------------

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
depthwise_forward_plain(const scalar_t* __restrict__ input, const scalar_t* __restrict__ weight,
                        const scalar_t* __restrict__ bias, scalar_t* __restrict__ output,
                        Params<index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t linear = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (linear >= static_cast<int64_t>(p.N) * p.OC * p.Ho * p.Wo) return;
  const index_t idx = static_cast<index_t>(linear);
  const auto o = split_index<index_t>(idx, p.OC, p.Ho, p.Wo, p.channels_last);
  const index_t c = o.c / p.M;
  const scalar_t* plane;
  index_t in_sh, in_sw;
  if (p.channels_last) {
    plane = input + o.n * p.H * p.W * p.C + c;
    in_sh = p.W * p.C;
    in_sw = p.C;
  } else {
    plane = input + (o.n * p.C + c) * p.H * p.W;
    in_sh = p.W;
    in_sw = 1;
  }
  acc_t acc = depthwise_output_value<acc_t, scalar_t, index_t>(
      plane, in_sh, in_sw, p.H, p.W, weight + o.c * p.kh * p.kw, p.kh, p.kw, o.h, o.w, p.sh,
      p.sw, p.ph, p.pw, p.dh, p.dw);
  if (bias != nullptr) acc += static_cast<acc_t>(bias[o.c]);
  output[idx] = static_cast<scalar_t>(acc);
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
depthwise_input_grad(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ weight,
                     scalar_t* __restrict__ grad_in, Params<index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t linear = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (linear >= static_cast<int64_t>(p.N) * p.C * p.H * p.W) return;
  const index_t idx = static_cast<index_t>(linear);
  const auto i = split_index<index_t>(idx, p.C, p.H, p.W, p.channels_last);
  const scalar_t* go;
  index_t go_sc, go_sh, go_sw;
  if (p.channels_last) {
    go = grad_out + i.n * p.Ho * p.Wo * p.OC + i.c * p.M;
    go_sc = 1; go_sh = p.Wo * p.OC; go_sw = p.OC;
  } else {
    go = grad_out + (i.n * p.OC + i.c * p.M) * p.Ho * p.Wo;
    go_sc = p.Ho * p.Wo; go_sh = p.Wo; go_sw = 1;
  }
  grad_in[idx] = static_cast<scalar_t>(depthwise_input_grad_value<acc_t, scalar_t, index_t>(
      go, go_sc, go_sh, go_sw, p.Ho, p.Wo, weight + i.c * p.M * p.kh * p.kw, p.M, p.kh, p.kw,
      i.h, i.w, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw));
}

// Deterministic block sum: warp shuffles, then one warp over the per-warp partials.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  CONVOPS_SHARED_ARRAY(acc_t, partial, kThreads / 32);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One block per (oc, tap): re-reads the planes k*k times; the plain reference.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
depthwise_weight_grad(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ input,
                      scalar_t* __restrict__ grad_w, Params<index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t taps = p.kh * p.kw;
  const int64_t blocks = static_cast<int64_t>(p.OC) * taps;
  for (int64_t block = blockIdx.x; block < blocks; block += gridDim.x) {
    const index_t oc = static_cast<index_t>(block / taps), tap = static_cast<index_t>(block % taps);
    const index_t ky = tap / p.kw, kx = tap % p.kw, c = oc / p.M;
    const int64_t positions = static_cast<int64_t>(p.N) * p.Ho * p.Wo;
    acc_t acc = 0;
    for (int64_t linear = threadIdx.x; linear < positions; linear += kThreads) {
      const index_t pos = static_cast<index_t>(linear);
      const index_t ow = pos % p.Wo, oh = (pos / p.Wo) % p.Ho, n = pos / (p.Wo * p.Ho);
      const index_t ih = conv_input_pos<index_t>(oh, ky, p.sh, p.ph, p.dh);
      const index_t iw = conv_input_pos<index_t>(ow, kx, p.sw, p.pw, p.dw);
      if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) continue;
      index_t go_off, in_off;
      if (p.channels_last) {
        go_off = ((n * p.Ho + oh) * p.Wo + ow) * p.OC + oc;
        in_off = ((n * p.H + ih) * p.W + iw) * p.C + c;
      } else {
        go_off = ((n * p.OC + oc) * p.Ho + oh) * p.Wo + ow;
        in_off = ((n * p.C + c) * p.H + ih) * p.W + iw;
      }
      acc += static_cast<acc_t>(grad_out[go_off]) * static_cast<acc_t>(input[in_off]);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) grad_w[block] = static_cast<scalar_t>(acc);
    __syncthreads();  // block_sum's shared partials are reused by the next block
  }
}

// ---- NHWC forward: 16-byte channel packs, a strip of outputs per thread ---------------------

template <typename scalar_t>
struct alignas(16) Pack16 {
  static constexpr int kLanes = 16 / sizeof(scalar_t);
  scalar_t v[kLanes];
};

template <typename scalar_t>
__device__ __forceinline__ Pack16<scalar_t> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack16<scalar_t>*>(p);
}

template <typename scalar_t>
__device__ __forceinline__ Pack16<scalar_t> zero_pack() {
  Pack16<scalar_t> z;
#pragma unroll
  for (int l = 0; l < Pack16<scalar_t>::kLanes; ++l) z.v[l] = scalar_t(0);
  return z;
}

// weight_hwc: the filter as (kh, kw, C) so that a pack of channels is 16 contiguous bytes.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
depthwise_forward_nhwc_vec(const scalar_t* __restrict__ input,
                           const scalar_t* __restrict__ weight_hwc,
                           const scalar_t* __restrict__ bias, scalar_t* __restrict__ output,
                           Params<index_t> p, int64_t strips, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  using Pack = Pack16<scalar_t>;
  constexpr int L = Pack::kLanes;
  const index_t packs = p.C / L;
  const bool unit_step = p.sw == 1 && p.dw == 1;
  for (int64_t linear = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       linear < total; linear += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rest = linear;
    const index_t pack = static_cast<index_t>(rest % packs); rest /= packs;
    const index_t strip = static_cast<index_t>(rest % strips); rest /= strips;
    const index_t oh = static_cast<index_t>(rest % p.Ho);
    const index_t n = static_cast<index_t>(rest / p.Ho);
    const index_t ow0 = strip * kStrip, c0 = pack * L;

    acc_t acc[kStrip][L];
#pragma unroll
    for (int l = 0; l < L; ++l) {
      const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c0 + l]) : acc_t(0);
#pragma unroll
      for (int s = 0; s < kStrip; ++s) acc[s][l] = b;
    }
    const scalar_t* image = input + n * p.H * p.W * p.C + c0;
    for (index_t ky = 0; ky < p.kh; ++ky) {
      const index_t ih = conv_input_pos<index_t>(oh, ky, p.sh, p.ph, p.dh);
      if (ih < 0 || ih >= p.H) continue;
      const scalar_t* row = image + ih * p.W * p.C;
      Pack window[kStrip];
      for (index_t kx = 0; kx < p.kw; ++kx) {
        const Pack w = load_pack(weight_hwc + (ky * p.kw + kx) * p.C + c0);
        if (kx == 0 || !unit_step) {
#pragma unroll
          for (int s = 0; s < kStrip; ++s) {
            const index_t iw = conv_input_pos<index_t>(ow0 + s, kx, p.sw, p.pw, p.dw);
            window[s] = (iw >= 0 && iw < p.W) ? load_pack(row + iw * p.C) : zero_pack<scalar_t>();
          }
        } else {  // slide by one column: only the newest pack is loaded
#pragma unroll
          for (int s = 0; s + 1 < kStrip; ++s) window[s] = window[s + 1];
          const index_t iw = conv_input_pos<index_t>(ow0 + kStrip - 1, kx, p.sw, p.pw, p.dw);
          window[kStrip - 1] =
              (iw >= 0 && iw < p.W) ? load_pack(row + iw * p.C) : zero_pack<scalar_t>();
        }
#pragma unroll
        for (int s = 0; s < kStrip; ++s)
#pragma unroll
          for (int l = 0; l < L; ++l)
            acc[s][l] += static_cast<acc_t>(w.v[l]) * static_cast<acc_t>(window[s].v[l]);
      }
    }
    scalar_t* out = output + ((n * p.Ho + oh) * p.Wo + ow0) * p.C + c0;
#pragma unroll
    for (int s = 0; s < kStrip; ++s) {
      if (ow0 + s >= p.Wo) break;
      Pack o;
#pragma unroll
      for (int l = 0; l < L; ++l) o.v[l] = static_cast<scalar_t>(acc[s][l]);
      *reinterpret_cast<Pack*>(out + s * p.C) = o;
    }
  }
}

// ---- NCHW forward: shared-memory tiles, several planes per block for small maps -------------

// Block shape and shared memory of the NCHW tile kernel for one geometry (all int64).
struct NchwTile {
  int64_t tile_w, threads_y, planes, tile_h, smem_h, smem_w, plane_floats, smem_bytes;
  int64_t tiles_w, tiles_h, blocks;
};

// Tile width follows the map (8..32), the column strips cover its height (up to 256 threads),
// spare threads take more planes; a tile whose halo outgrows shared memory (large dilation or
// stride) first drops planes, then rows, then columns.
NchwTile plan_nchw_tile(const DepthwiseGeometry& g, int64_t acc_size) {
  NchwTile t;
  const int64_t plane_count = g.N * g.OC;
  t.tile_w = std::min<int64_t>(std::max<int64_t>(next_pow2(g.Wo), 8), 32);
  t.threads_y = std::min<int64_t>(next_pow2((g.Ho + kRows - 1) / kRows), kThreads / t.tile_w);
  t.planes = std::min(kThreads / (t.tile_w * t.threads_y), next_pow2(plane_count));
  for (;;) {
    t.tile_h = t.threads_y * kRows;
    t.smem_h = (t.tile_h - 1) * g.sh + (g.kh - 1) * g.dh + 1;
    t.smem_w = (t.tile_w - 1) * g.sw + (g.kw - 1) * g.dw + 1;
    t.plane_floats = t.smem_h * t.smem_w + g.kh * g.kw;
    t.smem_bytes = t.planes * t.plane_floats * acc_size;
    if (t.smem_bytes <= kMaxTileSmem) break;
    if (t.planes > 1) t.planes /= 2;
    else if (t.threads_y > 1) t.threads_y /= 2;
    else if (t.tile_w > 8) t.tile_w /= 2;
    else break;  // does not fit: the caller takes the plain kernel
  }
  t.tiles_w = (g.Wo + t.tile_w - 1) / t.tile_w;
  t.tiles_h = (g.Ho + t.tile_h - 1) / t.tile_h;
  t.blocks = (plane_count + t.planes - 1) / t.planes * t.tiles_h * t.tiles_w;
  return t;
}

// Block (tile_w, threads_y, planes); threadIdx.z picks the plane, (x, y) the column and the
// kRows-row strip. blocks: all tiles of all plane groups (the grid may be smaller).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
depthwise_forward_tiled_nchw(const scalar_t* __restrict__ input,
                             const scalar_t* __restrict__ weight,
                             const scalar_t* __restrict__ bias, scalar_t* __restrict__ output,
                             Params<index_t> p, int64_t tiles_w, int64_t tiles_h,
                             int64_t blocks, int smem_h, int smem_w) {
  using acc_t = at::opmath_type<scalar_t>;
  CONVOPS_DYNAMIC_SHARED(acc_t, smem);
  CONVOPS_SHARED_ARRAY(index_t, plane_info, 2 * kMaxPlanes);
  const int planes = blockDim.z, area = smem_h * smem_w, taps = p.kh * p.kw;
  const int plane_floats = area + taps;
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  const int tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const int64_t plane_count = static_cast<int64_t>(p.N) * p.OC;
  const bool unit_step = p.sh == 1 && p.dh == 1;
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    // One 64-bit division per tile (in the int64 build each one is a call).
    const int64_t group = b / (tiles_w * tiles_h);
    const int tile = static_cast<int>(b - group * tiles_w * tiles_h);
    const index_t tile_x = tile % static_cast<int>(tiles_w);
    const index_t tile_y = tile / static_cast<int>(tiles_w);
    const int64_t first_plane = group * planes;
    const index_t oy0 = tile_y * static_cast<index_t>(blockDim.y * kRows);
    const index_t ox0 = tile_x * static_cast<index_t>(blockDim.x);
    const index_t iy0 = oy0 * p.sh - p.ph, ix0 = ox0 * p.sw - p.pw;

    // Each plane's input plane offset and output channel, once per block (the divisions by OC
    // stay out of the staging loop).
    if (tid < planes && first_plane + tid < plane_count) {
      const index_t plane = static_cast<index_t>(first_plane + tid);
      const index_t n = plane / p.OC, oc = plane % p.OC;
      plane_info[2 * tid] = (n * p.C + oc / p.M) * p.H * p.W;
      plane_info[2 * tid + 1] = oc;
    }
    __syncthreads();
    // Stage every plane's input tile (zero outside the image) and filter.
    for (int i = tid; i < planes * plane_floats; i += threads) {
      const int pl = i / plane_floats, j = i % plane_floats;
      if (first_plane + pl >= plane_count) continue;  // nobody reads it
      acc_t v;
      if (j < area) {
        const index_t iy = iy0 + j / smem_w, ix = ix0 + j % smem_w;
        v = (iy >= 0 && iy < p.H && ix >= 0 && ix < p.W)
                ? static_cast<acc_t>(input[plane_info[2 * pl] + iy * p.W + ix])
                : acc_t(0);
      } else {
        v = static_cast<acc_t>(weight[plane_info[2 * pl + 1] * taps + (j - area)]);
      }
      smem[i] = v;
    }
    __syncthreads();

    const index_t plane = static_cast<index_t>(first_plane + threadIdx.z);
    const index_t ox = ox0 + threadIdx.x, oy_first = oy0 + threadIdx.y * kRows;
    if (first_plane + threadIdx.z < plane_count && ox < p.Wo && oy_first < p.Ho) {
      const acc_t* s_in = smem + threadIdx.z * plane_floats;
      const acc_t* s_w = s_in + area;
      acc_t acc[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] = 0;
      const int row0 = threadIdx.y * kRows * p.sh;
      for (int kx = 0; kx < p.kw; ++kx) {
        const int col = threadIdx.x * p.sw + kx * p.dw;
        acc_t window[kRows];
        for (int ky = 0; ky < p.kh; ++ky) {
          const acc_t w = s_w[ky * p.kw + kx];
          if (ky == 0 || !unit_step) {
#pragma unroll
            for (int r = 0; r < kRows; ++r)
              window[r] = s_in[(row0 + r * p.sh + ky * p.dh) * smem_w + col];
          } else {  // slide down one row: only the newest value is loaded
#pragma unroll
            for (int r = 0; r + 1 < kRows; ++r) window[r] = window[r + 1];
            window[kRows - 1] = s_in[(row0 + kRows - 1 + ky) * smem_w + col];
          }
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r] += w * window[r];
        }
      }
      const index_t oc = plane_info[2 * threadIdx.z + 1];
      const acc_t bv = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
      scalar_t* out = output + plane * p.Ho * p.Wo + ox;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const index_t oy = oy_first + r;
        if (oy < p.Ho) out[oy * p.Wo] = static_cast<scalar_t>(acc[r] + bv);
      }
    }
    __syncthreads();  // the next tile overwrites the shared tile
  }
}

// ---- weight gradient: tiles staged once, all taps per tile, fixed-order partials ------------

struct WeightGradPlan {
  int64_t channel_block, channel_blocks, tiles_w, tiles_h, tiles, groups;
  int64_t in_h, in_w, x_stride, go_stride, smem_bytes;
  bool fits;
};

WeightGradPlan plan_weight_grad(const DepthwiseGeometry& g, int64_t acc_size) {
  WeightGradPlan w;
  w.in_h = (kWgRows - 1) * g.sh + (g.kh - 1) * g.dh + 1;
  w.in_w = (kWgCols - 1) * g.sw + (g.kw - 1) * g.dw + 1;
  w.x_stride = (w.in_h * w.in_w) | 1;       // odd plane strides: lanes on different channels
  w.go_stride = (kWgRows * kWgCols) | 1;    // fall in different shared-memory banks
  const int64_t per_channel = w.x_stride + w.go_stride + g.kh * g.kw;
  w.channel_block = 32;
  while (w.channel_block > 1 && (w.channel_block * per_channel * acc_size > kMaxSmem ||
                                 w.channel_block / 2 >= g.OC))
    w.channel_block /= 2;
  w.smem_bytes = w.channel_block * per_channel * acc_size;
  w.fits = w.smem_bytes <= kMaxSmem;
  w.channel_blocks = (g.OC + w.channel_block - 1) / w.channel_block;
  w.tiles_w = (g.Wo + kWgCols - 1) / kWgCols;
  w.tiles_h = (g.Ho + kWgRows - 1) / kWgRows;
  w.tiles = g.N * w.tiles_h * w.tiles_w;
  const int64_t wanted = (kTargetBlocks + w.channel_blocks - 1) / w.channel_blocks;
  w.groups = std::max<int64_t>(1, std::min({w.tiles, wanted, kMaxWgGroups}));
  return w;
}

// Block b: channel block b % channel_blocks, tile group b / channel_blocks, which takes tiles
// group, group + groups, ... Shared: per channel the input tile (x_stride), the grad_output
// tile (go_stride) and the running sums of its taps.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
depthwise_weight_grad_tiled(const scalar_t* __restrict__ grad_out,
                            const scalar_t* __restrict__ input,
                            at::opmath_type<scalar_t>* __restrict__ partials, Params<index_t> p,
                            int channel_block, int64_t channel_blocks, int64_t tiles_w,
                            int64_t tiles_h, int64_t groups, int in_h, int in_w, int x_stride,
                            int go_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  CONVOPS_DYNAMIC_SHARED(acc_t, smem);
  const int CB = channel_block, taps = p.kh * p.kw;
  acc_t* s_x = smem;
  acc_t* s_go = s_x + CB * x_stride;
  acc_t* s_sum = s_go + CB * go_stride;
  const int tid = threadIdx.x;
  const int64_t tiles = tiles_w * tiles_h * p.N;
  const int in_area = in_h * in_w, go_area = kWgRows * kWgCols;
  const int runs = (static_cast<int>(p.kw) + kWgTaps - 1) / kWgTaps;
  const bool unit_step = p.sw == 1 && p.dw == 1;
  for (int64_t b = blockIdx.x; b < channel_blocks * groups; b += gridDim.x) {
    const index_t oc0 = static_cast<index_t>(b % channel_blocks) * CB;
    const int64_t group = b / channel_blocks;
    for (int i = tid; i < CB * taps; i += kThreads) s_sum[i] = 0;
    for (int64_t t = group; t < tiles; t += groups) {
      const index_t tx = static_cast<index_t>(t % tiles_w);
      const index_t ty = static_cast<index_t>(t / tiles_w % tiles_h);
      const index_t n = static_cast<index_t>(t / (tiles_w * tiles_h));
      const index_t oy0 = ty * kWgRows, ox0 = tx * kWgCols;
      const index_t iy0 = oy0 * p.sh - p.ph, ix0 = ox0 * p.sw - p.pw;
      // Stage: consecutive threads read consecutive addresses (channels in NHWC, pixels in
      // NCHW). Outside the image / map the staged value is 0.
      for (int i = tid; i < CB * in_area; i += kThreads) {
        const int ch = p.channels_last ? i % CB : i / in_area;
        const int j = p.channels_last ? i / CB : i % in_area;
        const index_t oc = oc0 + ch, iy = iy0 + j / in_w, ix = ix0 + j % in_w;
        acc_t v = 0;
        if (oc < p.OC && iy >= 0 && iy < p.H && ix >= 0 && ix < p.W) {
          const index_t c = oc / p.M;
          v = static_cast<acc_t>(p.channels_last ? input[((n * p.H + iy) * p.W + ix) * p.C + c]
                                                 : input[((n * p.C + c) * p.H + iy) * p.W + ix]);
        }
        s_x[ch * x_stride + j] = v;
      }
      for (int i = tid; i < CB * go_area; i += kThreads) {
        const int ch = p.channels_last ? i % CB : i / go_area;
        const int j = p.channels_last ? i / CB : i % go_area;
        const index_t oc = oc0 + ch, oy = oy0 + j / kWgCols, ox = ox0 + j % kWgCols;
        acc_t v = 0;
        if (oc < p.OC && oy < p.Ho && ox < p.Wo)
          v = static_cast<acc_t>(p.channels_last
                                     ? grad_out[((n * p.Ho + oy) * p.Wo + ox) * p.OC + oc]
                                     : grad_out[((n * p.OC + oc) * p.Ho + oy) * p.Wo + ox]);
        s_go[ch * go_stride + j] = v;
      }
      __syncthreads();
      // A thread owns (channel, filter row, run of kWgTaps taps): a sliding window along the
      // row keeps the run's inputs in registers (stride 1, dilation 1: 2 shared loads per
      // kWgTaps multiply-adds). Each tap's sum has one owner: no races, a fixed order.
      for (int item = tid; item < CB * p.kh * runs; item += kThreads) {
        const int ch = item % CB, run = item / CB % runs, ky = item / (CB * runs);
        const int kx0 = run * kWgTaps, ntaps = static_cast<int>(p.kw) - kx0;  // >= kWgTaps: all
        const acc_t* x = s_x + ch * x_stride;
        const acc_t* go = s_go + ch * go_stride;
        // Slots past ntaps read a clamped, staged address: their sums are discarded.
        const auto x_at = [&](int offset) { return x[offset < in_area ? offset : in_area - 1]; };
        acc_t acc[kWgTaps];
#pragma unroll
        for (int j = 0; j < kWgTaps; ++j) acc[j] = 0;
        for (int r = 0; r < kWgRows; ++r) {
          const int base = (r * p.sh + ky * p.dh) * in_w + kx0 * p.dw;
          acc_t window[kWgTaps];
#pragma unroll
          for (int j = 0; j < kWgTaps; ++j) window[j] = x_at(base + j * p.dw);
          for (int col = 0; col < kWgCols; ++col) {
            if (col > 0) {
              if (unit_step) {
#pragma unroll
                for (int j = 0; j + 1 < kWgTaps; ++j) window[j] = window[j + 1];
                window[kWgTaps - 1] = x_at(base + col + kWgTaps - 1);
              } else {
#pragma unroll
                for (int j = 0; j < kWgTaps; ++j)
                  window[j] = x_at(base + col * p.sw + j * p.dw);
              }
            }
            const acc_t g = go[r * kWgCols + col];
#pragma unroll
            for (int j = 0; j < kWgTaps; ++j) acc[j] += g * window[j];
          }
        }
#pragma unroll
        for (int j = 0; j < kWgTaps; ++j)
          if (j < ntaps) s_sum[(ky * p.kw + kx0 + j) * CB + ch] += acc[j];
      }
      __syncthreads();  // the next tile overwrites the staged tiles
    }
    for (int pair = tid; pair < CB * taps; pair += kThreads) {
      const index_t oc = oc0 + pair % CB;
      if (oc < p.OC) partials[(group * p.OC + oc) * taps + pair / CB] = s_sum[pair];
    }
    __syncthreads();  // the next block's zeroing of s_sum must not overtake these reads
  }
}

// grad_weight[i] = sum over groups of partials[g][i], in group order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
depthwise_weight_grad_reduce(const at::opmath_type<scalar_t>* __restrict__ partials,
                             scalar_t* __restrict__ grad_w, int64_t count, int64_t groups) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t acc = 0;
    for (int64_t g = 0; g < groups; ++g) acc += partials[g * count + i];
    grad_w[i] = static_cast<scalar_t>(acc);
  }
}

// ---- launchers -----------------------------------------------------------------------------

int64_t grid_for(int64_t blocks) { return std::min(blocks, max_grid()); }

bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The NHWC pack kernel applies: multiplier 1, whole packs of channels, 16-byte aligned rows
// (bias is read per element and needs no alignment).
bool nhwc_vec_applies(const DepthwiseGeometry& g, int64_t elem_size,
                      std::initializer_list<const at::Tensor*> tensors) {
  if (plain_kernels_forced() || g.multiplier != 1 || (g.C * elem_size) % 16 != 0) return false;
  for (const at::Tensor* t : tensors)
    if (!aligned16(*t)) return false;
  return true;
}

// The forward of geometry g (also the flipped input gradient). weight is (OC, 1, kh, kw).
// Returns false when no tuned kernel applies (the caller runs its plain kernel).
template <typename scalar_t, typename index_t>
bool launch_tuned_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                          at::Tensor& out, const DepthwiseGeometry& g, bool cl) {
  using acc_t = at::opmath_type<scalar_t>;
  if (plain_kernels_forced()) return false;
  const auto p = make_params<index_t>(g, cl);
  const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
  if (cl) {
    // (kh, kw, C, 1); for a 1x1 filter this may alias the caller's weight (checked too).
    const at::Tensor w_hwc = w.permute({2, 3, 0, 1}).contiguous();
    if (!nhwc_vec_applies(g, sizeof(scalar_t), {&x, &w_hwc, &out})) return false;
    const int64_t strips = (g.Wo + kStrip - 1) / kStrip;
    const int64_t total = g.N * g.Ho * strips * (g.C / Pack16<scalar_t>::kLanes);
    launch_kernel("depthwise_forward_nhwc_vec", depthwise_forward_nhwc_vec<scalar_t, index_t>,
                  {Dim3(grid_for(blocks_for(total, kThreads))), Dim3(kThreads), 0, kThreads},
                  x.const_data_ptr<scalar_t>(), w_hwc.const_data_ptr<scalar_t>(), bp,
                  out.mutable_data_ptr<scalar_t>(), p, strips, total);
    return true;
  }
  const NchwTile t = plan_nchw_tile(g, sizeof(acc_t));
  // The kernel splits a block index into tiles of a plane in int.
  if (t.smem_bytes > kMaxTileSmem || t.tiles_w * t.tiles_h > INT32_MAX) return false;
  launch_kernel("depthwise_forward_tiled_nchw", depthwise_forward_tiled_nchw<scalar_t, index_t>,
                {Dim3(grid_for(t.blocks)), Dim3(t.tile_w, t.threads_y, t.planes), t.smem_bytes,
                 kThreads},
                x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bp,
                out.mutable_data_ptr<scalar_t>(), p, t.tiles_w, t.tiles_h, t.blocks,
                static_cast<int>(t.smem_h), static_cast<int>(t.smem_w));
  return true;
}

template <typename scalar_t, typename index_t>
void launch_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                    at::Tensor& out, const DepthwiseGeometry& g, bool cl) {
  if (launch_tuned_forward<scalar_t, index_t>(x, w, b, out, g, cl)) return;
  const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
  launch_kernel("depthwise_forward_plain", depthwise_forward_plain<scalar_t, index_t>,
                {Dim3(blocks_for(out.numel(), kThreads)), Dim3(kThreads), 0, kThreads},
                x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bp,
                out.mutable_data_ptr<scalar_t>(), make_params<index_t>(g, cl));
}

// int32 arithmetic only when every tensor fits it and so do the geometry's parameters and the
// farthest input position a tap reaches, unless CONVOPS_CUDA_INDEX=int64.
bool use_int32(const DepthwiseGeometry& g, std::initializer_list<const at::Tensor*> tensors) {
  const int64_t limit = INT32_MAX / 2;  // room for the sums the kernels form
  const bool geometry_fits =
      (g.Ho - 1) * g.sh + (g.kh - 1) * g.dh <= limit &&
      (g.Wo - 1) * g.sw + (g.kw - 1) * g.dw <= limit && g.sh <= limit && g.sw <= limit && g.ph <= limit && g.pw <= limit;
  return !env_is("CONVOPS_CUDA_INDEX", "int64") && geometry_fits && fits_int32(tensors);
}

at::Tensor depthwise_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DepthwiseGeometry g = depthwise_geometry(input, weight, bias, stride, padding, dilation);
  const DeviceGuard guard(input.device());
  const bool cl = prefers_channels_last(input);
  const at::Tensor x = input.contiguous(layout_of(cl));
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  at::Tensor out = new_conv_output(input, g.N, g.OC, g.Ho, g.Wo);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "depthwise_conv2d_cuda", [&] {
    if (use_int32(g, {&x, &w, &out})) launch_forward<scalar_t, int32_t>(x, w, b, out, g, cl);
    else launch_forward<scalar_t, int64_t>(x, w, b, out, g, cl);
  });
  return out;
}

template <typename scalar_t, typename index_t>
void launch_input_grad(const at::Tensor& go, const at::Tensor& w, at::Tensor& grad_input,
                       const DepthwiseGeometry& g, bool cl) {
  if (g.sh == 1 && g.sw == 1 && g.multiplier == 1) {
    const at::Tensor flipped = w.flip({2, 3}).contiguous();
    if (launch_tuned_forward<scalar_t, index_t>(go, flipped, at::Tensor(), grad_input,
                                                flipped_geometry(g), cl))
      return;
  }
  launch_kernel("depthwise_input_grad", depthwise_input_grad<scalar_t, index_t>,
                {Dim3(blocks_for(grad_input.numel(), kThreads)), Dim3(kThreads), 0, kThreads},
                go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                grad_input.mutable_data_ptr<scalar_t>(), make_params<index_t>(g, cl));
}

template <typename scalar_t, typename index_t>
void launch_weight_grad(const at::Tensor& go, const at::Tensor& x, at::Tensor& grad_weight,
                        const DepthwiseGeometry& g, bool cl) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto p = make_params<index_t>(g, cl);
  const WeightGradPlan plan = plan_weight_grad(g, sizeof(acc_t));
  if (plain_kernels_forced() || !plan.fits) {
    launch_kernel("depthwise_weight_grad", depthwise_weight_grad<scalar_t, index_t>,
                  {Dim3(grid_for(g.OC * g.kh * g.kw)), Dim3(kThreads), 0, kThreads},
                  go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                  grad_weight.mutable_data_ptr<scalar_t>(), p);
    return;
  }
  const int64_t count = g.OC * g.kh * g.kw;
  at::Tensor partials = at::empty({plan.groups, count},
                                  x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  launch_kernel("depthwise_weight_grad_tiled", depthwise_weight_grad_tiled<scalar_t, index_t>,
                {Dim3(grid_for(plan.channel_blocks * plan.groups)), Dim3(kThreads),
                 plan.smem_bytes, kThreads},
                go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                partials.mutable_data_ptr<acc_t>(), p, static_cast<int>(plan.channel_block),
                plan.channel_blocks, plan.tiles_w, plan.tiles_h, plan.groups,
                static_cast<int>(plan.in_h), static_cast<int>(plan.in_w),
                static_cast<int>(plan.x_stride), static_cast<int>(plan.go_stride));
  launch_kernel("depthwise_weight_grad_reduce", depthwise_weight_grad_reduce<scalar_t>,
                {Dim3(grid_for(blocks_for(count, kThreads))), Dim3(kThreads), 0, kThreads},
                partials.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
                count, plan.groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 3> output_mask) {
  const DepthwiseGeometry g = depthwise_geometry(input, weight, c10::nullopt, stride, padding,
                                                 dilation);
  check_grad_output(grad_output, input, g.N, g.OC, g.Ho, g.Wo, "depthwise_conv2d");
  const DeviceGuard guard(input.device());
  const bool cl = prefers_channels_last(input);
  const at::Tensor x = input.contiguous(layout_of(cl));
  const at::Tensor go = grad_output.contiguous(layout_of(cl));
  const at::Tensor w = weight.contiguous();
  ConvGrads grads = new_conv_grads(go, input, weight, output_mask);
  if (g.N == 0) return {grads.input, grads.weight, grads.bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "depthwise_conv2d_backward_cuda", [&] {
    const bool i32 = use_int32(g, {&x, &go, &w});
    if (grads.input.numel() > 0) {
      if (i32) launch_input_grad<scalar_t, int32_t>(go, w, grads.input, g, cl);
      else launch_input_grad<scalar_t, int64_t>(go, w, grads.input, g, cl);
    }
    if (grads.weight.numel() > 0) {
      if (i32) launch_weight_grad<scalar_t, int32_t>(go, x, grads.weight, g, cl);
      else launch_weight_grad<scalar_t, int64_t>(go, x, grads.weight, g, cl);
    }
  });
  return {grads.input, grads.weight, grads.bias};
}

}  // namespace

CONVOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_cuda);
  m.impl("depthwise_conv2d_backward", &depthwise_conv2d_backward_cuda);
}

}  // namespace cuda
}  // namespace convops
