// Dilated (atrous) convolution: its geometry (both backends, both CPU paths) and the integer
// sampler with which the gather engine runs it (CUDA; CPU float64, non-x86 and strided input
// gradients), in the role of deformable convolution's bilinear sampler (common/deform.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/bilinear.h"
#include "common/deform.h"

namespace convops {

// Where tap `tap` reads for output pixel (oh, ow): one input element or nothing.
template <typename acc_t, typename scalar_t, typename index_t>
struct GridSampler {
  static constexpr bool kIntegerGrid = true;  // lets the CPU engine use row copies
  index_t H, W, kh, kw, sh, sw, ph, pw, dh, dw;

  HOST_DEVICE_INLINE GridSampler image(index_t) const { return *this; }  // same for every image

  HOST_DEVICE_INLINE Sample<acc_t, index_t> sample(index_t group, index_t tap, index_t oh,
                                                   index_t ow, acc_t* modulation) const {
    return sample_at(group, tap / kw, tap % kw, oh, ow, modulation);
  }

  HOST_DEVICE_INLINE Sample<acc_t, index_t> sample_at(index_t /*group*/, index_t ky, index_t kx,
                                                      index_t oh, index_t ow,
                                                      acc_t* modulation) const {
    *modulation = acc_t(1);
    return integer_sample<acc_t, index_t>(conv_input_pos<index_t>(oh, ky, sh, ph, dh),
                                          conv_input_pos<index_t>(ow, kx, sw, pw, dw), H, W);
  }
};

template <typename acc_t, typename scalar_t>
GridSampler<acc_t, scalar_t, int64_t> grid_sampler(const DeformGeometry& g) {
  return {g.H, g.W, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw};
}

// The input gradient as a convolution over grad_output (flipped taps): input pixel (ih, iw)
// takes tap (ky, kx) from the output pixel that reads it through that tap (output_pos_reading:
// none off the stride grid or outside), with the same weight W[oc, c, ky, kx]. A gather, so no
// atomics. Positions are int: the engine runs it for H * W < 2^30 only (no 64-bit division on
// the GPU, where that is a call).
template <typename acc_t, typename scalar_t, typename index_t>
struct GridTransposeSampler {
  static constexpr bool kIntegerGrid = true;
  int Ho, Wo, sh, sw, ph, pw, dh, dw;

  HOST_DEVICE_INLINE GridTransposeSampler image(index_t) const { return *this; }

  HOST_DEVICE_INLINE Sample<acc_t, index_t> sample_at(index_t /*group*/, index_t ky, index_t kx,
                                                      index_t ih, index_t iw,
                                                      acc_t* modulation) const {
    *modulation = acc_t(1);
    const int oh = output_pos_reading<int>(static_cast<int>(ih), static_cast<int>(ky), Ho, sh,
                                           ph, dh);
    const int ow = output_pos_reading<int>(static_cast<int>(iw), static_cast<int>(kx), Wo, sw,
                                           pw, dw);
    return integer_sample<acc_t, index_t>(oh < 0 || ow < 0 ? -1 : oh, ow, Ho, Wo);
  }
};

template <typename acc_t, typename scalar_t>
GridTransposeSampler<acc_t, scalar_t, int64_t> grid_transpose_sampler(const DeformGeometry& g) {
  return {static_cast<int>(g.Ho), static_cast<int>(g.Wo), static_cast<int>(g.sh),
          static_cast<int>(g.sw), static_cast<int>(g.ph), static_cast<int>(g.pw),
          static_cast<int>(g.dh), static_cast<int>(g.dw)};
}

// padding: (pad_h, pad_w) or (top, left, bottom, right). groups = C / weight.size(1).
inline DeformGeometry dilated_geometry(const at::Tensor& input, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation) {
  TORCH_CHECK(input.dim() == 4, "convops.dilated_conv2d: input must be 4-D, got ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4, "convops.dilated_conv2d: weight must be 4-D, got ",
              weight.sizes());
  check_floating(input, "input");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && weight.device() == input.device(),
              "convops.dilated_conv2d: weight must match input dtype and device");
  const auto pad = normalize_padding(padding);
  check_conv_params(stride, dilation, pad);
  DeformGeometry g;
  g.N = input.size(0); g.C = input.size(1); g.H = input.size(2); g.W = input.size(3);
  g.OC = weight.size(0); g.kh = weight.size(2); g.kw = weight.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.dh = dilation[0]; g.dw = dilation[1];
  g.ph = pad[0]; g.pw = pad[1];
  TORCH_CHECK(g.C > 0, "convops.dilated_conv2d: input has no channels: ", input.sizes());
  TORCH_CHECK(g.kh > 0 && g.kw > 0 && weight.size(1) > 0 && g.C % weight.size(1) == 0,
              "convops.dilated_conv2d: weight ", weight.sizes(), " does not fit ", g.C,
              " input channels");
  g.groups = g.C / weight.size(1);
  TORCH_CHECK(g.OC % g.groups == 0, "convops.dilated_conv2d: weight.size(0)=", g.OC,
              " is not divisible by groups=", g.groups);
  g.offset_groups = 1;
  g.has_mask = false;
  g.Ho = conv_output_size(g.H, pad[0], pad[2], g.kh, g.sh, g.dh);
  g.Wo = conv_output_size(g.W, pad[1], pad[3], g.kw, g.sw, g.dw);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "convops.dilated_conv2d: output size (", g.Ho, ", ",
              g.Wo, ") is below 1");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.OC &&
                    bias->scalar_type() == input.scalar_type() &&
                    bias->device() == input.device(),
                "convops.dilated_conv2d: bias must be (", g.OC, ",) with the input's dtype and "
                "device, got ", bias->sizes());
  }
  return g;
}

}  // namespace convops
