"""nn.Module wrappers. Parameter names and shapes follow nn.Conv2d (depthwise, dilated) and
torchvision / mmcv (deformable), so checkpoints load either way."""
import math
from typing import List, Optional

import torch
from torch import nn

from . import _checks
from .functional import deform_conv2d, depthwise_conv2d, dilated_conv2d


def _init_conv_params(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    # nn.Conv2d's default init, so swapping modules does not change training behaviour.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _op_args(module: nn.Module) -> None:
    """The normalized int lists the ops take, stored as typed attributes so TorchScript can
    call torch.ops.convops.* directly (the Python checks are not scriptable)."""
    pad4 = _checks.padding4(module.padding, module.kernel_size, module.stride, module.dilation)
    module._op_stride: List[int] = list(module.stride)
    module._op_padding: List[int] = _checks.compact_padding(pad4)
    module._op_dilation: List[int] = list(module.dilation)


def _conv_params(module: nn.Module, in_channels: int, out_channels: int, groups: int,
                 bias: bool, device, dtype) -> None:
    """weight (OC, C/groups, kh, kw) and optional bias, as nn.Conv2d names and initializes
    them, on a module whose kernel_size is set."""
    factory = {"device": device, "dtype": dtype}
    module.weight = nn.Parameter(
        torch.empty(out_channels, in_channels // groups, *module.kernel_size, **factory))
    if bias:
        module.bias = nn.Parameter(torch.empty(out_channels, **factory))
    else:
        module.register_parameter("bias", None)
    _init_conv_params(module.weight, module.bias)


class DepthwiseConv2d(nn.Module):
    """Depthwise convolution: ``nn.Conv2d(channels, channels * depth_multiplier, kernel_size,
    groups=channels)`` with convops kernels. state_dict keys and shapes equal nn.Conv2d's."""

    def __init__(self, channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, depth_multiplier: int = 1, device=None, dtype=None):
        super().__init__()
        if channels < 1 or depth_multiplier < 1:
            raise ValueError(f"channels and depth_multiplier must be >= 1, got {channels} and "
                             f"{depth_multiplier}")
        self.in_channels = channels
        self.out_channels = channels * depth_multiplier
        self.kernel_size = _checks.positive_pair(kernel_size, "kernel_size")
        self.stride = _checks.positive_pair(stride, "stride")
        self.dilation = _checks.positive_pair(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _checks.pair(padding, "padding")
        _checks.padding4(self.padding, self.kernel_size, self.stride, self.dilation)
        self.groups = channels
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_channels, 1, *self.kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        _op_args(self)

    def reset_parameters(self) -> None:
        _init_conv_params(self.weight, self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript: the op itself (its C++ checks still run)
            return torch.ops.convops.depthwise_conv2d(input, self.weight, self.bias,
                                                      self._op_stride, self._op_padding,
                                                      self._op_dilation)
        return self._checked_forward(input)

    @torch.jit.unused
    def _checked_forward(self, input: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(input, self.weight, self.bias, self.stride, self.padding,
                                self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")


class DepthwiseSeparableConv2d(nn.Module):
    """Depthwise k×k convolution followed by a pointwise 1×1 convolution (MobileNet's block)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.depthwise = DepthwiseConv2d(in_channels, kernel_size, stride, padding, dilation,
                                         bias=bias, device=device, dtype=dtype)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias, device=device,
                                   dtype=dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(input))


class DilatedConv2d(nn.Module):
    """Dilated (atrous) convolution with convops kernels; parameters and state_dict identical
    to ``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
    bias)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must "
                             f"be divisible by groups={groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _checks.positive_pair(kernel_size, "kernel_size")
        self.stride = _checks.positive_pair(stride, "stride")
        self.dilation = _checks.positive_pair(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _checks.pair(padding, "padding")
        _checks.padding4(self.padding, self.kernel_size, self.stride, self.dilation)
        self.groups = groups
        _conv_params(self, in_channels, out_channels, groups, bias, device, dtype)
        _op_args(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.convops.dilated_conv2d(input, self.weight, self.bias,
                                                    self._op_stride, self._op_padding,
                                                    self._op_dilation)
        return self._checked_forward(input)

    @torch.jit.unused
    def _checked_forward(self, input: torch.Tensor) -> torch.Tensor:
        return dilated_conv2d(input, self.weight, self.bias, self.stride, self.padding,
                              self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


def _conv_bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU())


class _ASPPPooling(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.project = _conv_bn_relu(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                     out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.pool(x))
        return torch.nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear",
                                               align_corners=False)


class ASPP(nn.Module):
    """DeepLabV3's Atrous Spatial Pyramid Pooling head: a 1x1 branch, one 3x3 DilatedConv2d
    branch per rate, an image-pooling branch (each with BN and ReLU), concatenation and a 1x1
    projection (BN, ReLU, dropout)."""

    def __init__(self, in_channels: int, out_channels: int = 256, rates=(6, 12, 18),
                 dropout: float = 0.5):
        super().__init__()
        branches = [_conv_bn_relu(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                  out_channels)]
        for rate in rates:
            branches.append(_conv_bn_relu(
                DilatedConv2d(in_channels, out_channels, 3, padding=rate, dilation=rate,
                              bias=False), out_channels))
        branches.append(_ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class _DeformConvBase(nn.Module):
    """Shared parameters of the deformable modules: weight (OC, C/groups, kh, kw), bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, deform_groups: int = 1, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError(f"in_channels={in_channels} must be divisible by groups={groups}")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels={out_channels} must be divisible by groups={groups}")
        if in_channels % deform_groups != 0:
            raise ValueError(f"in_channels={in_channels} must be divisible by "
                             f"deform_groups={deform_groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _checks.positive_pair(kernel_size, "kernel_size")
        self.stride = _checks.positive_pair(stride, "stride")
        self.padding = _checks.pair(padding, "padding")
        self.dilation = _checks.positive_pair(dilation, "dilation")
        self.groups = groups
        self.deform_groups = deform_groups
        _conv_params(self, in_channels, out_channels, groups, bias, device, dtype)
        _op_args(self)

    def _deform(self, input: torch.Tensor, offset: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.convops.deform_conv2d(input, self.weight, offset, mask, self.bias,
                                                   self._op_stride, self._op_padding,
                                                   self._op_dilation)
        return self._checked_deform(input, offset, mask)

    @torch.jit.unused
    def _checked_deform(self, input: torch.Tensor, offset: torch.Tensor,
                        mask: Optional[torch.Tensor]) -> torch.Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, deform_groups={self.deform_groups}, "
                f"bias={self.bias is not None}")


class DeformConv2d(_DeformConvBase):
    """torchvision.ops.DeformConv2d's constructor, forward and state_dict (weight, bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, 1, bias, device, dtype)

    def forward(self, input: torch.Tensor, offset: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._deform(input, offset, mask)


class ModulatedDeformConv2d(_DeformConvBase):
    """mmcv's ModulatedDeformConv2d (DCNv2): forward(x, offset, mask), same parameter names."""

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._deform(x, offset, mask)


def _zero_offset_conv(module, channels_per_tap: int, device, dtype) -> nn.Conv2d:
    kh, kw = module.kernel_size
    conv = nn.Conv2d(module.in_channels, module.deform_groups * channels_per_tap * kh * kw,
                     module.kernel_size, module.stride, module.padding, module.dilation,
                     bias=True, device=device, dtype=dtype)
    # Zero-initialized, so a freshly built Pack module starts as a plain convolution.
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class DeformConv2dPack(_DeformConvBase):
    """mmcv's DeformConv2dPack: predicts its own offsets with ``conv_offset`` (2*dg*kh*kw
    channels, zero-initialized). Defaults follow mmcv (bias=False)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, deform_groups: int = 1, bias: bool = False,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deform_groups, bias, device, dtype)
        self.conv_offset = _zero_offset_conv(self, 2, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._deform(x, self.conv_offset(x))


class ModulatedDeformConv2dPack(_DeformConvBase):
    """mmcv's ModulatedDeformConv2dPack (DCNv2): ``conv_offset`` predicts 3*dg*kh*kw channels;
    the first 2*dg*kh*kw are the offsets, the sigmoid of the rest the mask."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, deform_groups: int = 1, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deform_groups, bias, device, dtype)
        self.conv_offset = _zero_offset_conv(self, 3, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_offset(x)
        split = 2 * self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, mask = out[:, :split], torch.sigmoid(out[:, split:])
        return self._deform(x, offset, mask)
