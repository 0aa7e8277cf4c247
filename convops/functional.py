"""The functional API: validate and normalize arguments, then call torch.ops.convops.*."""
from typing import Optional

import torch

from . import _checks


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, stride=1, padding=0,
                     dilation=1) -> torch.Tensor:
    """Depthwise 2-D convolution, the same as ``F.conv2d(input, weight, bias, stride, padding,
    dilation, groups=input.shape[1])``.

    input: (N, C, H, W), NCHW or channels_last (the output keeps the input's layout).
    weight: (C * m, 1, kh, kw) for a channel multiplier m >= 1. bias: (C * m,) or None.
    stride, dilation: int or pair. padding: int, pair, 'same' (stride 1) or 'valid'.
    """
    _checks.tensor(input, "input")
    _checks.tensor(weight, "weight")
    if bias is not None:
        _checks.tensor(bias, "bias")
    _checks.dims(input, "input", 4, "(N, C, H, W)")
    _checks.dims(weight, "weight", 4, "(C*m, 1, kh, kw)")
    _checks.same_dtype_device(input, "input", weight=weight, bias=bias)
    channels = input.shape[1]
    if channels < 1 or weight.shape[1] != 1 or weight.shape[0] < 1 or \
            weight.shape[0] % channels != 0:
        raise ValueError(f"weight must be (C*m, 1, kh, kw) with C={channels} input channels and "
                         f"m >= 1, got shape {tuple(weight.shape)}")
    kernel = (weight.shape[2], weight.shape[3])
    if kernel[0] < 1 or kernel[1] < 1:
        raise ValueError(f"weight has an empty kernel: shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    stride = _checks.positive_pair(stride, "stride")
    dilation = _checks.positive_pair(dilation, "dilation")
    pad4 = _checks.padding4(padding, kernel, stride, dilation)
    _checks.output_size(input.shape[2:], kernel, stride, pad4, dilation, "depthwise_conv2d")
    return torch.ops.convops.depthwise_conv2d(input, weight, bias, list(stride),
                                              _checks.compact_padding(pad4), list(dilation))
