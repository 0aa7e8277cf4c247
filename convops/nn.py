"""nn.Module wrappers. Parameter names and shapes follow nn.Conv2d (depthwise, dilated) and
torchvision / mmcv (deformable), so checkpoints load either way."""
import math
from typing import Optional

import torch
from torch import nn

from . import _checks
from .functional import depthwise_conv2d


def _init_conv_params(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    # nn.Conv2d's default init, so swapping modules does not change training behaviour.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


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
        self.bias = nn.Parameter(torch.empty(self.out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_conv_params(self.weight, self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
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
