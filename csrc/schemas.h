// Every convops operator schema, defined once: convops.cpp registers them as torch.ops.convops,
// the CUDA emulator (emu/module.cpp) a second time as torch.ops.convops_emu.
#pragma once

#include <torch/library.h>

namespace convops {

inline void define_schemas(torch::Library& m) {
  // padding: (pad_h, pad_w) or (top, left, bottom, right).
  m.def("depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
        "int[] padding, int[2] dilation) -> Tensor");
  m.def("depthwise_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
        "int[2] stride, int[] padding, int[2] dilation, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  // groups is inferred: C / weight.size(1). padding as for depthwise_conv2d.
  m.def("dilated_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
        "int[] padding, int[2] dilation) -> Tensor");
  m.def("dilated_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
        "int[2] stride, int[] padding, int[2] dilation, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  // groups and offset_groups are inferred: C / weight.size(1) and offset.size(1) / (2*kh*kw).
  m.def("deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor? mask, Tensor? bias, "
        "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // Returns (grad_input, grad_weight, grad_offset, grad_mask, grad_bias); an output whose
  // mask entry is false (or grad_mask without a mask) is an empty tensor.
  m.def("deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
        "Tensor offset, Tensor? mask, int[2] stride, int[2] padding, int[2] dilation, "
        "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace convops
