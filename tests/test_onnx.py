"""ONNX export with plain torch.onnx.export, both exporters (dynamo and TorchScript), after
nothing more than ``import convops``: standard operators (DeformConv, Conv with the right group
and pads), run in onnxruntime and compared with PyTorch."""
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

import convops

EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export(model, args, path, dynamo, opset=19, dynamic_batch=False):
    names = [f"in{i}" for i in range(len(args))]
    kwargs = {"input_names": names, "output_names": ["out"]}
    if dynamic_batch:
        if dynamo:
            kwargs["dynamic_shapes"] = tuple({0: torch.export.Dim("batch")} for _ in args)
        else:
            kwargs["dynamic_axes"] = {name: {0: "batch"} for name in names + ["out"]}
    with warnings.catch_warnings():
        # The TorchScript tracer warns about the functional API's Python shape checks: with
        # fixed channel and kernel sizes those are constants of the traced graph, as they
        # should be.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch >= 2.9 deprecates the TorchScript exporter; it is still tested while it exists.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), args, path, opset_version=opset, dynamo=dynamo,
                          verbose=False, **kwargs)
    return onnx.load(path)


def _run(path, args):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]


def _expected(model, args):
    with torch.no_grad():
        return model.eval()(*args).numpy()


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _assert_standard_onnx(proto):
    """Only default-domain operators and opsets: nothing of convops (or any custom domain)."""
    onnx.checker.check_model(proto)
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}, proto.opset_import
    for node in proto.graph.node:
        assert node.domain in ("", "ai.onnx"), (node.op_type, node.domain)
        assert "convops" not in node.op_type, node.op_type


def _find(proto, op_type, **attrs):
    """The nodes of op_type whose attributes include attrs."""
    return [n for n in proto.graph.node if n.op_type == op_type
            and all(_attrs(n).get(k) == v for k, v in attrs.items())]


def _check(model, args, tmp_path, dynamo, expected_nodes):
    path = str(tmp_path / "model.onnx")
    proto = _export(model, args, path, dynamo)
    _assert_standard_onnx(proto)
    for op_type, attrs, count in expected_nodes:
        found = _find(proto, op_type, **attrs)
        assert len(found) == count, (
            f"expected {count} {op_type} with {attrs}, got "
            f"{[(n.op_type, _attrs(n)) for n in proto.graph.node if n.op_type == op_type]}")
    np.testing.assert_allclose(_run(path, args), _expected(model, args), rtol=1e-4, atol=1e-5)
    return proto


def _with_offsets(module, std=0.3):
    """A Pack module whose offset branch is not zero (zero offsets = a plain convolution)."""
    nn.init.normal_(module.conv_offset.weight, std=std)
    nn.init.normal_(module.conv_offset.bias, std=std)
    return module


class _Call(nn.Module):
    """A functional op (or a raw torch.ops call) with its weight and bias as parameters."""

    def __init__(self, fn, weight_shape, bias=True):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(weight_shape) * 0.3)
        self.bias = nn.Parameter(torch.randn(weight_shape[0])) if bias else None

    def forward(self, *inputs):
        return self.fn(self, *inputs)


def _x(c=4, h=9, w=9, n=2):
    return torch.randn(n, c, h, w)


# (name, model factory, inputs factory, [(op_type, attribute subset, count), ...])
CASES = [
    # modules
    ("DepthwiseConv2d", lambda: convops.DepthwiseConv2d(4, 3, padding=1, depth_multiplier=2),
     lambda: (_x(),), [("Conv", {"group": 4, "pads": [1, 1, 1, 1]}, 1)]),
    ("DepthwiseConv2d-strided-dilated",
     lambda: convops.DepthwiseConv2d(4, 3, stride=2, padding=2, dilation=2),
     lambda: (_x(h=10, w=11),),
     [("Conv", {"group": 4, "strides": [2, 2], "dilations": [2, 2]}, 1)]),
    # 'same' with even kernels pads asymmetrically: (2, 4) -> top 0, left 1, bottom 1, right 2
    ("DepthwiseConv2d-same-asymmetric", lambda: convops.DepthwiseConv2d(4, (2, 4), padding="same"),
     lambda: (_x(h=8, w=10),), [("Conv", {"group": 4, "pads": [0, 1, 1, 2]}, 1)]),
    ("DepthwiseSeparableConv2d", lambda: convops.DepthwiseSeparableConv2d(4, 8, 3, padding=1),
     lambda: (_x(),), [("Conv", {"group": 4}, 1), ("Conv", {"group": 1}, 1)]),
    ("DilatedConv2d", lambda: convops.DilatedConv2d(4, 6, 3, padding=4, dilation=4, groups=2),
     lambda: (_x(h=10, w=11),), [("Conv", {"group": 2, "dilations": [4, 4]}, 1)]),
    # dilation (2, 3), kernel (3, 2), 'same': top 2, left 1, bottom 2, right 2
    ("DilatedConv2d-same-asymmetric",
     lambda: convops.DilatedConv2d(4, 6, (3, 2), padding="same", dilation=(2, 3)),
     lambda: (_x(),), [("Conv", {"group": 1, "pads": [2, 1, 2, 2]}, 1)]),
    ("ASPP", lambda: convops.ASPP(4, out_channels=8, rates=(2, 3)), lambda: (_x(),),
     [("Conv", {"dilations": [2, 2]}, 1), ("Conv", {"dilations": [3, 3]}, 1)]),
    ("DeformConv2d", lambda: convops.DeformConv2d(4, 6, 3, padding=1, groups=2),
     lambda: (_x(), torch.randn(2, 18, 9, 9)),
     [("DeformConv", {"group": 2, "offset_group": 1}, 1)]),
    # a mask but no bias: ONNX's optional B input left empty before the mask
    ("DeformConv2d-mask-nobias", lambda: convops.DeformConv2d(4, 6, 3, padding=1, bias=False),
     lambda: (_x(), torch.randn(2, 18, 9, 9), torch.rand(2, 9, 9, 9)),
     [("DeformConv", {"group": 1}, 1)]),
    ("ModulatedDeformConv2d",
     lambda: convops.ModulatedDeformConv2d(4, 6, 3, padding=1, deform_groups=2),
     lambda: (_x(), torch.randn(2, 36, 9, 9), torch.rand(2, 18, 9, 9)),
     [("DeformConv", {"group": 1, "offset_group": 2}, 1)]),
    ("DeformConv2dPack", lambda: _with_offsets(convops.DeformConv2dPack(4, 6, 3, padding=1)),
     lambda: (_x(),), [("DeformConv", {"kernel_shape": [3, 3]}, 1)]),
    ("ModulatedDeformConv2dPack",
     lambda: _with_offsets(convops.ModulatedDeformConv2dPack(4, 6, 3, stride=2, padding=2,
                                                             dilation=2, deform_groups=2)),
     lambda: (_x(),),
     [("DeformConv", {"strides": [2, 2], "dilations": [2, 2], "pads": [2, 2, 2, 2],
                      "offset_group": 2}, 1)]),
    # functional ops
    ("F.depthwise_conv2d",
     lambda: _Call(lambda m, x: convops.depthwise_conv2d(x, m.weight, m.bias, stride=2,
                                                         padding=1), (8, 1, 3, 3)),
     lambda: (_x(),), [("Conv", {"group": 4, "strides": [2, 2]}, 1)]),
    ("F.dilated_conv2d",
     lambda: _Call(lambda m, x: convops.dilated_conv2d(x, m.weight, m.bias, padding=2,
                                                       dilation=2, groups=2), (6, 2, 3, 3)),
     lambda: (_x(),), [("Conv", {"group": 2, "dilations": [2, 2]}, 1)]),
    ("F.deform_conv2d-mask",
     lambda: _Call(lambda m, x, off, mask: convops.deform_conv2d(
         x, off, m.weight, m.bias, padding=2, dilation=2, mask=mask), (6, 2, 3, 3)),
     lambda: (_x(), torch.randn(2, 36, 9, 9), torch.rand(2, 18, 9, 9)),
     [("DeformConv", {"group": 2, "offset_group": 2, "dilations": [2, 2]}, 1)]),
    ("F.deform_conv2d-nobias",
     lambda: _Call(lambda m, x, off: convops.deform_conv2d(x, off, m.weight, stride=2,
                                                           padding=1), (6, 4, 3, 3), False),
     lambda: (_x(), torch.randn(2, 18, 5, 5)),
     [("DeformConv", {"strides": [2, 2]}, 1)]),
    # the raw ops with four distinct paddings (top, left, bottom, right)
    ("ops.depthwise_conv2d-pad4",
     lambda: _Call(lambda m, x: torch.ops.convops.depthwise_conv2d(
         x, m.weight, m.bias, [1, 1], [0, 1, 2, 3], [1, 1]), (4, 1, 3, 3)),
     lambda: (_x(),), [("Conv", {"group": 4, "pads": [0, 1, 2, 3]}, 1)]),
    ("ops.dilated_conv2d-pad4",
     lambda: _Call(lambda m, x: torch.ops.convops.dilated_conv2d(
         x, m.weight, None, [1, 2], [3, 0, 1, 2], [2, 1]), (6, 2, 3, 3)),
     lambda: (_x(),), [("Conv", {"group": 2, "pads": [3, 0, 1, 2]}, 1)]),
]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name,make,inputs,nodes", CASES, ids=[c[0] for c in CASES])
def test_export_runs_in_onnxruntime(name, make, inputs, nodes, dynamo, tmp_path):
    torch.manual_seed(0)
    model, args = make(), inputs()
    _check(model, args, tmp_path, dynamo, nodes)


def test_raw_pad4_matches_explicit_padding():
    """The (top, left, bottom, right) order the ONNX tests above rely on."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 4, 7, 8), torch.randn(4, 1, 3, 3)
    out = torch.ops.convops.depthwise_conv2d(x, w, None, [1, 1], [0, 1, 2, 3], [1, 1])
    ref = F.conv2d(F.pad(x, (1, 3, 0, 2)), w, groups=4)  # F.pad: (left, right, top, bottom)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_deform_below_opset_19_names_the_opset(dynamo, tmp_path):
    model = convops.DeformConv2d(4, 6, 3, padding=1)
    args = (_x(), torch.randn(2, 18, 9, 9))
    with pytest.raises(Exception, match="opset_version=19") as info:
        _export(model, args, str(tmp_path / "model.onnx"), dynamo, opset=18)
    assert "DeformConv" in str(info.value)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_depthwise_and_dilated_export_below_opset_19(dynamo, tmp_path):
    """Conv has no such limit: opset 18 works for depthwise and dilated."""
    torch.manual_seed(0)
    model = nn.Sequential(convops.DepthwiseConv2d(4, 3, padding=1),
                          convops.DilatedConv2d(4, 4, 3, padding=2, dilation=2))
    args = (_x(),)
    path = str(tmp_path / "model.onnx")
    proto = _export(model, args, path, dynamo, opset=18)
    _assert_standard_onnx(proto)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert len(_find(proto, "Conv", group=4)) == 1 and len(_find(proto, "Conv", group=1)) == 1
    np.testing.assert_allclose(_run(path, args), _expected(model, args), rtol=1e-4, atol=1e-5)


class _DCNBlock(nn.Module):
    """A detection-backbone-style residual block: conv-bn-relu stem, then a DCNv2 layer with
    its own offset/mask branch, bn, and the residual add."""

    def __init__(self, c_in=3, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c), nn.ReLU())
        self.dcn = _with_offsets(convops.ModulatedDeformConv2dPack(c, c, 3, padding=1), 0.1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.stem(x)
        return torch.relu(self.bn(self.dcn(y)) + y)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dcn_block_end_to_end_dynamic_batch(dynamo, tmp_path):
    torch.manual_seed(0)
    model = _DCNBlock()
    for bn in (model.stem[1], model.bn):  # non-trivial inference statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    path = str(tmp_path / "model.onnx")
    proto = _export(model, (torch.randn(2, 3, 12, 12),), path, dynamo, dynamic_batch=True)
    _assert_standard_onnx(proto)
    assert len(_find(proto, "DeformConv")) == 1
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), batch_dim
    x3 = torch.randn(3, 3, 12, 12)  # another batch size than the one exported with
    out = _run(path, (x3,))
    assert out.shape == (3, 8, 12, 12)
    np.testing.assert_allclose(out, _expected(model, (x3,)), rtol=1e-4, atol=1e-5)


def test_convenience_export_still_works(tmp_path):
    torch.manual_seed(0)
    model = _with_offsets(convops.DeformConv2dPack(4, 6, 3, padding=1)).eval()
    args = (_x(),)
    path = str(tmp_path / "model.onnx")
    convops.onnx.export(model, args, path, verbose=False)
    assert len(_find(onnx.load(path), "DeformConv")) == 1
    np.testing.assert_allclose(_run(path, args), _expected(model, args), rtol=1e-4, atol=1e-5)


def test_custom_translation_table_still_takes_precedence(tmp_path):
    """A table passed to torch.onnx.export overrides the translations convops registers."""
    from onnxscript import opset18 as op

    def negated_conv(input, weight, bias=None, stride=(1, 1), padding=(0, 0),
                     dilation=(1, 1)):
        return op.Neg(op.Conv(input, weight, bias, group=input.shape[1], pads=[1, 1, 1, 1]))

    path = str(tmp_path / "model.onnx")
    torch.onnx.export(convops.DepthwiseConv2d(4, 3, padding=1).eval(), (_x(),), path,
                      opset_version=19, verbose=False, custom_translation_table={
                          torch.ops.convops.depthwise_conv2d.default: negated_conv})
    assert len(_find(onnx.load(path), "Neg")) == 1


_REGISTERED = (
    "from torch.onnx._internal.exporter import _registration\n"
    "registry = _registration.ONNXRegistry.from_torchlib(opset_version=19)\n"
    "for name in ('deform_conv2d', 'depthwise_conv2d', 'dilated_conv2d'):\n"
    "    target = getattr(torch.ops.convops, name).default\n"
    "    assert registry.get_decomps(target), name\n"
)


@pytest.mark.parametrize("code", [
    # import convops stays cheap: no onnx / onnxscript until an export needs them; the
    # exporter's registry, imported later, gets the translations
    "import sys, torch, convops\n"
    "assert not {'onnx', 'onnxscript'} & set(sys.modules), "
    "sorted(m for m in sys.modules if 'onnx' in m)\n" + _REGISTERED,
    # the exporter's registry imported before convops
    "import torch\n"
    "from torch.onnx._internal.exporter import _registration\n"
    "import convops\n" + _REGISTERED,
    # without onnx, onnxscript and onnxruntime installed, import convops still works
    "import sys\n"
    "for name in ('onnx', 'onnxscript', 'onnxruntime'):\n"
    "    sys.modules[name] = None\n"
    "import convops\n"
    "assert convops.onnx.MIN_DEFORM_OPSET == 19\n",
], ids=["convops-first", "exporter-first", "without-onnx"])
def test_registration_at_import(code):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
