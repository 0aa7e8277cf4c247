// Convolution index math shared by every op and both backends.
//
// Convention: output position o along one axis reads input position
//     i = o * stride - pad_begin + tap * dilation,    tap in [0, kernel)
// and positions outside [0, in_size) read zero. Everything below derives from that one line.
#pragma once

#include "common/macros.h"

namespace convops {

// Output length along one axis for a total padding of pad_begin + pad_end.
// Returns a value < 1 when the (dilated) kernel does not fit.
HOST_DEVICE_INLINE int64_t conv_output_size(int64_t in_size, int64_t pad_begin, int64_t pad_end,
                                            int64_t kernel, int64_t stride, int64_t dilation) {
  const int64_t span = dilation * (kernel - 1) + 1;
  const int64_t room = in_size + pad_begin + pad_end - span;
  return room < 0 ? 0 : room / stride + 1;
}

// The stride-1 input gradient is a forward convolution of grad_output with the taps flipped and
// this padding before the first position (negative when pad_begin exceeds the tap reach).
HOST_DEVICE_INLINE int64_t flipped_tap_padding(int64_t kernel, int64_t dilation,
                                               int64_t pad_begin) {
  return (kernel - 1) * dilation - pad_begin;
}

template <typename index_t>
HOST_DEVICE_INLINE index_t conv_input_pos(index_t out_pos, index_t tap, index_t stride,
                                          index_t pad_begin, index_t dilation) {
  return out_pos * stride - pad_begin + tap * dilation;
}

// The range [first, last) of output positions whose tap `tap` lands inside [0, in_size).
// The CPU row kernels loop over exactly this range, so they never test bounds per element.
template <typename index_t>
struct OutputRange {
  index_t first;
  index_t last;
};

template <typename index_t>
HOST_DEVICE_INLINE OutputRange<index_t> valid_output_range(index_t tap, index_t in_size,
                                                           index_t out_size, index_t stride,
                                                           index_t pad_begin, index_t dilation) {
  const index_t shift = pad_begin - tap * dilation;  // i = o*stride - shift
  index_t first = ceil_div<index_t>(shift, stride);
  index_t last = floor_div<index_t>(in_size - 1 + shift, stride) + 1;
  first = clamp_index<index_t>(first, 0, out_size);
  last = clamp_index<index_t>(last, first, out_size);
  return {first, last};
}

// The inverse map used by gather-form input gradients: the output position whose tap `tap`
// reads input position in_pos, or -1 when there is none (not on the stride grid, or outside
// [0, out_size)). Gathering instead of scattering keeps the input gradient free of atomics.
template <typename index_t>
HOST_DEVICE_INLINE index_t output_pos_reading(index_t in_pos, index_t tap, index_t out_size,
                                              index_t stride, index_t pad_begin,
                                              index_t dilation) {
  const index_t t = in_pos + pad_begin - tap * dilation;
  if (t < 0 || t % stride != 0) return -1;
  const index_t o = t / stride;
  return o < out_size ? o : -1;
}

}  // namespace convops
