// Deformable convolution (DCNv1 offsets, DCNv2 mask): argument checks and geometry.
//
// offset: (N, 2*og*kh*kw, Ho, Wo), channel (g*kh*kw + tap)*2 + {0: dy, 1: dx}
// mask:   (N, og*kh*kw, Ho, Wo),   channel  g*kh*kw + tap
// Input channel c uses offset group c / (C / og) and weight group c / (C / groups).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/conv_geometry.h"
#include "common/depthwise.h"

namespace convops {

struct DeformGeometry {
  int64_t N, C, H, W, OC, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int64_t groups, offset_groups;
  bool has_mask;
  int64_t taps() const { return kh * kw; }
  int64_t channels_per_group() const { return C / groups; }
  int64_t out_channels_per_group() const { return OC / groups; }
  int64_t channels_per_offset_group() const { return C / offset_groups; }
};

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "convops.deform_conv2d: ", name, " dtype ",
              t.scalar_type(), " differs from input dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "convops.deform_conv2d: ", name, " is on ",
              t.device(), " but input is on ", ref.device());
}

inline DeformGeometry deform_geometry(const at::Tensor& input, const at::Tensor& weight,
                                      const at::Tensor& offset,
                                      const c10::optional<at::Tensor>& mask,
                                      const c10::optional<at::Tensor>& bias,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation) {
  TORCH_CHECK(input.dim() == 4, "convops.deform_conv2d: input must be 4-D, got ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4, "convops.deform_conv2d: weight must be 4-D, got ",
              weight.sizes());
  TORCH_CHECK(offset.dim() == 4, "convops.deform_conv2d: offset must be 4-D, got ",
              offset.sizes());
  check_floating(input, "input");
  check_same(weight, input, "weight");
  check_same(offset, input, "offset");
  const auto pad = normalize_padding(padding);
  check_conv_params(stride, dilation, pad);
  TORCH_CHECK(pad[0] == pad[2] && pad[1] == pad[3],
              "convops.deform_conv2d: padding must be symmetric (pad_h, pad_w)");
  DeformGeometry g;
  g.N = input.size(0); g.C = input.size(1); g.H = input.size(2); g.W = input.size(3);
  g.OC = weight.size(0); g.kh = weight.size(2); g.kw = weight.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.dh = dilation[0]; g.dw = dilation[1];
  g.ph = pad[0]; g.pw = pad[1];
  TORCH_CHECK(g.kh > 0 && g.kw > 0 && weight.size(1) > 0,
              "convops.deform_conv2d: empty weight ", weight.sizes());
  TORCH_CHECK(g.C % weight.size(1) == 0, "convops.deform_conv2d: input channels ", g.C,
              " are not a multiple of weight.size(1)=", weight.size(1));
  g.groups = g.C / weight.size(1);
  TORCH_CHECK(g.OC % g.groups == 0, "convops.deform_conv2d: weight.size(0)=", g.OC,
              " is not divisible by groups=", g.groups);
  TORCH_CHECK(offset.size(1) % (2 * g.taps()) == 0 && offset.size(1) > 0,
              "convops.deform_conv2d: offset channels ", offset.size(1),
              " must be 2*offset_groups*kh*kw with kh*kw=", g.taps());
  g.offset_groups = offset.size(1) / (2 * g.taps());
  TORCH_CHECK(g.C % g.offset_groups == 0, "convops.deform_conv2d: input channels ", g.C,
              " are not divisible by offset_groups=", g.offset_groups);
  g.Ho = conv_output_size(g.H, g.ph, g.ph, g.kh, g.sh, g.dh);
  g.Wo = conv_output_size(g.W, g.pw, g.pw, g.kw, g.sw, g.dw);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "convops.deform_conv2d: output size (", g.Ho, ", ", g.Wo,
              ") is below 1");
  TORCH_CHECK(offset.size(0) == g.N && offset.size(2) == g.Ho && offset.size(3) == g.Wo,
              "convops.deform_conv2d: offset must be (", g.N, ", ", offset.size(1), ", ", g.Ho,
              ", ", g.Wo, "), got ", offset.sizes());
  g.has_mask = mask.has_value() && mask->defined();
  if (g.has_mask) {
    check_same(*mask, input, "mask");
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == g.N &&
                    mask->size(1) == g.offset_groups * g.taps() && mask->size(2) == g.Ho &&
                    mask->size(3) == g.Wo,
                "convops.deform_conv2d: mask must be (", g.N, ", ", g.offset_groups * g.taps(),
                ", ", g.Ho, ", ", g.Wo, "), got ", mask->sizes());
  }
  if (bias.has_value() && bias->defined()) {
    check_same(*bias, input, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.OC,
                "convops.deform_conv2d: bias must be (", g.OC, ",), got ", bias->sizes());
  }
  return g;
}

}  // namespace convops
