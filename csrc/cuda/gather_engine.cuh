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
// Indexing is int64 throughout (simple and overflow-free; int32 is a later speed lever).
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "common/deform.h"
#include "common/engine_gemms.h"
#include "common/tensor_utils.h"

namespace convops {
namespace cuda {

constexpr int kEngineThreads = 256;
constexpr int64_t kColumnBudget = int64_t(1) << 25;  // 32 Mi elements: 128 MiB of fp32

inline unsigned int engine_blocks(int64_t total) {
  return static_cast<unsigned int>((total + kEngineThreads - 1) / kEngineThreads);
}

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
    if (atomic) gpuAtomicAdd(dst[i], v * weights[i]);
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
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = g.taps(), Cg = g.channels_per_group();
  const at::Tensor w = weight.to(acc_type).reshape({g.OC, Cg * K});
  const at::Tensor b = bias.defined() ? bias.to(acc_type).reshape({g.OC, 1}) : at::Tensor();
  const int64_t chunk = chunk_pixels(g);
  at::Tensor cols_buf = at::empty({g.C * K * chunk}, w.options());
  for (int64_t n = 0; n < g.N; ++n) {
    const auto x = image_view<scalar_t>(input, n);
    const auto sampler = make_sampler(n);
    const at::Tensor out_n = out[n].view({g.OC, g.Ho * g.Wo});
    for (int64_t p0 = 0; p0 < g.Ho * g.Wo; p0 += chunk) {
      const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);
      const at::Tensor cols = cols_buf.narrow(0, 0, g.C * K * P).view({g.C * K, P});
      gather_im2col<acc_t, scalar_t><<<engine_blocks(g.C * K * P), kEngineThreads, 0, stream>>>(
          x, sampler, g, p0, P, cols.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grouped_forward_gemm(w, b, cols, g, out_n, p0, P);
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
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
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
    const at::Tensor go_n = grad_output[n].reshape({g.OC, g.Ho * g.Wo});
    if (want_input) gi_acc.zero_();
    for (int64_t p0 = 0; p0 < g.Ho * g.Wo; p0 += chunk) {
      const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);
      const at::Tensor go_chunk = go_n.narrow(1, p0, P).to(acc_type);
      if (want_weight) {
        const at::Tensor cols = cols_buf.narrow(0, 0, g.C * K * P).view({g.C * K, P});
        gather_im2col<acc_t, scalar_t>
            <<<engine_blocks(g.C * K * P), kEngineThreads, 0, stream>>>(
                x, sampler, g, p0, P, cols.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grouped_weight_grad_gemm(gw_acc, go_chunk, cols, g);
      }
      if (!need_dcols) continue;
      const at::Tensor dcols = dcols_buf.narrow(0, 0, g.C * K * P).view({g.C * K, P});
      grouped_column_grad_gemm(dcols, w, go_chunk, g);
      if (want_sample_grads) sample_grads(x, sampler, dcols.const_data_ptr<acc_t>(), p0, P, n);
      if (want_input) {
        if (deterministic) {
          gather_col2im_ordered<acc_t><<<engine_blocks(g.C), kEngineThreads, 0, stream>>>(
              sampler, g, p0, P, dcols.const_data_ptr<acc_t>(), gi_acc.mutable_data_ptr<acc_t>());
        } else {
          gather_col2im_atomic<acc_t><<<engine_blocks(g.C * K * P), kEngineThreads, 0, stream>>>(
              sampler, g, p0, P, dcols.const_data_ptr<acc_t>(), gi_acc.mutable_data_ptr<acc_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (want_input) grad_input[n].copy_(gi_acc.view({g.C, g.H, g.W}));
  }
  if (want_weight) grad_weight.copy_(gw_acc.view(grad_weight.sizes()));
}

}  // namespace cuda
}  // namespace convops
