// Dilated convolution on CUDA: the fused implicit-GEMM engine (cuda/implicit_gemm.cuh) with the
// integer grid sampler (common/dilated.h), skipping taps that land wholly in padding per tile;
// the input gradient is the same forward engine over grad_output with flipped taps.
// CONVOPS_CUDA_IMPL=plain (or a GPU without bf16/TF32 tensor cores) runs the plain engine
// (cuda/gather_engine.cuh: bounded column chunks and cuBLAS).
// Status: compiled in CI and run in the emulator; not yet run on a GPU.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "common/dilated.h"
#include "common/op_outputs.h"
#include "common/tensor_utils.h"
#include "cuda/gather_engine.cuh"
#include "cuda/implicit_gemm.cuh"

namespace convops {
namespace cuda {
namespace {

at::Tensor dilated_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformGeometry g = dilated_geometry(input, weight, bias, stride, padding, dilation);
  const DeviceGuard guard(input.device());
  at::Tensor out = new_conv_output(input, g.N, g.OC, g.Ho, g.Wo);
  if (out.numel() == 0) return out;
  const at::Tensor b = (bias.has_value() && bias->defined()) ? *bias : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "dilated_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto sampler = grid_sampler<acc_t, scalar_t>(g);
    if (implicit_gemm_enabled(g)) {
      igemm_forward_run<scalar_t>(input, weight, b, g, sampler, out);
      return;
    }
    engine_forward<scalar_t>(input, weight, b, g, [&](int64_t) { return sampler; }, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dilated_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 3> output_mask) {
  const DeformGeometry g = dilated_geometry(input, weight, c10::nullopt, stride, padding,
                                            dilation);
  check_grad_output(grad_output, input, g.N, g.OC, g.Ho, g.Wo, "dilated_conv2d");
  const DeviceGuard guard(input.device());
  ConvGrads grads = new_conv_grads(grad_output, input, weight, output_mask);
  if (g.N == 0) return {grads.input, grads.weight, grads.bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "dilated_conv2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Sampler = GridSampler<acc_t, scalar_t, int64_t>;
    const auto sampler = grid_sampler<acc_t, scalar_t>(g);
    if (implicit_gemm_enabled(g)) {
      if (output_mask[1]) igemm_weight_grad_run<scalar_t>(grad_output, input, g, sampler,
                                                          grads.weight);
      // The input gradient: the flipped-tap GEMM (a gather, no atomics); depthwise layers
      // (one channel per group) and problems beyond its 32-bit limits scatter through the
      // direct / fused kernels. CONVOPS_CUDA_DILATED_DGRAD=scatter forces the scatter (tests).
      const bool scatter = g.channels_per_group() == 1 ||
                           env_is("CONVOPS_CUDA_DILATED_DGRAD", "scatter");
      if (output_mask[0] &&
          (scatter || !igemm_dilated_input_grad_run<scalar_t>(grad_output, weight, g,
                                                              grads.input))) {
        igemm_data_grad_run<scalar_t>(grad_output, input, weight, c10::nullopt, g, sampler,
                                      grads.input, at::Tensor(), at::Tensor());
      }
      return;
    }
    const auto no_sample_grads = [](const ImageView<scalar_t>&, const Sampler&, const acc_t*,
                                    int64_t, int64_t, int64_t) {};
    engine_backward<scalar_t>(grad_output, input, weight, g, [&](int64_t) { return sampler; },
                              false, no_sample_grads, grads.input, grads.weight);
  });
  return {grads.input, grads.weight, grads.bias};
}

}  // namespace

CONVOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("dilated_conv2d", &dilated_conv2d_cuda);
  m.impl("dilated_conv2d_backward", &dilated_conv2d_backward_cuda);
}

}  // namespace cuda
}  // namespace convops
