"""Under torch.use_deterministic_algorithms(True) (not warn_only) every op's backward is
bit-identical across runs, on CPU, on CUDA when present, and in the CUDA emulator across
orders of blocks and threads."""
import pytest
import torch

import convops
from conftest import GpuBackend, requires_cuda
from convops import emulator


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 23, 21, generator=g).to(device).requires_grad_()
    off = (torch.randn(2, 2 * 2 * 9, 23, 21, generator=g) * 3).to(device).requires_grad_()
    mask = torch.rand(2, 2 * 9, 23, 21, generator=g).to(device).requires_grad_()
    return x, off, mask


def _weights(device):
    g = torch.Generator().manual_seed(1)
    return {"depthwise": torch.randn(32, 1, 5, 5, generator=g).to(device).requires_grad_(),
            "dilated": torch.randn(8, 8, 3, 3, generator=g).to(device).requires_grad_(),
            "deform": torch.randn(8, 16, 3, 3, generator=g).to(device).requires_grad_(),
            # groups == C, multiplier 2: the direct depthwise kernels on CUDA
            "deform_depthwise": torch.randn(32, 1, 3, 3, generator=g).to(device).requires_grad_()}


OPS = {
    "depthwise": lambda x, off, mask, w, b: convops.depthwise_conv2d(x, w, b[:32], 1, 2),
    "dilated": lambda x, off, mask, w, b: convops.dilated_conv2d(x, w, b[:8], 1, 3, 3, 2),
    "deform": lambda x, off, mask, w, b: convops.deform_conv2d(x, off, w, b[:8], padding=1,
                                                               mask=mask),
    "deform_depthwise": lambda x, off, mask, w, b: convops.deform_conv2d(x, off, w, b, padding=1,
                                                                         mask=mask),
}


def _run(op, device):
    """Output and every gradient (input, offset, mask, weight, bias) of one call."""
    x, off, mask = _inputs(device)
    w = _weights(device)[op]
    b = torch.randn(32, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_()
    out = OPS[op](x, off, mask, w, b)
    leaves = [x, off, mask, w, b] if op.startswith("deform") else [x, w, b]
    grads = torch.autograd.grad(out.square().sum(), leaves)
    return (out.detach(),) + grads


@pytest.fixture
def deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


def _assert_identical(runs):
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=requires_cuda),
                                     "emu-random:11"])
@pytest.mark.parametrize("op", list(OPS))
def test_backward_bit_identical_under_deterministic_mode(op, backend, deterministic):
    if backend.startswith("emu"):
        gpu = GpuBackend(backend)
        with emulator.emulated_cuda(gpu.order):
            _assert_identical([_run(op, gpu.device) for _ in range(3)])
    else:
        _assert_identical([_run(op, backend) for _ in range(3)])


@pytest.mark.parametrize("op", list(OPS))
def test_emulated_cuda_bit_identical_across_orders(op, deterministic):
    # The deterministic CUDA paths (ordered scatter, convops's GEMM, tree reductions) may not
    # depend on the order in which blocks and threads run.
    runs = []
    for order in ["forward", "reverse", "random:1", "random:2"]:
        with emulator.emulated_cuda(order):
            runs.append(_run(op, GpuBackend("emu-" + order).device))
    _assert_identical(runs)


@requires_cuda
@pytest.mark.parametrize("op", ["dilated", "deform"])
def test_deterministic_mode_needs_no_cublas_workspace_config(op, deterministic, monkeypatch):
    # cuBLAS raises under use_deterministic_algorithms(True) unless CUBLAS_WORKSPACE_CONFIG is
    # set; F.conv2d asks no such thing of its users, and neither may convops.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    _assert_identical([_run(op, "cuda") for _ in range(2)])
