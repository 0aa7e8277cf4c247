"""The CUDA emulator itself: it runs kernels right, and it catches the mistakes a GPU punishes
(missing barrier, shuffle after some lanes returned, unwritten shared memory, out-of-bounds
global read, illegal launches). Its test kernels live in csrc/emu/selftest.cpp."""
import itertools
import os
import pathlib
import re
import subprocess
import sys
import threading

import pytest
import torch

import convops
from conftest import assert_close
from convops import emulator

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORDERS = ["forward", "reverse", "random:3"]


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("CONVOPS_EMU_ORDER", request.param)
    return request.param


def _values(n=200):
    return torch.randn(n, generator=torch.Generator().manual_seed(n))


# --- kernels that are right ---------------------------------------------------------------------

def test_barrier_makes_shared_writes_visible(order):
    x = _values()
    out = emulator.selftest("neighbour_sum", x)
    expected = x + torch.cat([x[1:], x.new_zeros(1)])
    assert torch.equal(out, expected)


def test_warp_shuffles_reduce_and_blocks_are_independent(order):
    x = torch.arange(200, dtype=torch.float32)
    out = emulator.selftest("block_sum", x)
    sums = [x[i:i + 64].sum().item() for i in range(0, 200, 64)]
    assert out[:4].tolist() == sums


def test_broadcast_and_votes(order):
    x = _values(96)
    out = emulator.selftest("broadcast_and_ballot", x)
    for i in range(96):
        warp = x[i // 32 * 32:(i // 32 + 1) * 32]
        positive = int((warp > 0).sum())
        expected = warp[0].item() + positive + 100 * (positive == 32) + 1000 * (positive > 0)
        assert out[i].item() == pytest.approx(expected, abs=1e-4)


def test_atomics_are_exact(order):
    x = torch.ones(1000)
    out = emulator.selftest("atomic_count", x)
    assert out[0].item() == 1000 and out[1].item() == 1000


def test_dynamic_shared_memory(order):
    x = torch.arange(128, dtype=torch.float32)
    out = emulator.selftest("reverse_block", x)
    assert torch.equal(out, torch.cat([x[:64].flip(0), x[64:].flip(0)]))


def test_opted_in_dynamic_shared_memory():
    x = torch.arange(128, dtype=torch.float32)
    out = emulator.selftest("opted_in_dynamic_shared", x)
    assert torch.equal(out, torch.cat([x[:64].flip(0), x[64:].flip(0)]))


# --- mistakes it must catch ---------------------------------------------------------------------

@pytest.mark.parametrize("order_name", ["forward", "reverse"])
def test_missing_syncthreads_poisons_the_result(order_name, monkeypatch):
    # Without the barrier the threads that run first read slots their neighbours have not
    # written yet: 0xFF bytes, a NaN in every block.
    monkeypatch.setenv("CONVOPS_EMU_ORDER", order_name)
    out = emulator.selftest("missing_syncthreads", _values())
    assert out.isnan().any()


def test_unwritten_shared_memory_reads_nan():
    out = emulator.selftest("unwritten_shared", _values())
    # The last thread of each full block reads tile[64], which nobody wrote.
    assert out[63].isnan() and out[127].isnan() and out[191].isnan()
    assert not out[:63].isnan().any()


def test_shuffle_after_lanes_returned_is_an_error():
    with pytest.raises(RuntimeError, match=r"shuffle_after_return.*__shfl_down_sync.*exited"):
        emulator.selftest("shuffle_after_return", _values(200))


def test_barrier_after_threads_returned_is_an_error():
    with pytest.raises(RuntimeError, match=r"barrier_after_return.*exited while.*__syncthreads"):
        emulator.selftest("barrier_after_return", _values(200))


def test_divergent_barriers_are_an_error():
    with pytest.raises(RuntimeError, match=r"divergent_barriers.*divergent"):
        emulator.selftest("divergent_barriers", _values(64))


@pytest.mark.parametrize("kernel,message", [
    ("too_many_threads", r"block_sum.*2048 threads; the limit is 1024"),
    ("over_launch_bounds", r"block_sum.*128 threads per block exceed its __launch_bounds__ of 64"),
    ("grid_y_too_large", r"block_sum: grid \(1, 70000, 1\) exceeds"),
    ("grid_x_too_large", r"block_sum: grid \(2147483648, 1, 1\) exceeds"),
    ("too_much_dynamic_shared", r"reverse_block: 65536 bytes of dynamic shared memory exceed"),
])
def test_illegal_launches_are_rejected(kernel, message):
    with pytest.raises(RuntimeError, match=message):
        emulator.selftest(kernel, _values(64))


def test_static_plus_dynamic_shared_memory_over_the_limit_is_an_error():
    # 44 KiB dynamic passes the launch check; with 8 KiB static the block needs 52 KiB.
    with pytest.raises(RuntimeError, match=r"static_and_dynamic: static shared memory.*49152"):
        emulator.selftest("static_plus_dynamic_over_48k", _values(64))


def test_out_of_bounds_global_read_is_caught_by_asan():
    # Only AddressSanitizer sees a read one element past a tensor; the sanitized CI job builds
    # the emulator with it (SANITIZE=1). The read runs in a child so the report can be checked.
    if not emulator.sanitized():
        pytest.skip("needs the AddressSanitizer build of the emulator (SANITIZE=1, run by CI)")
    code = ("import torch, convops.emulator as e; "
            "e.selftest('out_of_bounds_read', torch.randn(64))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, ASAN_OPTIONS=os.environ.get(
                                "ASAN_OPTIONS", "") + ":halt_on_error=1"))
    assert result.returncode != 0
    assert "heap-buffer-overflow" in result.stderr, result.stderr[-2000:]
    assert "out_of_bounds_read" in result.stderr


def test_bad_order_is_an_error(monkeypatch):
    monkeypatch.setenv("CONVOPS_EMU_ORDER", "sideways")
    with pytest.raises(RuntimeError, match="CONVOPS_EMU_ORDER"):
        emulator.selftest("block_sum", _values(64))


def test_error_leaves_the_emulator_usable():
    # A launch aborted mid-block abandons its fibers; the next launch must start clean.
    for _ in range(3):
        with pytest.raises(RuntimeError):
            emulator.selftest("barrier_after_return", _values(200))
        assert not emulator.selftest("neighbour_sum", _values()).isnan().any()


def test_host_threads_emulate_independently():
    # Each host thread has its own scheduler: two threads running emulated convops ops at
    # once must both get exact results, every iteration.
    x = torch.randn(2, 8, 20, 20)
    w = torch.randn(8, 1, 3, 3)
    expected = torch.nn.functional.conv2d(x, w, None, 1, 1, 1, 8)
    errors = []

    def work():
        try:
            with emulator.emulated_cuda("random:5"):
                for _ in range(10):
                    out = convops.depthwise_conv2d(x, w, None, 1, 1)
                    assert_close(out, expected.double(), torch.float32, "threaded emulator")
        except Exception as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --- every CUDA kernel and launcher branch runs in the emulator ----------------------------------

def _kernels_defined():
    names = set()
    for path in (ROOT / "csrc" / "cuda").glob("*.cu*"):
        names |= set(re.findall(r'launch_kernel\(\s*"(\w+)"', path.read_text()))
    return names


def _run_every_path(monkeypatch):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 12, 11, generator=g, requires_grad=True)
    xcl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    dw = torch.randn(8, 1, 3, 3, generator=g, requires_grad=True)
    dw1 = torch.randn(4, 1, 3, 3, generator=g, requires_grad=True)
    dil = torch.randn(6, 2, 3, 3, generator=g, requires_grad=True)
    dcn = torch.randn(6, 4, 3, 3, generator=g, requires_grad=True)
    off = torch.randn(2, 18, 12, 11, generator=g, requires_grad=True)
    mask = torch.rand(2, 9, 12, 11, generator=g, requires_grad=True)
    for impl in ["tuned", "plain"]:
        for index in ["auto", "int64"]:
            monkeypatch.setenv("CONVOPS_CUDA_IMPL", impl)
            monkeypatch.setenv("CONVOPS_CUDA_INDEX", index)
            for inp in (x, xcl):
                convops.depthwise_conv2d(inp, dw, None, 1, 1).sum().backward()
                convops.depthwise_conv2d(inp, dw1, None, 1, 1).sum().backward()  # multiplier 1
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        for impl, deterministic in itertools.product(["tuned", "plain"], [False, True]):
            monkeypatch.setenv("CONVOPS_CUDA_IMPL", impl)
            torch.use_deterministic_algorithms(deterministic)
            convops.dilated_conv2d(x, dil, None, 1, 2, 2, 2).sum().backward()
            convops.deform_conv2d(x, off, dcn, None, padding=1, mask=mask).sum().backward()
            convops.deform_conv2d(x, off, dw1, None, padding=1, mask=mask).sum().backward()
    finally:
        torch.use_deterministic_algorithms(prev)


def test_every_cuda_kernel_runs_in_the_emulator(monkeypatch):
    defined = _kernels_defined()
    assert len(defined) >= 9, defined
    before = emulator.launch_counts()
    with emulator.emulated_cuda():
        _run_every_path(monkeypatch)
    after = emulator.launch_counts()
    ran = {k for k, v in after.items() if v > before.get(k, 0)}
    assert defined <= ran, f"never launched: {sorted(defined - ran)}"


# --- tensor-core fragments ------------------------------------------------------------------------

def _mma_operands(dtype):
    g = torch.Generator().manual_seed(512)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    return a, b, torch.cat([a.flatten(), b.flatten()])


@pytest.mark.parametrize("kernel,dtype", [("mma_half", torch.float16),
                                          ("mma_bfloat16", torch.bfloat16),
                                          ("mma_tf32", None)])
def test_mma_multiplies_in_the_operand_precision(kernel, dtype, order):
    a, b, x = _mma_operands(dtype)
    if dtype is None:  # TF32: 10 mantissa bits, to nearest, ties away from zero
        bits = a.view(torch.int32), b.view(torch.int32)
        a, b = [((v + 0x1000) & ~0x1FFF).view(torch.float32) for v in bits]
    else:
        a, b = a.to(dtype).float(), b.to(dtype).float()
    expected = (a.double() @ b.double()).float()
    out = emulator.selftest(kernel, x)[:256].view(16, 16)
    # products are exact, sums in fp32: a few fp32 ulps of the largest partial sum
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * (a.abs() @ b.abs()).max().item())
    if dtype is not None:  # and the operands were rounded: fp32 inputs would differ
        assert (out - (_mma_operands(dtype)[0] @ _mma_operands(dtype)[1])).abs().max() > 1e-4


def test_mma_needs_the_whole_warp():
    with pytest.raises(RuntimeError, match=r"mma_product.*tensor-core fragment operation.*names lane 16"):
        emulator.selftest("mma_half_warp", _values(512))


def test_mma_pointer_must_be_32_byte_aligned():
    with pytest.raises(RuntimeError, match=r"mma_product.*not 32-byte aligned"):
        emulator.selftest("mma_misaligned", _values(512))


def test_mma_fragment_layout_is_not_row_major_by_lane():
    # A kernel that reads its result out of the fragments as if lane l held entries 8l..8l+7
    # gets a permutation of the right values, not the right matrix.
    a, b, x = _mma_operands(torch.float16)
    expected = (a.half().float() @ b.half().float()).flatten()
    out = emulator.selftest("mma_lane_mapping", x)[:256]
    assert not torch.allclose(out, expected, atol=1e-3)
    torch.testing.assert_close(out.sort().values, expected.sort().values, rtol=0, atol=1e-3)
