// Deformable convolution (DCNv1/v2) on CPU, on the gather engine (cpu/gather_engine.h) with a
// bilinear sampler. The offset and mask gradients are computed per (offset group, tap, pixel)
// by the task that owns that element, summing over its channels in a fixed order; the input
// gradient is scattered one channel per task. No atomics anywhere: always deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
        if (smp.inside) {
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
  const bool cl = prefers_channels_last(input);
  at::Tensor out = at::empty({g.N, g.OC, g.Ho, g.Wo}, input.options(), layout_of(cl));
  if (out.numel() == 0) return out;
  poison_for_tests(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const int64_t K = g.taps(), Cg = g.channels_per_group(), OCg = g.out_channels_per_group();
    const at::Tensor w = weight.to(acc_type).reshape({g.OC, Cg * K});
    const at::Tensor b = (bias.has_value() && bias->defined())
                             ? bias->to(acc_type).reshape({g.OC, 1}) : at::Tensor();
    const int64_t chunk = chunk_pixels(g);
    std::vector<acc_t> cols(g.C * K * chunk);
    ChunkSamples<acc_t> samples;
    for (int64_t n = 0; n < g.N; ++n) {
      const auto x = image_view<scalar_t>(input, n);
      const auto sampler = deform_sampler<acc_t, scalar_t>(offset, mask, n, g);
      const at::Tensor out_n = out[n].view({g.OC, g.Ho * g.Wo});
      for (int64_t p0 = 0; p0 < g.Ho * g.Wo; p0 += chunk) {
        const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);
        gather_samples(sampler, g, p0, P, samples);
        im2col(x, samples, g, cols.data());
        const at::Tensor cols_t = wrap(cols.data(), g.C * K, P, acc_type);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const at::Tensor wg = w.narrow(0, grp * OCg, OCg);
          const at::Tensor cg = cols_t.narrow(0, grp * Cg * K, Cg * K);
          const at::Tensor res = b.defined() ? at::addmm(b.narrow(0, grp * OCg, OCg), wg, cg)
                                             : at::mm(wg, cg);
          out_n.narrow(0, grp * OCg, OCg).narrow(1, p0, P).copy_(res);
        }
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& offset, const c10::optional<at::Tensor>& mask, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 5> output_mask) {
  const DeformGeometry g =
      deform_geometry(input, weight, offset, mask, c10::nullopt, stride, padding, dilation);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.N, g.OC, g.Ho, g.Wo}),
              "convops.deform_conv2d_backward: grad_output must be ",
              at::IntArrayRef({g.N, g.OC, g.Ho, g.Wo}), ", got ", grad_output.sizes());
  check_same(grad_output, input, "grad_output");
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const int64_t K = g.taps(), Cg = g.channels_per_group(), OCg = g.out_channels_per_group();
    const at::Tensor w = weight.to(acc_type).reshape({g.OC, Cg * K});
    at::Tensor gw_acc = want_weight ? at::zeros({g.OC, Cg * K}, w.options()) : at::Tensor();
    const int64_t chunk = chunk_pixels(g);
    std::vector<acc_t> cols(want_weight ? g.C * K * chunk : 0);
    std::vector<acc_t> dcols(need_dcols ? g.C * K * chunk : 0);
    std::vector<acc_t> gi_acc(want_input ? g.C * g.H * g.W : 0);
    ChunkSamples<acc_t> samples;
    // The offset/mask kernels need a grad_mask pointer even when only offsets are wanted.
    std::vector<scalar_t> scratch_offset, scratch_mask;
    for (int64_t n = 0; n < g.N; ++n) {
      const auto x = image_view<scalar_t>(input, n);
      const auto sampler = deform_sampler<acc_t, scalar_t>(offset, mask, n, g);
      const at::Tensor go_n = grad_output[n].reshape({g.OC, g.Ho * g.Wo});
      std::fill(gi_acc.begin(), gi_acc.end(), acc_t(0));
      for (int64_t p0 = 0; p0 < g.Ho * g.Wo; p0 += chunk) {
        const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);
        gather_samples(sampler, g, p0, P, samples);
        const at::Tensor go_chunk = go_n.narrow(1, p0, P).to(acc_type);
        if (want_weight) {
          im2col(x, samples, g, cols.data());
          const at::Tensor cols_t = wrap(cols.data(), g.C * K, P, acc_type);
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            gw_acc.narrow(0, grp * OCg, OCg)
                .addmm_(go_chunk.narrow(0, grp * OCg, OCg),
                        cols_t.narrow(0, grp * Cg * K, Cg * K).t());
          }
        }
        if (!need_dcols) continue;
        const at::Tensor dcols_t = wrap(dcols.data(), g.C * K, P, acc_type);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor dcols_g = dcols_t.narrow(0, grp * Cg * K, Cg * K);
          at::mm_out(dcols_g, w.narrow(0, grp * OCg, OCg).t(),
                     go_chunk.narrow(0, grp * OCg, OCg));
        }
        if (want_offset || want_mask) {
          scalar_t* go_ptr = want_offset ? grad_offset.mutable_data_ptr<scalar_t>() +
                                               n * grad_offset.stride(0)
                                         : nullptr;
          if (!want_offset) {
            scratch_offset.resize(2 * g.offset_groups * K * g.Ho * g.Wo);
            go_ptr = scratch_offset.data();
          }
          scalar_t* gm_ptr = want_mask ? grad_mask.mutable_data_ptr<scalar_t>() +
                                             n * grad_mask.stride(0)
                                       : nullptr;
          offset_mask_grads<acc_t, scalar_t>(x, dcols.data(), samples, g, p0, go_ptr, gm_ptr);
        }
        if (want_input) col2im(dcols.data(), samples, g, gi_acc.data());
      }
      if (want_input) {
        grad_input[n].copy_(
            at::from_blob(gi_acc.data(), {g.C, g.H, g.W}, at::TensorOptions().dtype(acc_type)));
      }
    }
    if (want_weight) grad_weight.copy_(gw_acc.view(weight.sizes()));
  });
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(convops, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace convops
