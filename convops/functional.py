"""The functional API: validate and normalize arguments, then call torch.ops.convops.*."""
from typing import Optional

import torch

from . import _checks


def _conv_common(input, weight, bias, stride, padding, dilation, weight_layout: str):
    """Checks shared by the dense-style ops; returns (stride, dilation, pad4)."""
    _checks.tensor(input, "input")
    _checks.tensor(weight, "weight")
    if bias is not None:
        _checks.tensor(bias, "bias")
    _checks.dims(input, "input", 4, "(N, C, H, W)")
    _checks.dims(weight, "weight", 4, weight_layout)
    _checks.same_dtype_device(input, "input", weight=weight, bias=bias)
    kernel = tuple(weight.shape[2:])
    if kernel[0] < 1 or kernel[1] < 1:
        raise ValueError(f"weight has an empty kernel: shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    stride = _checks.positive_pair(stride, "stride")
    dilation = _checks.positive_pair(dilation, "dilation")
    pad4 = _checks.padding4(padding, kernel, stride, dilation)
    return stride, dilation, pad4


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, stride=1, padding=0,
                     dilation=1) -> torch.Tensor:
    """Depthwise 2-D convolution, the same as ``F.conv2d(input, weight, bias, stride, padding,
    dilation, groups=input.shape[1])``.

    input: (N, C, H, W), NCHW or channels_last (the output keeps the input's layout).
    weight: (C * m, 1, kh, kw) for a channel multiplier m >= 1. bias: (C * m,) or None.
    stride, dilation: int or pair. padding: int, pair, 'same' (stride 1) or 'valid'.
    """
    what = "depthwise_conv2d"
    stride, dilation, pad4 = _conv_common(input, weight, bias, stride, padding, dilation,
                                          "(C*m, 1, kh, kw)")
    channels = input.shape[1]
    if channels < 1 or weight.shape[1] != 1 or weight.shape[0] < 1 or \
            weight.shape[0] % channels != 0:
        raise ValueError(f"weight must be (C*m, 1, kh, kw) with C={channels} input channels and "
                         f"m >= 1, got shape {tuple(weight.shape)}")
    _checks.output_size(input.shape[2:], weight.shape[2:], stride, pad4, dilation, what)
    return torch.ops.convops.depthwise_conv2d(input, weight, bias, list(stride),
                                              _checks.compact_padding(pad4), list(dilation))


def dilated_conv2d(input: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1,
                   groups: int = 1) -> torch.Tensor:
    """Dilated (atrous) 2-D convolution with convops's own kernels; the semantics of
    ``F.conv2d(input, weight, bias, stride, padding, dilation, groups)``.

    weight: (OC, C/groups, kh, kw); padding: int, pair, 'same' (stride 1) or 'valid'.
    """
    what = "dilated_conv2d"
    stride, dilation, pad4 = _conv_common(input, weight, bias, stride, padding, dilation,
                                          "(OC, C/groups, kh, kw)")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    channels, oc = input.shape[1], weight.shape[0]
    if channels < 1:
        raise ValueError(f"input has no channels: shape {tuple(input.shape)}")
    if channels % groups != 0:
        raise ValueError(f"in_channels={channels} is not divisible by groups={groups}")
    if oc < 1 or oc % groups != 0:
        raise ValueError(f"weight.shape[0]={oc} (out_channels) is not divisible by "
                         f"groups={groups}")
    if weight.shape[1] != channels // groups:
        raise ValueError(f"weight must be (OC, C/groups, kh, kw) = ({oc}, {channels // groups}, "
                         f"kh, kw) for C={channels}, groups={groups}; got {tuple(weight.shape)}")
    _checks.output_size(input.shape[2:], weight.shape[2:], stride, pad4, dilation, what)
    return torch.ops.convops.dilated_conv2d(input, weight, bias, list(stride),
                                            _checks.compact_padding(pad4), list(dilation))


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deformable convolution (DCNv1, or DCNv2 with ``mask``), with the signature and semantics
    of ``torchvision.ops.deform_conv2d``.

    input (N, C, H, W); offset (N, 2*og*kh*kw, Ho, Wo) holding (dy, dx) per kernel tap;
    weight (OC, C/groups, kh, kw); mask (N, og*kh*kw, Ho, Wo) or None; bias (OC,) or None.
    groups is inferred from the weight, the offset groups og from the offset.
    """
    what = "deform_conv2d"
    for name, t in (("input", input), ("offset", offset), ("weight", weight)):
        _checks.tensor(t, name)
        _checks.dims(t, name, 4, {"input": "(N, C, H, W)", "offset": "(N, 2*og*kh*kw, Ho, Wo)",
                                  "weight": "(OC, C/groups, kh, kw)"}[name])
    if mask is not None:
        _checks.tensor(mask, "mask")
        _checks.dims(mask, "mask", 4, "(N, og*kh*kw, Ho, Wo)")
    if bias is not None:
        _checks.tensor(bias, "bias")
    _checks.same_dtype_device(input, "input", offset=offset, weight=weight, mask=mask, bias=bias)
    n, c = input.shape[:2]
    oc, cpg, kh, kw = weight.shape
    if c < 1:
        raise ValueError(f"input has no channels: shape {tuple(input.shape)}")
    if cpg < 1 or c % cpg != 0:
        raise ValueError(f"in_channels={c} is not divisible by weight.shape[1]={cpg}: "
                         f"weight {tuple(weight.shape)} must be (OC, C/groups, kh, kw)")
    groups = c // cpg
    if oc < 1 or oc % groups != 0:
        raise ValueError(f"weight.shape[0]={oc} (out_channels) is not divisible by "
                         f"groups={groups} (weight {tuple(weight.shape)}, input "
                         f"{tuple(input.shape)})")
    if kh < 1 or kw < 1:
        raise ValueError(f"weight has an empty kernel: shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != oc):
        raise ValueError(f"bias must have shape ({oc},), got {tuple(bias.shape)}")
    stride = _checks.positive_pair(stride, "stride")
    dilation = _checks.positive_pair(dilation, "dilation")
    padding = _checks.pair(padding, "padding")
    if padding[0] < 0 or padding[1] < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    pad4 = (padding[0], padding[1], padding[0], padding[1])
    ho, wo = _checks.output_size(input.shape[2:], (kh, kw), stride, pad4, dilation, what)
    taps = kh * kw
    if offset.shape[1] < 1 or offset.shape[1] % (2 * taps) != 0:
        raise ValueError(f"offset has {offset.shape[1]} channels; it must be 2*offset_groups*kh*kw "
                         f"= a multiple of {2 * taps} (offset {tuple(offset.shape)}, kernel "
                         f"{kh}x{kw})")
    offset_groups = offset.shape[1] // (2 * taps)
    if c % offset_groups != 0:
        raise ValueError(f"in_channels={c} is not divisible by offset_groups={offset_groups} "
                         f"(from offset {tuple(offset.shape)})")
    if tuple(offset.shape[2:]) != (ho, wo) or offset.shape[0] != n:
        raise ValueError(f"offset must be ({n}, {offset.shape[1]}, {ho}, {wo}) to match the "
                         f"batch and output size, got {tuple(offset.shape)}")
    if mask is not None:
        expected = (n, offset_groups * taps, ho, wo)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must be {expected} (offset_groups*kh*kw channels), got "
                             f"{tuple(mask.shape)}")
    return torch.ops.convops.deform_conv2d(input, weight, offset, mask, bias, list(stride),
                                           list(padding), list(dilation))
