// Dilated convolution on CPU: the gather engine (cpu/gather_engine.h) with the integer grid
// sampler (common/dilated.h). Deterministic: the input gradient is scattered one channel per
// task, the weight gradient is a sequence of GEMMs in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common/dilated.h"
#include "common/tensor_utils.h"
#include "cpu/gather_engine.h"

namespace convops {
namespace cpu {
namespace {

at::Tensor dilated_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformGeometry g = dilated_geometry(input, weight, bias, stride, padding, dilation);
  const bool cl = prefers_channels_last(input);
  at::Tensor out = at::empty({g.N, g.OC, g.Ho, g.Wo}, input.options(), layout_of(cl));
  if (out.numel() == 0) return out;
  poison_for_tests(out);
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
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.N, g.OC, g.Ho, g.Wo}),
              "convops.dilated_conv2d_backward: grad_output must be ",
              at::IntArrayRef({g.N, g.OC, g.Ho, g.Wo}), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "convops.dilated_conv2d_backward: grad_output dtype must match input");
  const bool cl = prefers_channels_last(input);
  at::Tensor grad_input = output_mask[0] ? at::empty_like(input, layout_of(cl))
                                         : not_requested(input);
  at::Tensor grad_weight = output_mask[1] ? at::zeros_like(weight, at::MemoryFormat::Contiguous)
                                          : not_requested(weight);
  at::Tensor grad_bias = output_mask[2] ? grad_output.sum({0, 2, 3}) : not_requested(weight);
  poison_for_tests(grad_input);
  if (g.N == 0) return {grad_input, grad_weight, grad_bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "dilated_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto sampler = grid_sampler<acc_t, scalar_t>(g);
    const auto no_sample_grads = [](const PlaneView<scalar_t>&, const acc_t*,
                                    const ChunkSamples<acc_t>&, int64_t, int64_t) {};
    engine_backward<scalar_t>(grad_output, input, weight, g, [&](int64_t) { return sampler; },
                              false, no_sample_grads, grad_input, grad_weight);
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(convops, CPU, m) {
  m.impl("dilated_conv2d", &dilated_conv2d_cpu);
  m.impl("dilated_conv2d_backward", &dilated_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace convops
