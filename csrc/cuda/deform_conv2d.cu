// Deformable convolution (DCNv1/v2) on CUDA: the gather engine of cpu/gather_engine.h with the
// same bilinear sampler (common/deform.h, common/bilinear.h), columns in fp32 (fp64 for
// double) and cuBLAS (at::mm) for the weight matrix products.
//
// Design and traffic, per image and chunk of P output pixels (K = kh*kw taps, C channels):
// - im2col: one thread per (c, tap, pixel) computes the sample (offset/mask reads are shared
//   by the C/og channels of a group through L1/L2) and writes cols[c*K + tap][p]:
//   reads ~4*C*K*P input values (mostly cached), writes C*K*P fp32.
// - out[g] = W[g] @ cols[g]: 2*OC*(C/groups)*K*P FLOPs on tensor cores via cuBLAS.
// - backward: dcols[g] = W[g]^T @ grad_out[g]; dW[g] += grad_out[g] @ cols[g]^T; the offset and
//   mask gradients take one thread per (offset group, tap, pixel) that sums over its channels
//   (no atomics); the input gradient scatters dcols through the samples, with float atomics
//   into an fp32 image buffer by default, or - when torch.are_deterministic_algorithms_enabled()
//   - one thread per channel walking its taps and pixels in a fixed order (bit-reproducible,
//   slower: parallel over C only).
// Chunks hold at most kColumnBudget column elements, so extra memory is bounded independently
// of N (columns + their gradient + one fp32 image of input gradient).
// Toward the goal (3x torchvision fwd+bwd at ResNet-50-DCN shapes in fp16/bf16): fuse the
// sampling into the GEMM's B-operand load (no columns round trip: saves 2*C*K*P*4 bytes per
// pass), bf16 columns for tensor-core MMA, int32 indexing. Not done yet: never run on a GPU.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/deform.h"
#include "common/tensor_utils.h"

namespace convops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kColumnBudget = int64_t(1) << 25;  // 32 Mi elements: 128 MiB of fp32

inline unsigned int blocks_for(int64_t total) {
  return static_cast<unsigned int>((total + kThreads - 1) / kThreads);
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

template <typename acc_t, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
deform_im2col(ImageView<scalar_t> x, DeformSampler<acc_t, scalar_t, int64_t> sampler,
              DeformGeometry g, int64_t p0, int64_t P, acc_t* __restrict__ cols) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t K = g.kh * g.kw;
  if (idx >= g.C * K * P) return;
  const int64_t p = idx % P, row = idx / P, tap = row % K, c = row / K;
  const int64_t og = c / (g.C / g.offset_groups), pix = p0 + p;
  acc_t m;
  const auto s = sampler.sample(og, tap, pix / g.Wo, pix % g.Wo, &m);
  cols[idx] = m * sample_value<acc_t, scalar_t, int64_t>(x.data + c * x.sc, x.sy, x.sx, s);
}

template <typename acc_t, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
deform_offset_mask_grad(ImageView<scalar_t> x, DeformSampler<acc_t, scalar_t, int64_t> sampler,
                        DeformGeometry g, int64_t p0, int64_t P,
                        const acc_t* __restrict__ dcols, scalar_t* __restrict__ grad_offset,
                        scalar_t* __restrict__ grad_mask) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t K = g.kh * g.kw;
  if (idx >= g.offset_groups * K * P) return;
  const int64_t p = idx % P, row = idx / P, tap = row % K, og = row / K, pix = p0 + p;
  const int64_t cpo = g.C / g.offset_groups, HWo = g.Ho * g.Wo;
  acc_t m;
  const auto s = sampler.sample(og, tap, pix / g.Wo, pix % g.Wo, &m);
  acc_t gy = 0, gx = 0, gm = 0;
  if (s.inside) {
    for (int64_t c = og * cpo; c < (og + 1) * cpo; ++c)
      deform_sample_grad_term<acc_t, scalar_t, int64_t>(x.data + c * x.sc, x.sy, x.sx, g.H,
                                                        g.W, s, dcols[(c * K + tap) * P + p],
                                                        &gy, &gx, &gm);
  }
  if (grad_offset != nullptr) {
    grad_offset[(2 * row) * HWo + pix] = static_cast<scalar_t>(gy * m);
    grad_offset[(2 * row + 1) * HWo + pix] = static_cast<scalar_t>(gx * m);
  }
  if (grad_mask != nullptr) grad_mask[row * HWo + pix] = static_cast<scalar_t>(gm);
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void scatter_sample(acc_t* plane, int64_t W,
                                               const Sample<acc_t, int64_t>& s, acc_t v,
                                               bool atomic) {
  if (!s.inside) return;
  acc_t* q = plane + s.y0 * W + s.x0;
  const acc_t parts[4] = {v * s.w00, v * s.w01, v * s.w10, v * s.w11};
  acc_t* dst[4] = {q, q + 1, q + W, q + W + 1};
  const acc_t weights[4] = {s.w00, s.w01, s.w10, s.w11};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (weights[i] == acc_t(0)) continue;
    if (atomic) gpuAtomicAdd(dst[i], parts[i]);
    else *dst[i] += parts[i];
  }
}

// Fast path: one thread per (c, tap, pixel), float atomics.
template <typename acc_t, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
deform_col2im_atomic(DeformSampler<acc_t, scalar_t, int64_t> sampler, DeformGeometry g,
                     int64_t p0, int64_t P, const acc_t* __restrict__ dcols,
                     acc_t* __restrict__ grad_in) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t K = g.kh * g.kw;
  if (idx >= g.C * K * P) return;
  const int64_t p = idx % P, row = idx / P, tap = row % K, c = row / K;
  const int64_t og = c / (g.C / g.offset_groups), pix = p0 + p;
  acc_t m;
  const auto s = sampler.sample(og, tap, pix / g.Wo, pix % g.Wo, &m);
  scatter_sample<acc_t, scalar_t>(grad_in + c * g.H * g.W, g.W, s, dcols[idx] * m, true);
}

// Deterministic path: one thread per channel, fixed order over taps and pixels.
template <typename acc_t, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
deform_col2im_ordered(DeformSampler<acc_t, scalar_t, int64_t> sampler, DeformGeometry g,
                      int64_t p0, int64_t P, const acc_t* __restrict__ dcols,
                      acc_t* __restrict__ grad_in) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  const int64_t K = g.kh * g.kw, og = c / (g.C / g.offset_groups);
  for (int64_t tap = 0; tap < K; ++tap) {
    for (int64_t p = 0; p < P; ++p) {
      const int64_t pix = p0 + p;
      acc_t m;
      const auto s = sampler.sample(og, tap, pix / g.Wo, pix % g.Wo, &m);
      scatter_sample<acc_t, scalar_t>(grad_in + c * g.H * g.W, g.W, s,
                                      dcols[(c * K + tap) * P + p] * m, false);
    }
  }
}

int64_t chunk_pixels(const DeformGeometry& g) {
  return std::max<int64_t>(1, std::min<int64_t>(g.Ho * g.Wo, kColumnBudget / (g.C * g.taps())));
}

at::Tensor deform_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformGeometry g =
      deform_geometry(input, weight, offset, mask, bias, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool cl = prefers_channels_last(input);
  at::Tensor out = at::empty({g.N, g.OC, g.Ho, g.Wo}, input.options(), layout_of(cl));
  if (out.numel() == 0) return out;
  poison_for_tests(out);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const int64_t K = g.taps(), Cg = g.channels_per_group(), OCg = g.out_channels_per_group();
    const at::Tensor w = weight.to(acc_type).reshape({g.OC, Cg * K});
    const at::Tensor b = (bias.has_value() && bias->defined())
                             ? bias->to(acc_type).reshape({g.OC, 1}) : at::Tensor();
    const int64_t chunk = chunk_pixels(g);
    at::Tensor cols_buf = at::empty({g.C * K * chunk}, w.options());
    for (int64_t n = 0; n < g.N; ++n) {
      const auto x = image_view<scalar_t>(input, n);
      const auto sampler = deform_sampler<acc_t, scalar_t>(offset, mask, n, g);
      const at::Tensor out_n = out[n].view({g.OC, g.Ho * g.Wo});
      for (int64_t p0 = 0; p0 < g.Ho * g.Wo; p0 += chunk) {
        const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);
        const at::Tensor cols = cols_buf.narrow(0, 0, g.C * K * P).view({g.C * K, P});
        deform_im2col<acc_t, scalar_t><<<blocks_for(g.C * K * P), kThreads, 0, stream>>>(
            x, sampler, g, p0, P, cols.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const at::Tensor wg = w.narrow(0, grp * OCg, OCg);
          const at::Tensor cg = cols.narrow(0, grp * Cg * K, Cg * K);
          const at::Tensor res = b.defined() ? at::addmm(b.narrow(0, grp * OCg, OCg), wg, cg)
                                             : at::mm(wg, cg);
          out_n.narrow(0, grp * OCg, OCg).narrow(1, p0, P).copy_(res);
        }
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
deform_conv2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                            const at::Tensor& weight, const at::Tensor& offset,
                            const c10::optional<at::Tensor>& mask, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation,
                            std::array<bool, 5> output_mask) {
  const DeformGeometry g =
      deform_geometry(input, weight, offset, mask, c10::nullopt, stride, padding, dilation);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.N, g.OC, g.Ho, g.Wo}),
              "convops.deform_conv2d_backward: grad_output must be ",
              at::IntArrayRef({g.N, g.OC, g.Ho, g.Wo}), ", got ", grad_output.sizes());
  check_same(grad_output, input, "grad_output");
  const c10::cuda::CUDAGuard guard(input.device());
  const bool want_input = output_mask[0], want_weight = output_mask[1];
  const bool want_offset = output_mask[2], want_mask = output_mask[3] && g.has_mask;
  const bool cl = prefers_channels_last(input);
  at::Tensor grad_input = want_input ? at::empty_like(input, layout_of(cl))
                                     : not_requested(input);
  at::Tensor grad_weight = want_weight ? at::zeros_like(weight, at::MemoryFormat::Contiguous)
                                       : not_requested(weight);
  at::Tensor grad_offset = want_offset ? at::empty_like(offset, at::MemoryFormat::Contiguous)
                                       : not_requested(offset);
  at::Tensor grad_mask = want_mask ? at::empty_like(*mask, at::MemoryFormat::Contiguous)
                                   : not_requested(offset);
  at::Tensor grad_bias = output_mask[4] ? grad_output.sum({0, 2, 3}) : not_requested(weight);
  poison_for_tests(grad_input);
  poison_for_tests(grad_offset);
  poison_for_tests(grad_mask);
  const bool need_dcols = want_input || want_offset || want_mask;
  if (g.N == 0 || !(need_dcols || want_weight)) {
    return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
  }
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_conv2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const int64_t K = g.taps(), Cg = g.channels_per_group(), OCg = g.out_channels_per_group();
    const at::Tensor w = weight.to(acc_type).reshape({g.OC, Cg * K});
    at::Tensor gw_acc = want_weight ? at::zeros({g.OC, Cg * K}, w.options()) : at::Tensor();
    const int64_t chunk = chunk_pixels(g);
    at::Tensor cols_buf = at::empty({want_weight ? g.C * K * chunk : 0}, w.options());
    at::Tensor dcols_buf = at::empty({need_dcols ? g.C * K * chunk : 0}, w.options());
    at::Tensor gi_acc = at::empty({want_input ? g.C * g.H * g.W : 0}, w.options());
    for (int64_t n = 0; n < g.N; ++n) {
      const auto x = image_view<scalar_t>(input, n);
      const auto sampler = deform_sampler<acc_t, scalar_t>(offset, mask, n, g);
      const at::Tensor go_n = grad_output[n].reshape({g.OC, g.Ho * g.Wo});
      if (want_input) gi_acc.zero_();
      for (int64_t p0 = 0; p0 < g.Ho * g.Wo; p0 += chunk) {
        const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);
        const at::Tensor go_chunk = go_n.narrow(1, p0, P).to(acc_type);
        if (want_weight) {
          const at::Tensor cols = cols_buf.narrow(0, 0, g.C * K * P).view({g.C * K, P});
          deform_im2col<acc_t, scalar_t><<<blocks_for(g.C * K * P), kThreads, 0, stream>>>(
              x, sampler, g, p0, P, cols.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            gw_acc.narrow(0, grp * OCg, OCg)
                .addmm_(go_chunk.narrow(0, grp * OCg, OCg),
                        cols.narrow(0, grp * Cg * K, Cg * K).t());
          }
        }
        if (!need_dcols) continue;
        const at::Tensor dcols = dcols_buf.narrow(0, 0, g.C * K * P).view({g.C * K, P});
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor dcols_g = dcols.narrow(0, grp * Cg * K, Cg * K);
          at::mm_out(dcols_g, w.narrow(0, grp * OCg, OCg).t(),
                     go_chunk.narrow(0, grp * OCg, OCg));
        }
        if (want_offset || want_mask) {
          scalar_t* go_ptr = want_offset ? grad_offset.mutable_data_ptr<scalar_t>() +
                                               n * grad_offset.stride(0) : nullptr;
          scalar_t* gm_ptr = want_mask ? grad_mask.mutable_data_ptr<scalar_t>() +
                                             n * grad_mask.stride(0) : nullptr;
          deform_offset_mask_grad<acc_t, scalar_t>
              <<<blocks_for(g.offset_groups * K * P), kThreads, 0, stream>>>(
                  x, sampler, g, p0, P, dcols.const_data_ptr<acc_t>(), go_ptr, gm_ptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (want_input) {
          if (deterministic) {
            deform_col2im_ordered<acc_t, scalar_t><<<blocks_for(g.C), kThreads, 0, stream>>>(
                sampler, g, p0, P, dcols.const_data_ptr<acc_t>(), gi_acc.mutable_data_ptr<acc_t>());
          } else {
            deform_col2im_atomic<acc_t, scalar_t>
                <<<blocks_for(g.C * K * P), kThreads, 0, stream>>>(
                    sampler, g, p0, P, dcols.const_data_ptr<acc_t>(),
                    gi_acc.mutable_data_ptr<acc_t>());
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
      if (want_input) grad_input[n].copy_(gi_acc.view({g.C, g.H, g.W}));
    }
    if (want_weight) grad_weight.copy_(gw_acc.view(weight.sizes()));
  });
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(convops, CUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace cuda
}  // namespace convops
