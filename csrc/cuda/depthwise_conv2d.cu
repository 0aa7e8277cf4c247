// Depthwise conv2d on CUDA: forward, input gradient and weight gradient, NCHW and NHWC.
//
// Design
// - Forward, tuned path (NCHW): one block computes a 32x32 output tile of one (n, oc) plane.
//   It stages the input tile plus its halo ((31*s + (k-1)*d + 1)^2 values, converted to the
//   fp32/fp64 accumulation type) and the plane's k*k filter in shared memory, then each of the
//   32x8 threads produces 4 outputs down a column, so every staged value is reused k*k times
//   from shared memory and global memory sees each input byte ~(1 + halo/tile) times. For
//   k <= 5 this makes the kernel a streaming copy (target: >= 80% of copy bandwidth, bytes =
//   N*C*H*W + N*OC*Ho*Wo elements); for large k (7..31) the shared tile turns a k^2-times
//   re-read of global memory into shared-memory traffic, where PyTorch's direct kernel and
//   cuDNN fall back to slow paths. Tiles that would need more than 48 KiB of shared memory
//   (very large dilated kernels) use the plain path.
// - Plain path: one thread per output element in the output's memory order (coalesced for
//   NCHW and NHWC), computing with depthwise_output_value from common/ (the CPU code shares it).
//   NHWC always uses it: consecutive threads read consecutive channels, already coalesced.
//   CONVOPS_CUDA_IMPL=plain forces it everywhere, so a GPU session can tell a tiling bug from
//   a math bug.
// - Input gradient: a gather (one thread per input element, depthwise_input_grad_value), so
//   no atomics and a fixed summation order.
// - Weight gradient: one block per (oc, tap) reduces N*Ho*Wo products with a fixed-shape tree
//   (warp shuffles, then shared memory): deterministic, no float atomics. It re-reads the
//   plane per tap; a blocked version that stages the plane once is the next lever.
// Accumulation is in at::opmath_type (fp32 for fp16/bf16). int32 indexing is used when every
// tensor (the weight included) has fewer than INT32_MAX elements, int64 otherwise;
// CONVOPS_CUDA_INDEX=int64 forces int64 so that tests run that path on small tensors.
// Written in the device dialect (cuda/dialect.h): the emulator runs this same file.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

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
constexpr int kTileW = 32;          // threads along x = output columns per tile
constexpr int kThreadsY = 8;        // threads along y
constexpr int kRowsPerThread = 4;   // outputs per thread, down a column
constexpr int kTileH = kThreadsY * kRowsPerThread;
constexpr int64_t kMaxTiledSmem = 48 * 1024;

// Read on every call, so tests can switch paths inside one process.
bool plain_kernels_forced() { return env_is("CONVOPS_CUDA_IMPL", "plain"); }

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

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
depthwise_forward_plain(const scalar_t* __restrict__ input, const scalar_t* __restrict__ weight,
                        const scalar_t* __restrict__ bias, scalar_t* __restrict__ output,
                        Params<index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t linear = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t total = p.N * p.OC * p.Ho * p.Wo;
  if (linear >= total) return;
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
__global__ void __launch_bounds__(kTileW * kThreadsY)
depthwise_forward_tiled_nchw(const scalar_t* __restrict__ input,
                             const scalar_t* __restrict__ weight,
                             const scalar_t* __restrict__ bias, scalar_t* __restrict__ output,
                             Params<index_t> p, int tiles_w, int tiles_h, int smem_h,
                             int smem_w) {
  using acc_t = at::opmath_type<scalar_t>;
  CONVOPS_DYNAMIC_SHARED(acc_t, s_in);
  acc_t* s_w = s_in + smem_h * smem_w;

  int64_t b = blockIdx.x;
  const index_t tile_x = static_cast<index_t>(b % tiles_w); b /= tiles_w;
  const index_t tile_y = static_cast<index_t>(b % tiles_h);
  const index_t plane = static_cast<index_t>(b / tiles_h);  // n * OC + oc
  const index_t n = plane / p.OC, oc = plane % p.OC, c = oc / p.M;
  const index_t oy0 = tile_y * kTileH, ox0 = tile_x * kTileW;
  const index_t iy0 = oy0 * p.sh - p.ph, ix0 = ox0 * p.sw - p.pw;
  const scalar_t* in_plane = input + (n * p.C + c) * p.H * p.W;

  const int tid = threadIdx.y * kTileW + threadIdx.x;
  for (int i = tid; i < smem_h * smem_w; i += kTileW * kThreadsY) {
    const index_t iy = iy0 + i / smem_w, ix = ix0 + i % smem_w;
    s_in[i] = (iy >= 0 && iy < p.H && ix >= 0 && ix < p.W)
                  ? static_cast<acc_t>(in_plane[iy * p.W + ix])
                  : acc_t(0);
  }
  for (int i = tid; i < p.kh * p.kw; i += kTileW * kThreadsY)
    s_w[i] = static_cast<acc_t>(weight[oc * p.kh * p.kw + i]);
  __syncthreads();

  acc_t acc[kRowsPerThread];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) acc[r] = 0;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int ky = 0; ky < p.kh; ++ky) {
    for (int kx = 0; kx < p.kw; ++kx) {
      const acc_t wv = s_w[ky * p.kw + kx];
      const int col = tx * p.sw + kx * p.dw;
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const int row = (ty + r * kThreadsY) * p.sh + ky * p.dh;
        acc[r] += wv * s_in[row * smem_w + col];
      }
    }
  }
  const index_t ox = ox0 + tx;
  if (ox >= p.Wo) return;
  const acc_t bv = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const index_t oy = oy0 + ty + r * kThreadsY;
    if (oy < p.Ho) output[(plane * p.Ho + oy) * p.Wo + ox] = static_cast<scalar_t>(acc[r] + bv);
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
depthwise_input_grad(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ weight,
                     scalar_t* __restrict__ grad_in, Params<index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t linear = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t total = p.N * p.C * p.H * p.W;
  if (linear >= total) return;
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

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
depthwise_weight_grad(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ input,
                      scalar_t* __restrict__ grad_w, Params<index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t taps = p.kh * p.kw;
  const index_t oc = blockIdx.x / taps, tap = blockIdx.x % taps;
  const index_t ky = tap / p.kw, kx = tap % p.kw, c = oc / p.M;
  const index_t positions = p.N * p.Ho * p.Wo;
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
  if (threadIdx.x == 0) grad_w[blockIdx.x] = static_cast<scalar_t>(acc);
}

template <typename scalar_t, typename index_t>
void launch_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                    at::Tensor& out, const DepthwiseGeometry& g, bool cl) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto p = make_params<index_t>(g, cl);
  const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
  // In int64: a huge dilation must not wrap the tile size into something that looks small.
  const int64_t smem_h = (kTileH - 1) * g.sh + (g.kh - 1) * g.dh + 1;
  const int64_t smem_w = (kTileW - 1) * g.sw + (g.kw - 1) * g.dw + 1;
  const int64_t smem = (smem_h * smem_w + g.kh * g.kw) * static_cast<int64_t>(sizeof(acc_t));
  if (!cl && !plain_kernels_forced() && smem <= kMaxTiledSmem) {
    const int64_t tiles_w = (g.Wo + kTileW - 1) / kTileW;
    const int64_t tiles_h = (g.Ho + kTileH - 1) / kTileH;
    launch_kernel("depthwise_forward_tiled_nchw", depthwise_forward_tiled_nchw<scalar_t, index_t>,
                  {Dim3(g.N * g.OC * tiles_w * tiles_h), Dim3(kTileW, kThreadsY), smem,
                   kTileW * kThreadsY},
                  x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bp,
                  out.mutable_data_ptr<scalar_t>(), p, static_cast<int>(tiles_w),
                  static_cast<int>(tiles_h), static_cast<int>(smem_h), static_cast<int>(smem_w));
    return;
  }
  launch_kernel("depthwise_forward_plain", depthwise_forward_plain<scalar_t, index_t>,
                {Dim3(blocks_for(out.numel(), kThreads)), Dim3(kThreads), 0, kThreads},
                x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bp,
                out.mutable_data_ptr<scalar_t>(), p);
}

// int32 arithmetic only when every tensor fits it, unless CONVOPS_CUDA_INDEX=int64.
bool use_int32(std::initializer_list<const at::Tensor*> tensors) {
  return !env_is("CONVOPS_CUDA_INDEX", "int64") && fits_int32(tensors);
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
    if (use_int32({&x, &w, &out})) launch_forward<scalar_t, int32_t>(x, w, b, out, g, cl);
    else launch_forward<scalar_t, int64_t>(x, w, b, out, g, cl);
  });
  return out;
}

template <typename scalar_t, typename index_t>
void launch_backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w,
                     at::Tensor& grad_input, at::Tensor& grad_weight, const DepthwiseGeometry& g,
                     bool cl) {
  const auto p = make_params<index_t>(g, cl);
  if (grad_input.numel() > 0) {
    launch_kernel("depthwise_input_grad", depthwise_input_grad<scalar_t, index_t>,
                  {Dim3(blocks_for(grad_input.numel(), kThreads)), Dim3(kThreads), 0, kThreads},
                  go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                  grad_input.mutable_data_ptr<scalar_t>(), p);
  }
  if (grad_weight.numel() > 0) {
    launch_kernel("depthwise_weight_grad", depthwise_weight_grad<scalar_t, index_t>,
                  {Dim3(g.OC * g.kh * g.kw), Dim3(kThreads), 0, kThreads},
                  go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                  grad_weight.mutable_data_ptr<scalar_t>(), p);
  }
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
    if (use_int32({&x, &go, &w})) {
      launch_backward<scalar_t, int32_t>(go, x, w, grads.input, grads.weight, g, cl);
    } else {
      launch_backward<scalar_t, int64_t>(go, x, w, grads.input, grads.weight, g, cl);
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
