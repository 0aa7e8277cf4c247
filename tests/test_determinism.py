"""Under torch.use_deterministic_algorithms(True) every op's backward is bit-identical across
runs, on CPU and (when present) CUDA."""
import pytest
import torch

import convops
from conftest import requires_cuda


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 23, 21, generator=g).to(device).requires_grad_()
    off = (torch.randn(4, 2 * 2 * 9, 23, 21, generator=g) * 3).to(device).requires_grad_()
    mask = torch.rand(4, 2 * 9, 23, 21, generator=g).to(device).requires_grad_()
    return x, off, mask


OPS = {
    "depthwise": lambda x, off, mask: convops.depthwise_conv2d(
        x, torch.ones(32, 1, 5, 5, device=x.device) * 0.1, None, 1, 2),
    "dilated": lambda x, off, mask: convops.dilated_conv2d(
        x, torch.ones(8, 8, 3, 3, device=x.device) * 0.1, None, 1, 3, 3, 2),
    "deform": lambda x, off, mask: convops.deform_conv2d(
        x, off, torch.ones(8, 16, 3, 3, device=x.device) * 0.1, padding=1, mask=mask),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("op", list(OPS))
def test_backward_bit_identical_under_deterministic_mode(op, device):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            x, off, mask = _inputs(device)
            out = OPS[op](x, off, mask)
            leaves = [x, off, mask] if op == "deform" else [x]
            runs.append(torch.autograd.grad(out.square().sum(), leaves))
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(prev)
