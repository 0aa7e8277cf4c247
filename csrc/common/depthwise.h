// Depthwise convolution: argument checks, geometry and the per-element math that the CPU
// fallback paths and the CUDA kernels share.
//
// Output channel oc = c * multiplier + j reads input channel c = oc / multiplier with the
// filter weight[oc, 0, :, :] (the semantics of F.conv2d(groups=C)).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "common/conv_geometry.h"

namespace convops {

struct DepthwiseGeometry {
  int64_t N, C, H, W;        // input
  int64_t multiplier, OC;    // OC = C * multiplier
  int64_t kh, kw;            // filter
  int64_t sh, sw;            // stride
  int64_t ph, pw;            // padding before the first row / column
  int64_t dh, dw;            // dilation
  int64_t Ho, Wo;            // output
};

// padding is (pad_h, pad_w) or (top, left, bottom, right).
inline std::vector<int64_t> normalize_padding(at::IntArrayRef padding) {
  TORCH_CHECK(padding.size() == 2 || padding.size() == 4,
              "convops: padding must have 2 (h, w) or 4 (top, left, bottom, right) values, got ",
              padding.size());
  if (padding.size() == 2) return {padding[0], padding[1], padding[0], padding[1]};
  return padding.vec();
}

inline void check_conv_params(at::IntArrayRef stride, at::IntArrayRef dilation,
                              const std::vector<int64_t>& pad) {
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0,
              "convops: stride must be two positive ints, got ", stride);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0,
              "convops: dilation must be two positive ints, got ", dilation);
  for (int64_t p : pad) TORCH_CHECK(p >= 0, "convops: padding must be >= 0, got ", pad);
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "convops: ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

inline DepthwiseGeometry depthwise_geometry(const at::Tensor& input, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation) {
  TORCH_CHECK(input.dim() == 4, "convops.depthwise_conv2d: input must be 4-D (N, C, H, W), got ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1,
              "convops.depthwise_conv2d: weight must be (C*m, 1, kh, kw), got ", weight.sizes());
  check_floating(input, "input");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(),
              "convops.depthwise_conv2d: weight dtype ", weight.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), "convops.depthwise_conv2d: weight is on ",
              weight.device(), " but input is on ", input.device());
  const auto pad = normalize_padding(padding);
  check_conv_params(stride, dilation, pad);
  DepthwiseGeometry g;
  g.N = input.size(0); g.C = input.size(1); g.H = input.size(2); g.W = input.size(3);
  g.OC = weight.size(0); g.kh = weight.size(2); g.kw = weight.size(3);
  TORCH_CHECK(g.C > 0 && g.OC % g.C == 0 && g.OC > 0,
              "convops.depthwise_conv2d: weight.size(0)=", g.OC,
              " must be a positive multiple of the input channels C=", g.C);
  TORCH_CHECK(g.kh > 0 && g.kw > 0, "convops.depthwise_conv2d: empty kernel ", weight.sizes());
  g.multiplier = g.OC / g.C;
  g.sh = stride[0]; g.sw = stride[1];
  g.dh = dilation[0]; g.dw = dilation[1];
  g.ph = pad[0]; g.pw = pad[1];
  g.Ho = conv_output_size(g.H, pad[0], pad[2], g.kh, g.sh, g.dh);
  g.Wo = conv_output_size(g.W, pad[1], pad[3], g.kw, g.sw, g.dw);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "convops.depthwise_conv2d: output size (", g.Ho, ", ",
              g.Wo, ") is below 1 for input ", input.sizes(), " and kernel ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.OC,
                "convops.depthwise_conv2d: bias must be (", g.OC, ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device() == input.device(),
                "convops.depthwise_conv2d: bias must match input dtype and device");
  }
  return g;
}

// One output element from strided input/weight planes; the plain CUDA kernel and the CPU
// generic path both use it.
template <typename acc_t, typename scalar_t, typename index_t>
HOST_DEVICE_INLINE acc_t depthwise_output_value(const scalar_t* in_plane, index_t in_sh,
                                                index_t in_sw, index_t H, index_t W,
                                                const scalar_t* filter, index_t kh, index_t kw,
                                                index_t oh, index_t ow, index_t sh, index_t sw,
                                                index_t ph, index_t pw, index_t dh, index_t dw) {
  acc_t acc = 0;
  for (index_t ky = 0; ky < kh; ++ky) {
    const index_t ih = conv_input_pos<index_t>(oh, ky, sh, ph, dh);
    if (ih < 0 || ih >= H) continue;
    for (index_t kx = 0; kx < kw; ++kx) {
      const index_t iw = conv_input_pos<index_t>(ow, kx, sw, pw, dw);
      if (iw < 0 || iw >= W) continue;
      acc += static_cast<acc_t>(filter[ky * kw + kx]) *
             static_cast<acc_t>(in_plane[ih * in_sh + iw * in_sw]);
    }
  }
  return acc;
}

// d(loss)/d(input[n, c, ih, iw]) gathered over the multiplier output channels c*m + j and
// every tap that reads (ih, iw). grad_out points at channel c*m of image n; filters at
// weight[c*m]. No scatter, so no atomics and a fixed summation order.
template <typename acc_t, typename scalar_t, typename index_t>
HOST_DEVICE_INLINE acc_t depthwise_input_grad_value(
    const scalar_t* grad_out, index_t go_sc, index_t go_sh, index_t go_sw, index_t Ho,
    index_t Wo, const scalar_t* filters, index_t multiplier, index_t kh, index_t kw, index_t ih,
    index_t iw, index_t sh, index_t sw, index_t ph, index_t pw, index_t dh, index_t dw) {
  acc_t acc = 0;
  for (index_t j = 0; j < multiplier; ++j) {
    for (index_t ky = 0; ky < kh; ++ky) {
      const index_t oh = output_pos_reading<index_t>(ih, ky, Ho, sh, ph, dh);
      if (oh < 0) continue;
      for (index_t kx = 0; kx < kw; ++kx) {
        const index_t ow = output_pos_reading<index_t>(iw, kx, Wo, sw, pw, dw);
        if (ow < 0) continue;
        acc += static_cast<acc_t>(filters[(j * kh + ky) * kw + kx]) *
               static_cast<acc_t>(grad_out[j * go_sc + oh * go_sh + ow * go_sw]);
      }
    }
  }
  return acc;
}

}  // namespace convops
