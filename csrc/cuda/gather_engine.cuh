// The CUDA gather engine shared by deformable and dilated convolution: the same algorithm as
// cpu/gather_engine.h, with a Sampler (common/deform.h: bilinear, common/dilated.h: integer
// grid) deciding where each (group, tap, pixel) reads.
//
// Per image and chunk of P output pixels (K = kh*kw taps, C channels):
// - im2col: one thread per (c, tap, pixel) computes its sample (offsets/mask are re-read by the
//   C/og channels of a group, from L1/L2) and writes cols[c*K + tap][p] in fp32 (fp64 for
//   double): ~4*C*K*P input reads (mostly cached), C*K*P column writes.
// - out[g] = W[g] @ cols[g] with cuBLAS (at::mm): 2*OC*(C/groups)*K*P FLOPs.
// - backward: dcols[g] = W[g]^T @ grad_out[g]; dW[g] += grad_out[g] @ cols[g]^T; the input
//   gradient scatters dcols through the samples - float atomics into an fp32 image buffer by
//   default, or, when torch.are_deterministic_algorithms_enabled(), one thread per channel
//   walking its taps and pixels in a fixed order (bit-reproducible, parallel over C only).
// Chunks hold at most kColumnBudget column elements, so extra memory (columns, their gradient,
// one fp32 image of input gradient) is bounded independently of N.
// Matrix products: cuBLAS (at::mm), except under torch.use_deterministic_algorithms(True),
// where cuBLAS raises unless CUBLAS_WORKSPACE_CONFIG is set (F.conv2d does not ask that of its
// users): there tiled_gemm below, a plain shared-memory GEMM with a fixed summation order.
// Indexing is int64 throughout (simple and overflow-free; int32 is a later speed lever).
// Written in the device dialect (cuda/dialect.h): the emulator runs this same file.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>

#include "common/deform.h"
#include "common/engine_gemms.h"
#include "common/tensor_utils.h"
#include "cuda/dialect.h"

namespace convops {
namespace cuda {

constexpr int kEngineThreads = 256;
constexpr int64_t kColumnBudget = int64_t(1) << 25;  // 32 Mi elements: 128 MiB of fp32

// A 1-D launch of one thread per item.
inline LaunchConfig engine_launch(int64_t items) {
  return {Dim3(blocks_for(items, kEngineThreads)), Dim3(kEngineThreads), 0, kEngineThreads};
}

// C (+)= A @ B (+ bias[m]) through strides, one 16x16 tile of C per block, K in slices of 16
// staged in shared memory; each C element sums its K products in increasing k: deterministic.
constexpr int kGemmTile = 16;

template <typename acc_t>
struct GemmArgs {
  const acc_t* a;
  int64_t a_sm, a_sk;
  const acc_t* b;
  int64_t b_sk, b_sn;
  acc_t* c;
  int64_t c_sm, c_sn;
  const acc_t* bias;  // (M,) with stride bias_s, or nullptr
  int64_t bias_s;
  int64_t M, N, K;
  bool accumulate;
};

template <typename acc_t>
__global__ void __launch_bounds__(kGemmTile * kGemmTile) tiled_gemm(GemmArgs<acc_t> g) {
  CONVOPS_SHARED_ARRAY(acc_t, a_tile, kGemmTile * kGemmTile);
  CONVOPS_SHARED_ARRAY(acc_t, b_tile, kGemmTile * kGemmTile);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m = static_cast<int64_t>(blockIdx.y) * kGemmTile + ty;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemmTile + tx;
  acc_t acc = 0;
  for (int64_t k0 = 0; k0 < g.K; k0 += kGemmTile) {
    const int64_t ka = k0 + tx, kb = k0 + ty;
    a_tile[ty * kGemmTile + tx] = (m < g.M && ka < g.K) ? g.a[m * g.a_sm + ka * g.a_sk] : acc_t(0);
    b_tile[ty * kGemmTile + tx] = (kb < g.K && n < g.N) ? g.b[kb * g.b_sk + n * g.b_sn] : acc_t(0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kGemmTile; ++k) acc += a_tile[ty * kGemmTile + k] * b_tile[k * kGemmTile + tx];
    __syncthreads();
  }
  if (m >= g.M || n >= g.N) return;
  acc_t* out = g.c + m * g.c_sm + n * g.c_sn;
  if (g.bias != nullptr) acc += g.bias[m * g.bias_s];
  *out = g.accumulate ? *out + acc : acc;
}

// The engines' matrix product (common/engine_gemms.h): cuBLAS, or tiled_gemm when
// deterministic algorithms are required.
struct EngineMatmul {
  bool deterministic;

  void operator()(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& bias, bool accumulate) const {
    if (!deterministic) {
      AtenMatmul()(out, a, b, bias, accumulate);
      return;
    }
    if (out.scalar_type() != a.scalar_type()) {  // e.g. a half output: GEMM in fp32, then round
      TORCH_CHECK(!accumulate, "convops: accumulating GEMM into another dtype");
      const at::Tensor staged = at::empty(out.sizes(), a.options());
      (*this)(staged, a, b, bias, false);
      const_cast<at::Tensor&>(out).copy_(staged);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "convops_tiled_gemm", [&] {
      GemmArgs<scalar_t> args{a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1),
                              b.const_data_ptr<scalar_t>(), b.stride(0), b.stride(1),
                              const_cast<at::Tensor&>(out).mutable_data_ptr<scalar_t>(),
                              out.stride(0), out.stride(1),
                              bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                              bias.defined() ? bias.stride(0) : 0,
                              out.size(0), out.size(1), a.size(1), accumulate};
      launch_kernel("tiled_gemm", tiled_gemm<scalar_t>,
                    {Dim3(blocks_for(args.N, kGemmTile), blocks_for(args.M, kGemmTile)),
                     Dim3(kGemmTile, kGemmTile), 0, kGemmTile * kGemmTile},
                    args);
    });
  }
};

inline int64_t chunk_pixels(const DeformGeometry& g) {
  return std::max<int64_t>(
      1, std::min<int64_t>(g.Ho * g.Wo, column_budget(kColumnBudget) / (g.C * g.taps())));
}

// Strides of one image of an (N, C, H, W) input.
template <typename scalar_t>
struct ImageView {
  const scalar_t* data;
  int64_t sc, sy, sx;
};

template <typename scalar_t>
ImageView<scalar_t> image_view(const at::Tensor& t, int64_t n) {
  return {t.const_data_ptr<scalar_t>() + n * t.stride(0), t.stride(1), t.stride(2),
          t.stride(3)};
}

template <typename acc_t, typename scalar_t, typename Sampler>
__global__ void __launch_bounds__(kEngineThreads)
gather_im2col(ImageView<scalar_t> x, Sampler sampler, DeformGeometry g, int64_t p0, int64_t P,
              acc_t* __restrict__ cols) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t K = g.kh * g.kw;
  if (idx >= g.C * K * P) return;
  const int64_t p = idx % P, row = idx / P, tap = row % K, c = row / K;
  const int64_t og = c / (g.C / g.offset_groups), pix = p0 + p;
  acc_t m;
  const auto s = sampler.sample(og, tap, pix / g.Wo, pix % g.Wo, &m);
  cols[idx] = m * sample_value<acc_t, scalar_t, int64_t>(x.data + c * x.sc, x.sy, x.sx, s);
}

template <typename acc_t>
__device__ __forceinline__ void scatter_sample(acc_t* plane, int64_t W,
                                               const Sample<acc_t, int64_t>& s, acc_t v,
                                               bool atomic) {
  if (!s.inside) return;
  acc_t* q = plane + s.y0 * W + s.x0;
  acc_t* dst[4] = {q, q + 1, q + W, q + W + 1};
  const acc_t weights[4] = {s.w00, s.w01, s.w10, s.w11};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (weights[i] == acc_t(0)) continue;
    if (atomic) atomic_add(dst[i], v * weights[i]);
    else *dst[i] += v * weights[i];
  }
}

// Fast path: one thread per (c, tap, pixel), float atomics.
template <typename acc_t, typename Sampler>
__global__ void __launch_bounds__(kEngineThreads)
gather_col2im_atomic(Sampler sampler, DeformGeometry g, int64_t p0, int64_t P,
                     const acc_t* __restrict__ dcols, acc_t* __restrict__ grad_in) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t K = g.kh * g.kw;
  if (idx >= g.C * K * P) return;
  const int64_t p = idx % P, row = idx / P, tap = row % K, c = row / K;
  const int64_t og = c / (g.C / g.offset_groups), pix = p0 + p;
  acc_t m;
  const auto s = sampler.sample(og, tap, pix / g.Wo, pix % g.Wo, &m);
  scatter_sample<acc_t>(grad_in + c * g.H * g.W, g.W, s, dcols[idx] * m, true);
}

// Deterministic path: one thread per channel, fixed order over taps and pixels.
template <typename acc_t, typename Sampler>
__global__ void __launch_bounds__(kEngineThreads)
gather_col2im_ordered(Sampler sampler, DeformGeometry g, int64_t p0, int64_t P,
                      const acc_t* __restrict__ dcols, acc_t* __restrict__ grad_in) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  const int64_t K = g.kh * g.kw, og = c / (g.C / g.offset_groups);
  for (int64_t tap = 0; tap < K; ++tap) {
    for (int64_t p = 0; p < P; ++p) {
      const int64_t pix = p0 + p;
      acc_t m;
      const auto s = sampler.sample(og, tap, pix / g.Wo, pix % g.Wo, &m);
      scatter_sample<acc_t>(grad_in + c * g.H * g.W, g.W, s, dcols[(c * K + tap) * P + p] * m,
                            false);
    }
  }
}

template <typename scalar_t, typename MakeSampler>
void engine_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    const DeformGeometry& g, const MakeSampler& make_sampler, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const EngineMatmul mm{at::globalContext().deterministicAlgorithms()};
  const int64_t K = g.taps(), Cg = g.channels_per_group();
  const at::Tensor w = weight.to(acc_type).reshape({g.OC, Cg * K});
  const at::Tensor b = bias.defined() ? bias.to(acc_type).reshape({g.OC, 1}) : at::Tensor();
  const int64_t chunk = chunk_pixels(g);
  at::Tensor cols_buf = at::empty({g.C * K * chunk}, w.options());
  for (int64_t n = 0; n < g.N; ++n) {
    const auto x = image_view<scalar_t>(input, n);
    const auto sampler = make_sampler(n);
    using Sampler = std::decay_t<decltype(sampler)>;
    const at::Tensor out_n = out[n].view({g.OC, g.Ho * g.Wo});
    for (int64_t p0 = 0; p0 < g.Ho * g.Wo; p0 += chunk) {
      const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);
      const at::Tensor cols = cols_buf.narrow(0, 0, g.C * K * P).view({g.C * K, P});
      launch_kernel("gather_im2col", gather_im2col<acc_t, scalar_t, Sampler>,
                    engine_launch(g.C * K * P), x, sampler, g, p0, P,
                    cols.mutable_data_ptr<acc_t>());
      grouped_forward_gemm(mm, w, b, cols, g, out_n, p0, P);
    }
  }
}

// See cpu/gather_engine.h: grad_weight (numel > 0 when wanted) is overwritten;
// sample_grads(x, sampler, dcols, p0, P, n) runs per chunk when want_sample_grads.
template <typename scalar_t, typename MakeSampler, typename SampleGrads>
void engine_backward(const at::Tensor& grad_output, const at::Tensor& input,
                     const at::Tensor& weight, const DeformGeometry& g,
                     const MakeSampler& make_sampler, bool want_sample_grads,
                     const SampleGrads& sample_grads, at::Tensor& grad_input,
                     at::Tensor& grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const EngineMatmul mm{deterministic};
  const bool want_input = grad_input.numel() > 0, want_weight = grad_weight.numel() > 0;
  const bool need_dcols = want_input || want_sample_grads;
  const int64_t K = g.taps(), Cg = g.channels_per_group();
  const at::Tensor w = weight.to(acc_type).reshape({g.OC, Cg * K});
  at::Tensor gw_acc = want_weight ? at::zeros({g.OC, Cg * K}, w.options()) : at::Tensor();
  const int64_t chunk = chunk_pixels(g);
  at::Tensor cols_buf = at::empty({want_weight ? g.C * K * chunk : 0}, w.options());
  at::Tensor dcols_buf = at::empty({need_dcols ? g.C * K * chunk : 0}, w.options());
  at::Tensor gi_acc = at::empty({want_input ? g.C * g.H * g.W : 0}, w.options());
  for (int64_t n = 0; n < g.N; ++n) {
    const auto x = image_view<scalar_t>(input, n);
    const auto sampler = make_sampler(n);
    using Sampler = std::decay_t<decltype(sampler)>;
    const at::Tensor go_n = grad_output[n].reshape({g.OC, g.Ho * g.Wo});
    if (want_input) gi_acc.zero_();
    for (int64_t p0 = 0; p0 < g.Ho * g.Wo; p0 += chunk) {
      const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);
      const at::Tensor go_chunk = go_n.narrow(1, p0, P).to(acc_type);
      if (want_weight) {
        const at::Tensor cols = cols_buf.narrow(0, 0, g.C * K * P).view({g.C * K, P});
        launch_kernel("gather_im2col", gather_im2col<acc_t, scalar_t, Sampler>,
                      engine_launch(g.C * K * P), x, sampler, g, p0, P,
                      cols.mutable_data_ptr<acc_t>());
        grouped_weight_grad_gemm(mm, gw_acc, go_chunk, cols, g);
      }
      if (!need_dcols) continue;
      const at::Tensor dcols = dcols_buf.narrow(0, 0, g.C * K * P).view({g.C * K, P});
      grouped_column_grad_gemm(mm, dcols, w, go_chunk, g);
      if (want_sample_grads) sample_grads(x, sampler, dcols.const_data_ptr<acc_t>(), p0, P, n);
      if (want_input) {
        if (deterministic) {
          launch_kernel("gather_col2im_ordered", gather_col2im_ordered<acc_t, Sampler>,
                        engine_launch(g.C), sampler, g, p0, P, dcols.const_data_ptr<acc_t>(),
                        gi_acc.mutable_data_ptr<acc_t>());
        } else {
          launch_kernel("gather_col2im_atomic", gather_col2im_atomic<acc_t, Sampler>,
                        engine_launch(g.C * K * P), sampler, g, p0, P,
                        dcols.const_data_ptr<acc_t>(), gi_acc.mutable_data_ptr<acc_t>());
        }
      }
    }
    if (want_input) grad_input[n].copy_(gi_acc.view({g.C, g.H, g.W}));
  }
  if (want_weight) grad_weight.copy_(gw_acc.view(grad_weight.sizes()));
}

}  // namespace cuda
}  // namespace convops
