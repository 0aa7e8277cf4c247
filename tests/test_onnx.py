"""ONNX export to standard operators (DeformConv, Conv) and a run in onnxruntime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import convops
import convops.onnx


def _export_and_run(module, args, tmp_path):
    path = str(tmp_path / "model.onnx")
    convops.onnx.export(module.eval(), args, path)
    graph_ops = [node.op_type for node in onnx.load(path).graph.node]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    out = session.run(None, feeds)[0]
    with torch.no_grad():
        expected = module(*args).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    return graph_ops


def _offset_module(module):
    torch.nn.init.normal_(module.conv_offset.weight, std=0.3)
    return module


DEFORM_CASES = [
    ("DeformConv2d", lambda: convops.DeformConv2d(4, 6, 3, padding=1, groups=2),
     lambda x: (x, torch.randn(2, 18, 9, 9))),
    ("ModulatedDeformConv2d", lambda: convops.ModulatedDeformConv2d(4, 6, 3, padding=1,
                                                                    deform_groups=2),
     lambda x: (x, torch.randn(2, 36, 9, 9), torch.rand(2, 18, 9, 9))),
    ("DeformConv2dPack", lambda: _offset_module(convops.DeformConv2dPack(4, 6, 3, padding=1)),
     lambda x: (x,)),
    ("ModulatedDeformConv2dPack",
     lambda: _offset_module(convops.ModulatedDeformConv2dPack(4, 6, 3, stride=2, padding=1)),
     lambda x: (x,)),
]


@pytest.mark.parametrize("name,make,inputs", DEFORM_CASES, ids=[c[0] for c in DEFORM_CASES])
def test_deformable_modules_export_to_deformconv(name, make, inputs, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    ops = _export_and_run(make(), inputs(x), tmp_path)
    assert "DeformConv" in ops, ops


@pytest.mark.parametrize("module", [
    convops.DepthwiseConv2d(4, 3, padding=1, depth_multiplier=2),
    convops.DepthwiseConv2d(4, (3, 4), padding="same"),
    convops.DilatedConv2d(4, 6, 3, padding=4, dilation=4, groups=2),
], ids=["depthwise", "depthwise-same-even", "dilated"])
def test_depthwise_and_dilated_export_to_conv(module, tmp_path):
    ops = _export_and_run(module, (torch.randn(2, 4, 10, 11),), tmp_path)
    assert "Conv" in ops and not any(o.startswith("convops") for o in ops), ops
