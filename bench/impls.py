"""The implementations a case is timed with. Each exposes the four passes over one shared set
of tensors, so every implementation sees identical inputs."""
from typing import Callable, Dict, List, Optional

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

    def bwd_all(t):
        return torch.ops.aten.convolution_backward(
            t["go"], t["x"], t["w"], None, stride, padding, dilation, False, [0, 0], groups,
            [True, True, False])[:2]

    return {"fwd": fwd, "bwd_input": bwd([True, False, False], 0),
            "bwd_weight": bwd([False, True, False], 1), "bwd": bwd_all,
            "fwd_bwd": _autograd_pass(fwd, ["x", "w"])}


class NotTimed:
    """A pass an implementation is not timed on (not like with like); still callable as the
    gate's reference when it can compute the same values."""

    def __init__(self, reason, reference=None):
        self.reason, self.reference = reason, reference

    def __call__(self, t):
        if self.reference is None:
            raise NotImplementedError(self.reason)
        return self.reference(t)


def _cudnn_direct(case: Case) -> Dict[str, PassFn]:
    """cuDNN called directly (aten::cudnn_convolution), for shapes where F.conv2d picks
    PyTorch's native depthwise kernel. PyTorch exposes no direct cuDNN weight gradient (its
    autograd formula re-dispatches to convolution_backward, i.e. the native kernel again)."""
    stride, padding, dilation = _conv_args(case)
    groups = case.groups

    def flags():
        return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                torch.backends.cudnn.allow_tf32)

    def fwd(t):
        return torch.ops.aten.cudnn_convolution(t["x"], t["w"], padding, stride, dilation,
                                                groups, *flags())

    def bwd_input(t):  # grad_input = the transposed convolution of grad_out
        ho, wo = case.out_hw
        extra = [case.H - ((ho - 1) * case.stride - 2 * case.padding +
                           case.dilation * (case.k[0] - 1) + 1),
                 case.W - ((wo - 1) * case.stride - 2 * case.padding +
                           case.dilation * (case.k[1] - 1) + 1)]
        return torch.ops.aten.cudnn_convolution_transpose(
            t["go"], t["w"], padding, extra, stride, dilation, groups, *flags())

    none = NotTimed("PyTorch has no direct cuDNN weight-gradient op")
    return {"fwd": fwd, "bwd_input": bwd_input, "bwd_weight": none, "bwd": none,
            "fwd_bwd": none}


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

    def bwd_all(t):
        return backward_op(t["go"], t["x"], t["w"], stride, padding, dilation,
                           [True, True, False])[:2]

    return {"fwd": fwd, "bwd_input": bwd([True, False, False], 0),
            "bwd_weight": bwd([False, True, False], 1), "bwd": bwd_all,
            "fwd_bwd": _autograd_pass(fwd, ["x", "w"])}


def _deform_impl(case: Case, fn, backward) -> Dict[str, PassFn]:
    """backward(t) -> (grad_input, grad_weight, grad_offset, grad_mask) of one call."""
    stride, padding, dilation = _conv_args(case)

    def fwd(t):
        return fn(t["x"], t["offset"], t["w"], None, stride, padding, dilation, t["mask"])

    return {"fwd": fwd,
            "bwd_input": lambda t: [g for i, g in enumerate(backward(t)) if i != 1],
            "bwd_weight": lambda t: backward(t)[1],
            "bwd": lambda t: backward(t),
            "fwd_bwd": _autograd_pass(fwd, ["x", "w", "offset"] +
                                      (["mask"] if case.mask else []))}


def _convops_deform(case: Case):
    stride, padding, dilation = _conv_args(case)

    def call(t, mask):
        return torch.ops.convops.deform_conv2d_backward(
            t["go"], t["x"], t["w"], t["offset"], t["mask"], stride, padding, dilation, mask)
    impl = _deform_impl(case, convops.deform_conv2d,
                        lambda t: call(t, [True, True, True, case.mask, False])[:4])
    # the split passes compute only what they name: input side (input, offset, mask grads
    # share the column gradient) or the weight gradient
    impl["bwd_input"] = lambda t: [g for g in call(t, [True, False, True, case.mask, False])
                                   if g is not None and g.numel()][:3]
    impl["bwd_weight"] = lambda t: call(t, [False, True, False, False, False])[1]
    return impl


def _torchvision_deform(case: Case):
    import torchvision
    stride, padding, dilation = _conv_args(case)

    def backward(t):
        # torchvision has no per-gradient backward: its one op computes every gradient.
        use_mask = t["mask"] is not None
        mask = t["mask"] if use_mask else torch.zeros_like(t["offset"][:, ::2])
        bias = torch.zeros(t["w"].shape[0], dtype=t["w"].dtype, device=t["w"].device)
        gi, gw, goff, gm, _ = torch.ops.torchvision._deform_conv2d_backward(
            t["go"], t["x"], t["w"], t["offset"], mask, bias, stride[0], stride[1], padding[0],
            padding[1], dilation[0], dilation[1], case.groups, case.offset_groups, use_mask)
        return (gi, gw, goff, gm) if use_mask else (gi, gw, goff)
    impl = _deform_impl(case, torchvision.ops.deform_conv2d, backward)
    # Like with like: torchvision's split passes would compute every gradient while convops
    # computes only the named ones, so they are compared in "bwd" (all gradients) instead.
    why = "torchvision computes every gradient in one call: compared in the 'bwd' pass"
    impl["bwd_input"] = NotTimed(why, impl["bwd_input"])
    impl["bwd_weight"] = NotTimed(why, impl["bwd_weight"])
    return impl


def implementations(case: Case, device: str = "cpu") -> Dict[str, Dict[str, PassFn]]:
    """convops first, then the baselines; the first baseline is the gate's reference."""
    if case.suite in ("depthwise", "dilated"):
        name = "depthwise_conv2d" if case.suite == "depthwise" else "dilated_conv2d"
        impls = {"convops": _convops_conv(case, name), "torch": _aten_conv_impl(case)}
        if device == "cuda" and case.suite == "depthwise":
            # kept only when F.conv2d does not already run cuDNN (describe_backends)
            impls["cudnn-direct"] = _cudnn_direct(case)
        return impls
    if case.suite == "deform":
        # "conv2d" is a regular convolution of the same shape: the floor a DCN layer sits on.
        return {"convops": _convops_deform(case), "torchvision": _torchvision_deform(case),
                "conv2d": _aten_conv_impl(case)}
    raise ValueError(f"unknown suite {case.suite}")


# What aten's backend enum is called in tables.
BACKEND_LABELS = {"Cudnn": "cudnn", "CudaDepthwise2d": "pytorch-dw", "Mkldnn": "onednn",
                  "Slow2d": "aten-slow", "SlowDilated2d": "aten-slow-dilated"}


def select_backend(case: Case, x, w) -> str:
    """The backend F.conv2d picks for these tensors, by PyTorch's own selection rules
    (torch._C._select_conv_backend, what aten::convolution dispatches on)."""
    stride, padding, dilation = _conv_args(case)
    try:
        backend = torch._C._select_conv_backend(x, w, None, stride, padding, dilation, False,
                                                [0, 0], case.groups, None)
    except (AttributeError, RuntimeError) as exc:
        return f"unknown ({type(exc).__name__})"
    return backend.name


def kernel_probe(fn, t) -> List[str]:
    """Names of the CUDA kernels one call launches (a profiler run: names only, no timing)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(t)
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})


def classify_kernels(names) -> Optional[str]:
    """"Cudnn" or "CudaDepthwise2d" from kernel names, None when they say neither."""
    joined = " ".join(names).lower()
    if "conv_depthwise2d" in joined:
        return "CudaDepthwise2d"
    if any(k in joined for k in ("cudnn", "xmma", "implicit_convolve", "conv2d_grouped",
                                 "nchwtonhwc", "nhwctonchw")):
        return "Cudnn"
    return None


def describe_backends(case: Case, impls, t, device) -> Dict[str, dict]:
    """For aten's conv ("torch"): the backend by PyTorch's rules, on CUDA confirmed by the
    kernel names of one forward call. Drops "cudnn-direct" when F.conv2d already runs cuDNN."""
    out = {}
    if "torch" in impls:
        info = {"backend": select_backend(case, t["x"], t["w"])}
        if device == "cuda":
            try:
                info["kernels"] = kernel_probe(impls["torch"]["fwd"], t)[:8]
                seen = classify_kernels(info["kernels"])
                if seen and seen != info["backend"]:
                    info["backend"] = f"{seen} (kernels; rules said {info['backend']})"
            except Exception as exc:  # the probe is a label, never a reason to fail a row
                info["kernels"] = [f"probe failed: {type(exc).__name__}"]
        out["torch"] = info
        if "cudnn-direct" in impls and info["backend"].startswith("Cudnn"):
            del impls["cudnn-direct"]
    return out


def label(name: str, backend: Optional[dict] = None) -> str:
    """What an implementation is called in tables: aten's conv by the backend it ran."""
    if name == "torch":
        b = (backend or {}).get("backend", "")
        return BACKEND_LABELS.get(b.split(" ")[0], b.split(" ")[0].lower() or "torch")
    if name == "conv2d":
        return "conv2d-floor"
    return name
