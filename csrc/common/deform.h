// Deformable convolution (DCNv1 offsets, DCNv2 mask): argument checks and geometry.
//
// offset: (N, 2*og*kh*kw, Ho, Wo), channel (g*kh*kw + tap)*2 + {0: dy, 1: dx}
// mask:   (N, og*kh*kw, Ho, Wo),   channel  g*kh*kw + tap
// Input channel c uses offset group c / (C / og) and weight group c / (C / groups).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/bilinear.h"
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
  TORCH_CHECK(g.C > 0, "convops.deform_conv2d: input has no channels: ", input.sizes());
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

// Where tap `tap` of offset group `og` samples for output pixel (oh, ow), and its modulation.
// Offsets and mask are read through strides, so any layout works without a copy. Both
// backends call this; it is the only place the offset/mask channel layout is spelled out.
template <typename acc_t, typename scalar_t, typename index_t>
struct DeformSampler {
  static constexpr bool kIntegerGrid = false;
  const scalar_t* offset;  // image n
  index_t off_sn, off_sc, off_sy, off_sx;
  const scalar_t* mask;    // image n, or nullptr
  index_t mask_sn, mask_sc, mask_sy, mask_sx;
  index_t H, W, kh, kw, sh, sw, ph, pw, dh, dw;

  // The sampler of image n + i (i images further on).
  HOST_DEVICE_INLINE DeformSampler image(index_t i) const {
    DeformSampler s = *this;
    s.offset += i * off_sn;
    if (mask != nullptr) s.mask += i * mask_sn;
    return s;
  }

  HOST_DEVICE_INLINE Sample<acc_t, index_t> sample(index_t og, index_t tap, index_t oh,
                                                   index_t ow, acc_t* modulation) const {
    return sample_at(og, tap / kw, tap % kw, oh, ow, modulation);
  }

  // The same, with the tap given as (ky, kx) (callers that walk the taps skip a division).
  HOST_DEVICE_INLINE Sample<acc_t, index_t> sample_at(index_t og, index_t ky, index_t kx,
                                                      index_t oh, index_t ow,
                                                      acc_t* modulation) const {
    const index_t tap = ky * kw + kx, ch = (og * kh * kw + tap) * 2;
    const index_t at = oh * off_sy + ow * off_sx;
    const acc_t dy = static_cast<acc_t>(offset[ch * off_sc + at]);
    const acc_t dx = static_cast<acc_t>(offset[(ch + 1) * off_sc + at]);
    *modulation = mask != nullptr
                      ? static_cast<acc_t>(
                            mask[(og * kh * kw + tap) * mask_sc + oh * mask_sy + ow * mask_sx])
                      : acc_t(1);
    const acc_t y = static_cast<acc_t>(conv_input_pos<index_t>(oh, ky, sh, ph, dh)) + dy;
    const acc_t x = static_cast<acc_t>(conv_input_pos<index_t>(ow, kx, sw, pw, dw)) + dx;
    return bilinear_sample<acc_t, index_t>(y, x, H, W);
  }
};

template <typename acc_t, typename scalar_t>
DeformSampler<acc_t, scalar_t, int64_t> deform_sampler(const at::Tensor& offset,
                                                       const c10::optional<at::Tensor>& mask,
                                                       int64_t n, const DeformGeometry& g) {
  DeformSampler<acc_t, scalar_t, int64_t> s;
  s.offset = offset.const_data_ptr<scalar_t>() + n * offset.stride(0);
  s.off_sn = offset.stride(0);
  s.off_sc = offset.stride(1); s.off_sy = offset.stride(2); s.off_sx = offset.stride(3);
  s.mask = nullptr;
  s.mask_sn = s.mask_sc = s.mask_sy = s.mask_sx = 0;
  if (g.has_mask) {
    s.mask = mask->const_data_ptr<scalar_t>() + n * mask->stride(0);
    s.mask_sn = mask->stride(0);
    s.mask_sc = mask->stride(1); s.mask_sy = mask->stride(2); s.mask_sx = mask->stride(3);
  }
  s.H = g.H; s.W = g.W; s.kh = g.kh; s.kw = g.kw; s.sh = g.sh; s.sw = g.sw;
  s.ph = g.ph; s.pw = g.pw; s.dh = g.dh; s.dw = g.dw;
  return s;
}

// d(loss)/d(offset_y, offset_x, mask) of one sample from the columns' gradient d, summed over
// the channels of its offset group by the caller: the per-channel term.
template <typename acc_t, typename scalar_t, typename index_t>
HOST_DEVICE_INLINE void deform_sample_grad_term(const scalar_t* plane, index_t sy, index_t sx,
                                                index_t H, index_t W,
                                                const Sample<acc_t, index_t>& smp, acc_t d,
                                                acc_t* gy, acc_t* gx, acc_t* gm) {
  const auto c = corner_values_for_grad<acc_t, scalar_t, index_t>(plane, sy, sx, H, W, smp);
  acc_t dy, dx;
  sample_coordinate_grad(c, smp, &dy, &dx);
  *gy += d * dy;
  *gx += d * dx;
  *gm += d * (smp.w00 * c.v00 + smp.w01 * c.v01 + smp.w10 * c.v10 + smp.w11 * c.v11);
}

}  // namespace convops
