// Dilated convolution on CPU. On x86 with AVX2 or AVX-512 (float32/16, bfloat16): the direct
// register-blocked convolution of cpu/direct_conv.h for the forward, the weight gradient and
// the stride-1 input gradient. Otherwise (float64, other CPUs, strided input gradient, or
// CONVOPS_CPU_IMPL=engine): the gather engine (cpu/gather_engine.h) with the integer grid
// sampler (common/dilated.h). Both are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <string>

#include "common/dilated.h"
#include "common/op_outputs.h"
#include "common/tensor_utils.h"
#include "cpu/direct_conv.h"
#include "cpu/gather_engine.h"
#include "cpu/path_counts.h"

namespace convops {
namespace cpu {
namespace {

// The direct path's view of a dilated problem, forward.
DirectProblem forward_problem(const DeformGeometry& g) {
  return {g.groups, g.channels_per_group(), g.out_channels_per_group(), g.kh, g.kw, g.sh, g.sw,
          g.dh, g.dw, g.ph, g.pw, g.H, g.W, g.Ho, g.Wo};
}

// The stride-1 input gradient as a forward convolution of grad_output: taps flipped, each
// group's weight transposed, padding (k - 1) * d - p.
DirectProblem input_grad_problem(const DeformGeometry& g) {
  return {g.groups, g.out_channels_per_group(), g.channels_per_group(), g.kh, g.kw, 1, 1,
          g.dh, g.dw, flipped_tap_padding(g.kh, g.dh, g.ph), flipped_tap_padding(g.kw, g.dw, g.pw),
          g.Ho, g.Wo, g.H, g.W};
}

const DirectIsa* direct_path_for(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? nullptr : direct_isa();
}

// A bfloat16 convolution whose input channels per group pair up runs the bf16 dot-product
// kernels when the CPU has them; everything else the float32 kernels of `isa`.
const DirectIsa& forward_isa(const at::Tensor& image, const DirectProblem& p,
                             const DirectIsa& isa) {
  const DirectIsa* pairs = image.scalar_type() == at::kBFloat16 && p.Cg % 2 == 0
                               ? direct_bf16_pairs_isa() : nullptr;
  return pairs ? *pairs : isa;
}

void direct_forward_batch(const at::Tensor& input, const at::Tensor& weight,
                          const at::Tensor& bias, const DeformGeometry& g, const DirectIsa& isa,
                          at::Tensor& out) {
  const DirectProblem p = forward_problem(g);
  const DirectIsa& fisa = forward_isa(input, p, isa);
  const PackedWeights pw = pack_weights(weight, bias, p, fisa);
  count_path(std::string("direct_forward:") + fisa.name);
  direct_conv_batch(input, pw, fisa.pairs ? p.paired() : p, fisa, kInputImages, out);
}

// The gradients the direct path takes (input: stride 1 only), one pack of images at a time.
// When the weight gradient can read grad_output straight from the input gradient's padded
// pack (float words, each group's output channels a whole number of vectors, no row or column
// of grad_output cropped), grad_output is packed once instead of twice.
void direct_backward_batch(const at::Tensor& grad_output, const at::Tensor& input,
                           const at::Tensor& weight, const DeformGeometry& g,
                           const DirectIsa& isa, at::Tensor* grad_input,
                           at::Tensor* grad_weight) {
  const DirectProblem p = forward_problem(g), q = input_grad_problem(g);
  const DirectIsa& qisa = forward_isa(grad_output, q, isa);
  const DirectProblem qp = qisa.pairs ? q.paired() : q;
  const PackedWeights pw = grad_input ? pack_weights(weight, at::Tensor(), q, qisa,
                                                     /*for_input_grad=*/true)
                                      : PackedWeights();
  const int64_t OCgp = ceil_div<int64_t>(p.OCg, isa.lanes) * isa.lanes;
  const bool share = grad_input && grad_weight && !qisa.pairs && OCgp == p.OCg && q.ph >= 0 &&
                     q.pw >= 0 && q.ph + g.Ho <= q.padded_h() && q.pw + g.Wo <= q.padded_w();
  if (grad_input) count_path(std::string("direct_input_grad:") + qisa.name);
  if (grad_weight) count_path(std::string("direct_weight_grad:") + isa.name);
  if (share) count_path("direct_shared_grad_output_pack");
  at::Tensor dw;
  if (grad_weight) dw = at::zeros({p.groups, p.taps(), p.Cg, OCgp}, at::kFloat);
  const int64_t step = grad_input ? images_per_pack(qp, g.N) : 1;
  for (int64_t n0 = 0; n0 < g.N; n0 += step) {
    const int64_t count = std::min(step, g.N - n0);
    const float* dyp = nullptr;
    if (grad_input) {
      dyp = pack_images(grad_output, n0, count, qp, qisa, kGradOutputImages);
      direct_forward(dyp, pw, qp, qisa, *grad_input, n0, count);
    }
    if (!grad_weight) continue;
    for (int64_t i = 0; i < count; ++i) {
      const float* xp = pack_images(input, n0 + i, 1, p, isa, kInputImages);
      GradOutputView dy;
      if (share) {
        const int64_t Cs = qp.pixel_stride(), Wq = qp.padded_w();
        dy = {dyp + i * qp.padded_h() * Wq * Cs + (q.ph * Wq + q.pw) * Cs, Wq * Cs, Cs, p.OCg};
      } else {
        const int64_t OCt = p.groups * OCgp;
        dy = {pack_grad_output(grad_output[n0 + i], p, OCgp, isa), p.Wo * OCt, OCt, OCgp};
      }
      direct_weight_grad(xp, dy, p, OCgp, isa, dw.data_ptr<float>());
    }
  }
  if (grad_weight) {
    grad_weight->copy_(
        dw.narrow(3, 0, p.OCg).permute({0, 3, 2, 1}).reshape({g.OC, p.Cg, g.kh, g.kw}));
  }
}

at::Tensor dilated_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformGeometry g = dilated_geometry(input, weight, bias, stride, padding, dilation);
  at::Tensor out = new_conv_output(input, g.N, g.OC, g.Ho, g.Wo);
  if (out.numel() == 0) return out;
  const at::Tensor b = (bias.has_value() && bias->defined()) ? *bias : at::Tensor();
  if (const DirectIsa* isa = direct_path_for(input)) {
    direct_forward_batch(input, weight, b, g, *isa, out);
    return out;
  }
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
  // The direct path takes what it can; the engine gets what is left (a strided input grad).
  at::Tensor engine_input = grads.input, engine_weight = grads.weight;
  if (const DirectIsa* isa = direct_path_for(input)) {
    const bool want_input = grads.input.numel() > 0 && g.sh == 1 && g.sw == 1;
    const bool want_weight = grads.weight.numel() > 0;
    if (want_input || want_weight) {
      direct_backward_batch(grad_output, input, weight, g, *isa,
                            want_input ? &grads.input : nullptr,
                            want_weight ? &grads.weight : nullptr);
    }
    if (want_input) engine_input = not_requested(grads.input);
    if (want_weight) engine_weight = not_requested(grads.weight);
  }
  if (engine_input.numel() == 0 && engine_weight.numel() == 0) {
    return {grads.input, grads.weight, grads.bias};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "dilated_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto sampler = grid_sampler<acc_t, scalar_t>(g);
    const auto no_sample_grads = [](const PlaneView<scalar_t>&, const acc_t*,
                                    const ChunkSamples<acc_t>&, int64_t, int64_t) {};
    engine_backward<scalar_t>(grad_output, input, weight, g, [&](int64_t) { return sampler; },
                              false, no_sample_grads, engine_input, engine_weight);
  });
  return {grads.input, grads.weight, grads.bias};
}

}  // namespace

// What the dilated CPU path runs here, now (the environment switches included).
std::string dilated_cpu_kernels() {
  const DirectIsa* isa = direct_isa();
  if (isa == nullptr) return "gather engine (im2col + at::mm)";
  std::string name = std::string("direct ") + isa->name;
  if (direct_bf16_pairs_isa() != nullptr) name += ", bf16 pairs avx512bf16";
  return name;
}

TORCH_LIBRARY_IMPL(convops, CPU, m) {
  m.impl("dilated_conv2d", &dilated_conv2d_cpu);
  m.impl("dilated_conv2d_backward", &dilated_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace convops
