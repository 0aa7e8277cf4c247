// Deformable convolution (DCNv1/v2) on CPU, on the gather engine (cpu/gather_engine.h) with a
// bilinear sampler. The offset and mask gradients are computed per (offset group, tap, pixel)
// by the task that owns that element, summing over its channels in a fixed order; the input
// gradient is scattered one channel per task. No atomics anywhere: always deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/op_outputs.h"
#include "common/tensor_utils.h"
#include "cpu/gather_engine.h"

namespace convops {
namespace cpu {
namespace {

// grad_offset / grad_mask for one chunk, written into contiguous (N, ., Ho, Wo) outputs.
template <typename acc_t, typename scalar_t>
void offset_mask_grads(const PlaneView<scalar_t>& x, const acc_t* dcols,
                       const ChunkSamples<acc_t>& s, const DeformGeometry& g, int64_t p0,
                       scalar_t* grad_offset, scalar_t* grad_mask) {
  const int64_t K = g.taps(), P = s.P, cpo = g.channels_per_offset_group(), HWo = g.Ho * g.Wo;
  at::parallel_for(0, g.offset_groups * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t og = row / K, tap = row % K;
      for (int64_t p = 0; p < P; ++p) {
        const auto& smp = s.at(og, tap, K, p);
        acc_t gy = 0, gx = 0, gm = 0;
        if (smp.near) {
          for (int64_t c = og * cpo; c < (og + 1) * cpo; ++c) {
            deform_sample_grad_term<acc_t, scalar_t, int64_t>(
                x.plane(c), x.sy, x.sx, g.H, g.W, smp, dcols[(c * K + tap) * P + p], &gy, &gx,
                &gm);
          }
        }
        const acc_t m = s.mod(og, tap, K, p);
        const int64_t pix = p0 + p;
        grad_offset[(2 * row) * HWo + pix] = static_cast<scalar_t>(gy * m);
        grad_offset[(2 * row + 1) * HWo + pix] = static_cast<scalar_t>(gx * m);
        if (grad_mask) grad_mask[row * HWo + pix] = static_cast<scalar_t>(gm);
      }
    }
  });
}

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                             const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                             const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformGeometry g =
      deform_geometry(input, weight, offset, mask, bias, stride, padding, dilation);
  at::Tensor out = new_conv_output(input, g.N, g.OC, g.Ho, g.Wo);
  if (out.numel() == 0) return out;
  const at::Tensor b = (bias.has_value() && bias->defined()) ? *bias : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    engine_forward<scalar_t>(input, weight, b, g, [&](int64_t n) {
      return deform_sampler<acc_t, scalar_t>(offset, mask, n, g);
    }, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& offset, const c10::optional<at::Tensor>& mask, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 5> output_mask) {
  const DeformGeometry g =
      deform_geometry(input, weight, offset, mask, c10::nullopt, stride, padding, dilation);
  check_grad_output(grad_output, input, g.N, g.OC, g.Ho, g.Wo, "deform_conv2d");
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
                                  "deform_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<scalar_t> scratch;  // grad_offset's slot when only the mask grad is wanted
    if (!want_offset && want_mask) scratch.resize(2 * g.offset_groups * g.taps() * g.Ho * g.Wo);
    const auto sample_grads = [&](const PlaneView<scalar_t>& x, const acc_t* dcols,
                                  const ChunkSamples<acc_t>& samples, int64_t p0, int64_t n) {
      scalar_t* go_ptr = want_offset ? grad_offset.mutable_data_ptr<scalar_t>() +
                                           n * grad_offset.stride(0)
                                     : scratch.data();
      scalar_t* gm_ptr = want_mask ? grad_mask.mutable_data_ptr<scalar_t>() +
                                         n * grad_mask.stride(0)
                                   : nullptr;
      offset_mask_grads<acc_t, scalar_t>(x, dcols, samples, g, p0, go_ptr, gm_ptr);
    };
    engine_backward<scalar_t>(grad_output, input, weight, g, [&](int64_t n) {
      return deform_sampler<acc_t, scalar_t>(offset, mask, n, g);
    }, want_offset || want_mask, sample_grads, grads.input, grads.weight);
  });
  return {grads.input, grads.weight, grad_offset, grad_mask, grads.bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(convops, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace convops
