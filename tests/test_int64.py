"""Tensors with more than 2**31 elements: indexing must switch to 64 bits."""
import pytest
import torch
import torch.nn.functional as F

import convops
from conftest import assert_close, requires_cuda

BIG = (1, 131073, 128, 128)  # 2**31 + 16384 elements


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _check_big(device):
    numel = BIG[0] * BIG[1] * BIG[2] * BIG[3]
    assert numel > 2**31
    x = torch.empty(BIG, dtype=torch.bfloat16, device=device)
    x[:, :-4].fill_(0.5)
    tail = torch.randn(1, 4, 128, 128, device=device).bfloat16()
    x[:, -4:] = tail  # the channels whose elements sit past index 2**31
    w = torch.randn(BIG[1], 1, 3, 3, device=device).bfloat16()
    out = convops.depthwise_conv2d(x, w, None, 1, 1)
    ref = F.conv2d(tail.double(), w[-4:].double(), None, 1, 1, 1, groups=4)
    assert_close(out[:, -4:], ref, torch.bfloat16, "channels past 2**31")
    ref_head = F.conv2d(x[:, :2].double(), w[:2].double(), None, 1, 1, 1, groups=2)
    assert_close(out[:, :2], ref_head, torch.bfloat16, "first channels")


def test_bf16_depthwise_past_2_pow_31_elements_cpu():
    need = 3 * 2 * (BIG[1] * 128 * 128)  # input + output in bf16, with room to spare
    if _available_bytes() < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free memory, this machine has "
                    f"{_available_bytes() / 2**30:.1f} GiB available")
    _check_big("cpu")


@requires_cuda
def test_bf16_depthwise_past_2_pow_31_elements_cuda():
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * 2 * (BIG[1] * 128 * 128):
        pytest.skip("not enough free GPU memory")
    _check_big("cuda")
