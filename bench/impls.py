"""The implementations a case is timed with. Each exposes the four passes over one shared set
of tensors, so every implementation sees identical inputs."""
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import convops

from .cases import Case

PassFn = Callable[[Dict[str, torch.Tensor]], object]


def make_tensors(case: Case, dtype, device, channels_last: bool, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    kh, kw = case.k
    ho, wo = case.out_hw

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = {
        "x": rand(case.N, case.C, case.H, case.W).contiguous(memory_format=fmt),
        "w": rand(case.OC, case.C // case.groups, kh, kw, scale=0.1),
        "go": rand(case.N, case.OC, ho, wo).contiguous(memory_format=fmt),
    }
    if case.suite == "deform":
        og = case.offset_groups
        t["offset"] = rand(case.N, 2 * og * kh * kw, ho, wo, scale=2.0)
        t["mask"] = torch.sigmoid(rand(case.N, og * kh * kw, ho, wo)) if case.mask else None
    return t


def _conv_args(case: Case):
    return [case.stride] * 2, [case.padding] * 2, [case.dilation] * 2


def _autograd_pass(forward, inputs: List[str]):
    def run(t):
        leaves = [t[k].detach().requires_grad_() for k in inputs]
        out = forward(dict(t, **dict(zip(inputs, leaves))))
        return torch.autograd.grad(out, leaves, t["go"])
    return run


def _aten_conv_impl(case: Case) -> Dict[str, PassFn]:
    stride, padding, dilation = _conv_args(case)
    groups = case.groups

    def fwd(t):
        return F.conv2d(t["x"], t["w"], None, stride, padding, dilation, groups)

    def bwd(mask, index):
        def run(t):
            return torch.ops.aten.convolution_backward(
                t["go"], t["x"], t["w"], None, stride, padding, dilation, False, [0, 0], groups,
                mask)[index]
        return run

    return {"fwd": fwd, "bwd_input": bwd([True, False, False], 0),
            "bwd_weight": bwd([False, True, False], 1),
            "fwd_bwd": _autograd_pass(fwd, ["x", "w"])}


def _convops_conv(case: Case, name: str) -> Dict[str, PassFn]:
    """depthwise_conv2d or dilated_conv2d: the same signature and backward op shape."""
    stride, padding, dilation = _conv_args(case)
    backward_op = getattr(torch.ops.convops, name + "_backward")
    if name == "depthwise_conv2d":
        forward = convops.depthwise_conv2d
    else:
        forward = lambda *a: convops.dilated_conv2d(*a, case.groups)  # noqa: E731

    def fwd(t):
        return forward(t["x"], t["w"], None, stride, padding, dilation)

    def bwd(mask, index):
        def run(t):
            return backward_op(t["go"], t["x"], t["w"], stride, padding, dilation, mask)[index]
        return run

    return {"fwd": fwd, "bwd_input": bwd([True, False, False], 0),
            "bwd_weight": bwd([False, True, False], 1),
            "fwd_bwd": _autograd_pass(fwd, ["x", "w"])}


def _deform_impl(case: Case, fn, backward_op) -> Dict[str, PassFn]:
    stride, padding, dilation = _conv_args(case)

    def fwd(t):
        return fn(t["x"], t["offset"], t["w"], None, stride, padding, dilation, t["mask"])

    def bwd(index):
        def run(t):
            return backward_op(t, stride, padding, dilation)[index]
        return run

    return {"fwd": fwd, "bwd_input": bwd(0), "bwd_weight": bwd(1),
            "fwd_bwd": _autograd_pass(fwd, ["x", "w", "offset"] +
                                      (["mask"] if case.mask else []))}


def _convops_deform(case: Case):
    def backward(t, stride, padding, dilation):
        # bwd_input computes what the input side of backward needs: input, offset and mask
        # gradients (they share the column gradient); bwd_weight only the weight gradient.
        gi, gw, goff, gm, _ = torch.ops.convops.deform_conv2d_backward(
            t["go"], t["x"], t["w"], t["offset"], t["mask"], stride, padding, dilation,
            [True, True, True, True, False])
        return gi, gw
    impl = _deform_impl(case, convops.deform_conv2d, backward)

    def bwd_mask(mask, index):
        def run(t):
            stride, padding, dilation = _conv_args(case)
            return torch.ops.convops.deform_conv2d_backward(
                t["go"], t["x"], t["w"], t["offset"], t["mask"], stride, padding, dilation,
                mask)[index]
        return run
    impl["bwd_input"] = bwd_mask([True, False, True, True, False], 0)
    impl["bwd_weight"] = bwd_mask([False, True, False, False, False], 1)
    return impl


def _torchvision_deform(case: Case):
    import torchvision

    def backward(t, stride, padding, dilation):
        # torchvision has no per-gradient backward: its one backward op computes them all.
        use_mask = t["mask"] is not None
        mask = t["mask"] if use_mask else torch.zeros_like(t["offset"][:, ::2])
        bias = torch.zeros(t["w"].shape[0], dtype=t["w"].dtype, device=t["w"].device)
        gi, gw, goff, gm, gb = torch.ops.torchvision._deform_conv2d_backward(
            t["go"], t["x"], t["w"], t["offset"], mask, bias, stride[0], stride[1], padding[0],
            padding[1], dilation[0], dilation[1], case.groups, case.offset_groups, use_mask)
        return gi, gw
    return _deform_impl(case, torchvision.ops.deform_conv2d, backward)


def implementations(case: Case) -> Dict[str, Dict[str, PassFn]]:
    """convops first, then the baselines; the first baseline is the correctness reference."""
    if case.suite == "depthwise":
        return {"convops": _convops_conv(case, "depthwise_conv2d"), "torch": _aten_conv_impl(case)}
    if case.suite == "dilated":
        return {"convops": _convops_conv(case, "dilated_conv2d"), "torch": _aten_conv_impl(case)}
    if case.suite == "deform":
        # "conv2d" is a regular convolution of the same shape: the floor a DCN layer sits on.
        return {"convops": _convops_deform(case), "torchvision": _torchvision_deform(case),
                "conv2d": _aten_conv_impl(case)}
    raise ValueError(f"unknown suite {case.suite}")


# What each baseline is called in tables: on GPU aten's grouped conv is cuDNN, on CPU oneDNN.
def baseline_label(name: str, device: str) -> str:
    if name == "torch":
        return "cudnn" if device == "cuda" else "onednn"
    if name == "conv2d":
        return "conv2d-floor"
    return name
