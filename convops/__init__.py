"""convops: depthwise, dilated and deformable convolution kernels for PyTorch.

The compiled kernels register themselves as ``torch.ops.convops.*``; this package adds the
friendly functional API, autograd/fake registrations and nn modules on top.
"""
import torch  # noqa: F401  (must be imported before the extension)

from . import _C  # noqa: F401  registers torch.ops.convops.*
from . import _registrations  # noqa: F401
from . import onnx  # noqa: F401  registers the ONNX export translations (imports no onnx)
from .functional import deform_conv2d, depthwise_conv2d, dilated_conv2d
from .nn import (ASPP, DeformConv2d, DeformConv2dPack, DepthwiseConv2d, DepthwiseSeparableConv2d,
                 DilatedConv2d, ModulatedDeformConv2d, ModulatedDeformConv2dPack)

__version__ = _C.version

__all__ = [
    "ASPP",
    "dilated_conv2d",
    "DilatedConv2d",
    "deform_conv2d",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "depthwise_conv2d",
    "DepthwiseConv2d",
    "DepthwiseSeparableConv2d",
]
