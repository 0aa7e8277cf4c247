"""ONNX export: translations of the convops ops to standard ONNX operators (opset 19).

    import convops.onnx
    convops.onnx.export(model, (x,), "model.onnx")        # or:
    torch.onnx.export(model, (x,), dynamo=True, opset_version=19,
                      custom_translation_table=convops.onnx.custom_translation_table())

deform_conv2d becomes ONNX ``DeformConv`` (offsets as (dy, dx) per tap, the same layout), and
depthwise_conv2d / dilated_conv2d become ``Conv`` with the right ``group``. Needs the
``onnxscript`` package (torch's dynamo-based exporter uses it).
"""
from typing import Dict

import torch


def _pads(padding):
    padding = list(padding)
    if len(padding) == 2:  # (h, w) -> ONNX (top, left, bottom, right)
        return [padding[0], padding[1], padding[0], padding[1]]
    return padding  # already (top, left, bottom, right)


def custom_translation_table() -> Dict:
    from onnxscript import opset19 as op

    def deform_conv2d(input, weight, offset, mask=None, bias=None, stride=(1, 1),
                      padding=(0, 0), dilation=(1, 1)):
        kh, kw = weight.shape[2], weight.shape[3]
        return op.DeformConv(input, weight, offset, bias, mask, dilations=list(dilation),
                             group=input.shape[1] // weight.shape[1],
                             kernel_shape=[kh, kw], offset_group=offset.shape[1] // (2 * kh * kw),
                             pads=_pads(padding), strides=list(stride))

    def conv(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
        return op.Conv(input, weight, bias, dilations=list(dilation),
                       group=input.shape[1] // weight.shape[1],
                       kernel_shape=[weight.shape[2], weight.shape[3]], pads=_pads(padding),
                       strides=list(stride))

    return {
        torch.ops.convops.deform_conv2d.default: deform_conv2d,
        torch.ops.convops.depthwise_conv2d.default: conv,
        torch.ops.convops.dilated_conv2d.default: conv,
    }


def export(model, args, f=None, **kwargs):
    """torch.onnx.export with the dynamo exporter, opset 19 and the convops translations."""
    kwargs.setdefault("opset_version", 19)
    table = dict(custom_translation_table(), **kwargs.pop("custom_translation_table", {}))
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table,
                             **kwargs)
