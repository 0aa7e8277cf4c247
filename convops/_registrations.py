"""Fake (meta) kernels for every op, registered with torch.library.

Fake kernels let torch.compile / torch.export trace the ops without running them; they must
produce exactly the shapes, dtypes and memory formats the real kernels produce. The autograd
kernels are in C++ (csrc/autograd.cpp), so calls that need no gradient stay out of Python.
"""
import torch
from torch._prims_common import suggest_memory_format

from ._checks import output_size


def _pad4(padding):
    padding = list(padding)
    return padding if len(padding) == 4 else [padding[0], padding[1], padding[0], padding[1]]


def _empty_like_layout(ref: torch.Tensor, shape):
    return torch.empty(shape, dtype=ref.dtype, device=ref.device,
                       memory_format=suggest_memory_format(ref))


# --- depthwise_conv2d and dilated_conv2d (same signatures) -----------------------------------

def _register_conv(name: str):
    @torch.library.register_fake(f"convops::{name}")
    def _fake(input, weight, bias, stride, padding, dilation):
        ho, wo = output_size(input.shape[2:], weight.shape[2:], stride, _pad4(padding),
                             dilation, name)
        return _empty_like_layout(input, (input.shape[0], weight.shape[0], ho, wo))

    @torch.library.register_fake(f"convops::{name}_backward")
    def _backward_fake(grad_output, input, weight, stride, padding, dilation, output_mask):
        grad_input = _empty_like_layout(input, input.shape) if output_mask[0] \
            else input.new_empty(0)
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) \
            if output_mask[1] else weight.new_empty(0)
        grad_bias = weight.new_empty(weight.shape[0]) if output_mask[2] else weight.new_empty(0)
        return grad_input, grad_weight, grad_bias


_register_conv("depthwise_conv2d")
_register_conv("dilated_conv2d")


# --- deform_conv2d ----------------------------------------------------------------------------

@torch.library.register_fake("convops::deform_conv2d")
def _deform_conv2d_fake(input, weight, offset, mask, bias, stride, padding, dilation):
    ho, wo = output_size(input.shape[2:], weight.shape[2:], stride, _pad4(padding), dilation,
                         "deform_conv2d")
    return _empty_like_layout(input, (input.shape[0], weight.shape[0], ho, wo))


@torch.library.register_fake("convops::deform_conv2d_backward")
def _deform_conv2d_backward_fake(grad_output, input, weight, offset, mask, stride, padding,
                                 dilation, output_mask):
    def maybe(wanted, make, like):
        return make() if wanted else like.new_empty(0)
    return (
        maybe(output_mask[0], lambda: _empty_like_layout(input, input.shape), input),
        maybe(output_mask[1], lambda: torch.empty_like(weight,
                                                       memory_format=torch.contiguous_format),
              weight),
        maybe(output_mask[2], lambda: torch.empty_like(offset,
                                                       memory_format=torch.contiguous_format),
              offset),
        maybe(output_mask[3] and mask is not None,
              lambda: torch.empty_like(mask, memory_format=torch.contiguous_format), offset),
        maybe(output_mask[4], lambda: weight.new_empty(weight.shape[0]), weight),
    )
