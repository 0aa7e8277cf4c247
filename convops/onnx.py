"""ONNX export of the convops ops as standard ONNX operators.

After ``import convops``, plain ``torch.onnx.export`` works with both of torch's exporters:

    torch.onnx.export(model, (x,), "model.onnx", opset_version=19)               # dynamo (default)
    torch.onnx.export(model, (x,), "model.onnx", opset_version=19, dynamo=False)  # TorchScript

deform_conv2d becomes ONNX ``DeformConv`` (offsets as (dy, dx) per tap, the same layout), which
exists from opset 19 on; asking for a lower opset raises an error that says so.
depthwise_conv2d and dilated_conv2d become ``Conv`` with the right ``group`` (lower opsets too).

How the translations reach the exporters, without importing onnx or onnxscript at
``import convops`` (the dynamo exporter's registry module alone costs about a second to import):
- TorchScript exporter: ``torch.onnx.register_custom_op_symbolic`` at import (``torch.onnx`` is
  cheap and needs neither package).
- dynamo exporter: it builds a fresh registry for every export with
  ``ONNXRegistry.from_torchlib``; once torch's registry module has been imported (now, or later
  through a one-shot import hook), that constructor is wrapped so each registry it returns also
  holds the convops translations. They go in as custom translations, so a
  ``custom_translation_table`` passed to ``torch.onnx.export`` still takes precedence.

``export`` below stays as a convenience (the dynamo exporter at opset 19).
"""
import importlib.abc
import sys
import warnings
from typing import Dict

import torch
import torch.onnx

#: DeformConv was added to the ONNX standard in opset 19.
MIN_DEFORM_OPSET = 19


def _pads(padding):
    """The ops' padding, (h, w) or (top, left, bottom, right), as ONNX ``pads``
    [x1_begin, x2_begin, x1_end, x2_end] = [top, left, bottom, right]."""
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        return [padding[0], padding[1], padding[0], padding[1]]
    if len(padding) != 4:
        raise ValueError(f"padding must have 2 or 4 values, got {padding}")
    return padding


def _opset_error(opset) -> str:
    got = f" (this export targets opset {opset})" if opset is not None else ""
    return (f"convops.deform_conv2d exports to the ONNX operator DeformConv, which exists from "
            f"opset {MIN_DEFORM_OPSET} on{got}: pass opset_version={MIN_DEFORM_OPSET} or higher "
            f"to torch.onnx.export")


# --- dynamo exporter: onnxscript translations (traced, called with onnx_ir values) -----------

def _dynamo_deform_conv2d(input, weight, offset, mask=None, bias=None, stride=(1, 1),
                          padding=(0, 0), dilation=(1, 1)):
    from onnxscript import opset19 as op

    kh, kw = weight.shape[2], weight.shape[3]
    return op.DeformConv(input, weight, offset, bias, mask, dilations=list(dilation),
                         group=input.shape[1] // weight.shape[1], kernel_shape=[kh, kw],
                         offset_group=offset.shape[1] // (2 * kh * kw), pads=_pads(padding),
                         strides=list(stride))


def _dynamo_deform_conv2d_too_old(input, weight, offset, mask=None, bias=None, stride=(1, 1),
                                  padding=(0, 0), dilation=(1, 1)):
    # Registered instead of the one above when the export targets an opset below 19: torch's
    # registry gives it no other way to report the opset, and without a translation the
    # exporter's error would only say that none was found.
    raise ValueError(_opset_error(None))


def _dynamo_conv(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    from onnxscript import opset18 as op  # Conv is unchanged since opset 11

    return op.Conv(input, weight, bias, dilations=list(dilation),
                   group=input.shape[1] // weight.shape[1],
                   kernel_shape=[weight.shape[2], weight.shape[3]], pads=_pads(padding),
                   strides=list(stride))


def custom_translation_table(opset_version: int = MIN_DEFORM_OPSET) -> Dict:
    """The convops translations as a ``custom_translation_table`` for the dynamo exporter.
    No longer needed (``import convops`` registers them); kept for explicit use."""
    deform = (_dynamo_deform_conv2d if opset_version >= MIN_DEFORM_OPSET
              else _dynamo_deform_conv2d_too_old)
    return {
        torch.ops.convops.deform_conv2d.default: deform,
        torch.ops.convops.depthwise_conv2d.default: _dynamo_conv,
        torch.ops.convops.dilated_conv2d.default: _dynamo_conv,
    }


def _add_to_registry(registry) -> None:
    for op, function in custom_translation_table(registry.opset_version).items():
        registry.register_op(op, function)


def _wrap_registry_constructor(registration) -> None:
    """Make torch's ONNXRegistry.from_torchlib add the convops translations to every registry
    it builds (the dynamo exporter builds one per export)."""
    cls = registration.ONNXRegistry
    original = cls.from_torchlib
    if getattr(original, "_convops_translations", False):
        return
    original = original.__func__

    def from_torchlib(cls, *args, **kwargs):
        registry = original(cls, *args, **kwargs)
        _add_to_registry(registry)
        return registry

    from_torchlib.__doc__ = original.__doc__
    from_torchlib._convops_translations = True
    cls.from_torchlib = classmethod(from_torchlib)


# --- TorchScript exporter (dynamo=False): symbolic functions ----------------------------------

def _static_dims(value, what: str):
    from torch.onnx import symbolic_helper

    sizes = symbolic_helper._get_tensor_sizes(value)
    if sizes is None or any(s is None for s in sizes[1:]):
        raise ValueError(f"convops ONNX export: the channel and kernel sizes of {what} must be "
                         f"known at export time, got sizes {sizes}")
    return sizes


def _ts_conv(g, input, weight, bias, stride, padding, dilation):
    from torch.onnx import symbolic_helper

    stride = symbolic_helper._get_const(stride, "is", "stride")
    padding = symbolic_helper._get_const(padding, "is", "padding")
    dilation = symbolic_helper._get_const(dilation, "is", "dilation")
    channels = _static_dims(input, "the input")[1]
    _, cpg, kh, kw = _static_dims(weight, "the weight")
    inputs = [input, weight]
    if not symbolic_helper._is_none(bias):
        inputs.append(bias)
    return g.op("Conv", *inputs, dilations_i=dilation, group_i=channels // cpg,
                kernel_shape_i=[kh, kw], pads_i=_pads(padding), strides_i=stride)


def _ts_deform_conv2d(g, input, weight, offset, mask, bias, stride, padding, dilation):
    from torch.onnx import symbolic_helper

    if g.opset < MIN_DEFORM_OPSET:
        raise ValueError(_opset_error(g.opset))
    stride = symbolic_helper._get_const(stride, "is", "stride")
    padding = symbolic_helper._get_const(padding, "is", "padding")
    dilation = symbolic_helper._get_const(dilation, "is", "dilation")
    channels = _static_dims(input, "the input")[1]
    _, cpg, kh, kw = _static_dims(weight, "the weight")
    offset_channels = _static_dims(offset, "the offset")[1]
    # ONNX input order: X, W, offset, B, mask; an absent B before a present mask is left empty.
    inputs = [input, weight, offset]
    has_bias, has_mask = not symbolic_helper._is_none(bias), not symbolic_helper._is_none(mask)
    if has_bias or has_mask:
        inputs.append(bias if has_bias else symbolic_helper._optional_input_placeholder_tensor(g))
    if has_mask:
        inputs.append(mask)
    return g.op("DeformConv", *inputs, dilations_i=dilation, group_i=channels // cpg,
                kernel_shape_i=[kh, kw], offset_group_i=offset_channels // (2 * kh * kw),
                pads_i=_pads(padding), strides_i=stride)


def _register_torchscript_symbolics() -> None:
    # Registered at opset 9, the TorchScript exporter's base opset: found for every opset it
    # exports (7 to 20). deform_conv2d checks the opset itself to name the one it needs.
    for name, fn in (("depthwise_conv2d", _ts_conv), ("dilated_conv2d", _ts_conv),
                     ("deform_conv2d", _ts_deform_conv2d)):
        torch.onnx.register_custom_op_symbolic(f"convops::{name}", fn, 9)


# --- registration at import --------------------------------------------------------------------

_REGISTRATION_MODULE = "torch.onnx._internal.exporter._registration"


class _CallAfterExec(importlib.abc.Loader):
    """Wraps a module's loader to run a callback once the module has executed."""

    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        # Hand the module its own loader back; nothing of the hook stays behind.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._callback(module)


class _OnImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: runs callback(module) right after the named module is imported."""

    def __init__(self, name, callback):
        self._name, self._callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self._name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:  # the spec the import would have found without us
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CallAfterExec(spec.loader, self._callback)
                return spec
        return None


def _on_registration_module(module) -> None:
    try:
        _wrap_registry_constructor(module)
    except Exception as e:  # never break torch.onnx for a convops problem
        warnings.warn(f"convops could not register its translations with torch's ONNX "
                      f"(dynamo) exporter: {e!r}; pass custom_translation_table="
                      f"convops.onnx.custom_translation_table() to torch.onnx.export instead")


def _register() -> None:
    _register_torchscript_symbolics()
    module = sys.modules.get(_REGISTRATION_MODULE)
    if module is not None:
        _on_registration_module(module)
    elif not any(isinstance(f, _OnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnImport(_REGISTRATION_MODULE, _on_registration_module))


def export(model, args, f=None, **kwargs):
    """``torch.onnx.export`` with the dynamo exporter at opset 19. The convops translations
    are passed explicitly too (they do not depend on the registration at import); entries of
    a ``custom_translation_table`` given here win."""
    kwargs.setdefault("opset_version", MIN_DEFORM_OPSET)
    table = custom_translation_table(kwargs["opset_version"])
    table.update(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table,
                             **kwargs)


_register()
