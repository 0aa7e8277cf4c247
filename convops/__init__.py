"""convops: depthwise, dilated and deformable convolution kernels for PyTorch.

The compiled kernels register themselves as ``torch.ops.convops.*``; this package adds the
friendly functional API, autograd/fake registrations and nn modules on top.
"""
import torch  # noqa: F401  (must be imported before the extension)

from . import _C  # noqa: F401  registers torch.ops.convops.*
from . import _registrations  # noqa: F401
from .functional import depthwise_conv2d
from .nn import DepthwiseConv2d, DepthwiseSeparableConv2d

__version__ = _C.version

__all__ = [
    "depthwise_conv2d",
    "DepthwiseConv2d",
    "DepthwiseSeparableConv2d",
]
