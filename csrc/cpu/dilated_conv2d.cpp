// Dilated convolution on CPU: the gather engine (cpu/gather_engine.h) with the integer grid
// sampler (common/dilated.h). Deterministic: the input gradient is scattered one channel per
// task, the weight gradient is a sequence of GEMMs in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common/dilated.h"
#include "common/op_outputs.h"
#include "common/tensor_utils.h"
#include "cpu/gather_engine.h"

namespace convops {
namespace cpu {
namespace {

at::Tensor dilated_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformGeometry g = dilated_geometry(input, weight, bias, stride, padding, dilation);
  at::Tensor out = new_conv_output(input, g.N, g.OC, g.Ho, g.Wo);
  if (out.numel() == 0) return out;
  const at::Tensor b = (bias.has_value() && bias->defined()) ? *bias : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "dilated_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto sampler = grid_sampler<acc_t, scalar_t>(g);
    engine_forward<scalar_t>(input, weight, b, g, [&](int64_t) { return sampler; }, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dilated_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 3> output_mask) {
  const DeformGeometry g = dilated_geometry(input, weight, c10::nullopt, stride, padding,
                                            dilation);
  check_grad_output(grad_output, input, g.N, g.OC, g.Ho, g.Wo, "dilated_conv2d");
  ConvGrads grads = new_conv_grads(grad_output, input, weight, output_mask);
  if (g.N == 0) return {grads.input, grads.weight, grads.bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "dilated_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto sampler = grid_sampler<acc_t, scalar_t>(g);
    const auto no_sample_grads = [](const PlaneView<scalar_t>&, const acc_t*,
                                    const ChunkSamples<acc_t>&, int64_t, int64_t) {};
    engine_backward<scalar_t>(grad_output, input, weight, g, [&](int64_t) { return sampler; },
                              false, no_sample_grads, grads.input, grads.weight);
  });
  return {grads.input, grads.weight, grads.bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(convops, CPU, m) {
  m.impl("dilated_conv2d", &dilated_conv2d_cpu);
  m.impl("dilated_conv2d_backward", &dilated_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace convops
