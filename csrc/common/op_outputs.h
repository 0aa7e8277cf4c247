// Output allocation and gradient-argument checks shared by every op entry point, CPU and CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>

#include <array>

#include "common/tensor_utils.h"

namespace convops {

// (N, OC, Ho, Wo) in the input's memory format, NaN-filled under the test suite.
inline at::Tensor new_conv_output(const at::Tensor& input, int64_t N, int64_t OC, int64_t Ho,
                                  int64_t Wo) {
  at::Tensor out = at::empty({N, OC, Ho, Wo}, input.options(),
                             layout_of(prefers_channels_last(input)));
  poison_for_tests(out);
  return out;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, int64_t N,
                              int64_t OC, int64_t Ho, int64_t Wo, const char* op) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == N && grad_output.size(1) == OC &&
                  grad_output.size(2) == Ho && grad_output.size(3) == Wo,
              "convops.", op, "_backward: grad_output must be (", N, ", ", OC, ", ", Ho, ", ",
              Wo, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() &&
                  grad_output.device() == input.device(),
              "convops.", op, "_backward: grad_output must have the input's dtype and device");
}

// grad_input (input's layout), grad_weight (contiguous), grad_bias (reduced here): an empty
// placeholder where the mask says no. Kernels must write every element of what they get;
// for an empty batch zero_weight_if_empty_batch() finishes the job.
struct ConvGrads {
  at::Tensor input, weight, bias;
};

inline ConvGrads new_conv_grads(const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& weight, std::array<bool, 3> mask) {
  ConvGrads g{not_requested(input), not_requested(weight), not_requested(weight)};
  if (mask[0]) g.input = at::empty_like(input, layout_of(prefers_channels_last(input)));
  if (mask[1]) g.weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  if (mask[2]) g.bias = grad_output.sum({0, 2, 3});
  poison_for_tests(g.input);
  poison_for_tests(g.weight);
  if (input.size(0) == 0 && mask[1]) g.weight.zero_();
  return g;
}

}  // namespace convops
