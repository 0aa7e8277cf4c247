// Deformable convolution (DCNv1/v2) on CUDA: the gather engine (cuda/gather_engine.cuh) with
// the bilinear sampler (common/deform.h), plus the offset/mask gradient kernel.
//
// The fused implicit-GEMM engine (cuda/implicit_gemm.cuh) runs on GPUs with bf16/TF32 tensor
// cores; CONVOPS_CUDA_IMPL=plain (or an older GPU) runs the plain engine: columns in global
// memory, cuBLAS, and for the offset and mask gradients one thread per (offset group, tap,
// pixel) summing dcols * d(sample) over its group's channels.
// Status: compiled in CI and run in the emulator; not yet run on a GPU.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "common/op_outputs.h"
#include "common/tensor_utils.h"
#include "cuda/gather_engine.cuh"
#include "cuda/implicit_gemm.cuh"

namespace convops {
namespace cuda {
namespace {

template <typename acc_t, typename scalar_t>
__global__ void __launch_bounds__(kEngineThreads)
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
  if (s.near) {
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

at::Tensor deform_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformGeometry g =
      deform_geometry(input, weight, offset, mask, bias, stride, padding, dilation);
  const DeviceGuard guard(input.device());
  at::Tensor out = new_conv_output(input, g.N, g.OC, g.Ho, g.Wo);
  if (out.numel() == 0) return out;
  const at::Tensor b = (bias.has_value() && bias->defined()) ? *bias : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (implicit_gemm_enabled(g)) {
      igemm_forward_run<scalar_t>(input, weight, b, g,
                                  deform_sampler<acc_t, scalar_t>(offset, mask, 0, g), out);
      return;
    }
    engine_forward<scalar_t>(input, weight, b, g, [&](int64_t n) {
      return deform_sampler<acc_t, scalar_t>(offset, mask, n, g);
    }, out);
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
  check_grad_output(grad_output, input, g.N, g.OC, g.Ho, g.Wo, "deform_conv2d");
  const DeviceGuard guard(input.device());
  const bool want_offset = output_mask[2], want_mask = output_mask[3] && g.has_mask;
  ConvGrads grads = new_conv_grads(grad_output, input, weight,
                                   {output_mask[0], output_mask[1], output_mask[4]});
  at::Tensor grad_offset = want_offset ? at::empty_like(offset, at::MemoryFormat::Contiguous)
                                       : not_requested(offset);
  at::Tensor grad_mask = want_mask ? at::empty_like(*mask, at::MemoryFormat::Contiguous)
                                   : not_requested(offset);
  poison_for_tests(grad_offset);
  poison_for_tests(grad_mask);
  if (g.N == 0) return {grads.input, grads.weight, grad_offset, grad_mask, grads.bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_conv2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Sampler = DeformSampler<acc_t, scalar_t, int64_t>;
    if (implicit_gemm_enabled(g)) {
      const Sampler sampler = deform_sampler<acc_t, scalar_t>(offset, mask, 0, g);
      if (output_mask[1]) igemm_weight_grad_run<scalar_t>(grad_output, input, g, sampler,
                                                          grads.weight);
      if (output_mask[0] || want_offset || want_mask) {
        igemm_data_grad_run<scalar_t>(grad_output, input, weight, mask, g, sampler,
                                      output_mask[0] ? grads.input : at::Tensor(),
                                      want_offset ? grad_offset : at::Tensor(),
                                      want_mask ? grad_mask : at::Tensor());
      }
      return;
    }
    const auto sample_grads = [&](const ImageView<scalar_t>& x, const Sampler& sampler,
                                  const acc_t* dcols, int64_t p0, int64_t P, int64_t n) {
      scalar_t* go_ptr = want_offset ? grad_offset.mutable_data_ptr<scalar_t>() +
                                           n * grad_offset.stride(0) : nullptr;
      scalar_t* gm_ptr = want_mask ? grad_mask.mutable_data_ptr<scalar_t>() +
                                         n * grad_mask.stride(0) : nullptr;
      launch_kernel("deform_offset_mask_grad", deform_offset_mask_grad<acc_t, scalar_t>,
                    engine_launch(g.offset_groups * g.taps() * P), x, sampler, g, p0, P, dcols,
                    go_ptr, gm_ptr);
    };
    engine_backward<scalar_t>(grad_output, input, weight, g, [&](int64_t n) {
      return deform_sampler<acc_t, scalar_t>(offset, mask, n, g);
    }, want_offset || want_mask, sample_grads, grads.input, grads.weight);
  });
  return {grads.input, grads.weight, grad_offset, grad_mask, grads.bias};
}

}  // namespace

CONVOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace cuda
}  // namespace convops
