"""Edge geometry on every backend: 1x1 images, kernels larger than the image, huge strides and
dilations, large padding, offsets far outside the image (and NaN/Inf). Every op, forward and
every gradient, every dtype, both layouts, on the CPU kernels and on the CUDA kernels (GPU or
emulator). CI also runs this file against the AddressSanitizer + UBSan build (SANITIZE=1),
where an out-of-bounds read of any of these shapes is an error."""
import pytest
import torch
import torch.nn.functional as F

import convops
from conftest import DTYPES, GPU_BACKENDS, GpuBackend, assert_close, stable_seed
from convops import emulator
from reference import deform_conv2d as deform_reference

# (name, input size (H, W), kernel, stride, padding, dilation)
CONV_EDGES = [
    ("1x1-image", (1, 1), (3, 3), (1, 1), (1, 1), (1, 1)),
    ("1x1-image-1x1-kernel", (1, 1), (1, 1), (1, 1), (0, 0), (1, 1)),
    ("kernel-larger-than-image", (4, 5), (7, 9), (1, 1), (3, 4), (1, 1)),
    ("huge-stride", (9, 11), (3, 3), (50, 70), (1, 1), (1, 1)),
    ("huge-dilation", (6, 7), (3, 3), (1, 1), (20, 25), (20, 25)),
    ("large-padding", (4, 3), (3, 2), (2, 1), (10, 12), (1, 1)),
    ("one-row", (1, 40), (1, 5), (1, 3), (0, 2), (1, 2)),
]

BACKENDS = ["cpu"] + [b for b in GPU_BACKENDS if b != "emu-random:20261123"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cpu":
        yield GpuBackend("cpu-native")
        return
    gpu = GpuBackend(request.param)
    if gpu.emulated:
        with emulator.emulated_cuda(gpu.order):
            yield gpu
    else:
        yield gpu


def _device(backend):
    return "cuda" if backend.name == "cuda" else "cpu"


def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _compare(out, ref, leaves, ref_leaves, names, dtype, seed):
    assert_close(out, ref, dtype, f"forward (seed {seed})")
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad.to(out.device))
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    for name, a, e in zip(names, grads, ref_grads):
        assert_close(a, e, dtype, f"grad_{name} (seed {seed})")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", ["depthwise", "depthwise-packs", "dilated"])
@pytest.mark.parametrize("edge", CONV_EDGES, ids=lambda e: e[0])
def test_conv_edges(edge, op, dtype, channels_last, backend):
    # depthwise: multiplier 2 (plain NHWC kernels); depthwise-packs: 16 channels, multiplier 1,
    # whole 16-byte packs in every dtype (the CUDA NHWC pack kernels).
    name, size, kernel, stride, padding, dilation = edge
    seed = stable_seed(edge, op, str(dtype), channels_last)
    g = torch.Generator().manual_seed(seed)
    channels, groups, out_channels = {"depthwise": (3, 3, 6), "depthwise-packs": (16, 16, 16),
                                      "dilated": (4, 2, 6)}[op]
    x = _rand(g, 2, channels, *size)
    w = _rand(g, out_channels, channels // groups, *kernel)
    b = _rand(g, out_channels)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    device = _device(backend)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, w, b)]
    ref_leaves = [t.to(dtype).double().requires_grad_() for t in (x, w, b)]
    if op.startswith("depthwise"):
        out = convops.depthwise_conv2d(*leaves, stride, padding, dilation)
    else:
        out = convops.dilated_conv2d(*leaves, stride, padding, dilation, groups)
    ref = F.conv2d(*ref_leaves, stride, padding, dilation, groups)
    _compare(out, ref, leaves, ref_leaves, ["input", "weight", "bias"], dtype, seed)


# (name, input size, kernel, stride, padding, dilation, offset scale, special offsets)
DEFORM_EDGES = [
    ("1x1-image", (1, 1), (3, 3), (1, 1), (1, 1), (1, 1), 1.0, None),
    ("kernel-larger-than-image", (3, 4), (5, 5), (1, 1), (2, 2), (1, 1), 2.0, None),
    ("huge-stride", (9, 8), (3, 3), (40, 60), (1, 1), (1, 1), 1.0, None),
    ("huge-dilation", (6, 5), (2, 3), (1, 1), (15, 18), (15, 18), 1.0, None),
    ("far-outside", (7, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1e4, None),
    ("just-outside", (7, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1.0, "border"),
    ("nan-inf-huge", (7, 6), (3, 3), (1, 1), (1, 1), (1, 1), 3.0, "nonfinite"),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("edge", DEFORM_EDGES, ids=lambda e: e[0])
def test_deform_edges(edge, dtype, channels_last, backend):
    name, size, (kh, kw), stride, padding, dilation, scale, special = edge
    seed = stable_seed(edge, str(dtype), channels_last)
    g = torch.Generator().manual_seed(seed)
    H, W = size
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = _rand(g, 2, 4, H, W)
    off = _rand(g, 2, 2 * 2 * kh * kw, Ho, Wo, scale=scale)
    if special == "border":
        # Sample points exactly on the boundary rule's edges (-1 and H, -1 and W), just inside
        # and just outside: offset = target - the tap's undeformed position.
        oh = torch.arange(Ho, dtype=torch.float64).view(1, 1, Ho, 1)
        ow = torch.arange(Wo, dtype=torch.float64).view(1, 1, 1, Wo)
        taps = torch.arange(kh * kw)
        ky = (taps // kw).repeat(2).view(1, -1, 1, 1).double()
        kx = (taps % kw).repeat(2).view(1, -1, 1, 1).double()
        base_y = oh * stride[0] - padding[0] + ky * dilation[0]
        base_x = ow * stride[1] - padding[1] + kx * dilation[1]
        edges_y = torch.tensor([-1.0, float(H), -0.999, H - 0.001, -1.001, H + 0.5, 1.5])
        edges_x = torch.tensor([-1.0, float(W), -0.999, W - 0.001, -1.001, W + 0.5, 2.5])
        shape = (2, 2 * kh * kw, Ho, Wo)
        target_y = edges_y[torch.randint(0, 7, shape, generator=g)].double()
        target_x = edges_x[torch.randint(0, 7, shape, generator=g)].double()
        off = torch.stack([target_y - base_y, target_x - base_x], dim=2).reshape(off.shape)
    mask = torch.rand(2, 2 * kh * kw, Ho, Wo, generator=g, dtype=torch.float64)
    w = _rand(g, 6, 2, kh, kw)
    b = _rand(g, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    device = _device(backend)
    tensors = [x, off, w, mask, b]
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    ref_leaves = [t.to(dtype).double().requires_grad_() for t in tensors]
    if special == "nonfinite":
        # NaN/Inf/huge offsets read nothing: compare with the reference, whose gradient for
        # those entries is zero too. (Gradients flow only to finite entries.)
        with torch.no_grad():
            for t in (leaves[1], ref_leaves[1]):
                t[0, 0, 0, 0] = float("nan")
                t[0, 1, 0, 1] = float("inf")
                t[1, 2, 1, 0] = -float("inf")
                t[1, 3, 0, 0] = 1e30 if dtype != torch.float16 else 6e4
    out = convops.deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[4], stride, padding,
                                dilation, mask=leaves[3])
    ref = deform_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[4], stride,
                           padding, dilation, mask=ref_leaves[3])
    _compare(out, ref, leaves, ref_leaves, ["input", "offset", "weight", "mask", "bias"], dtype,
             seed)
