"""Thread safety on CPU (two threads calling every op at once get the single-threaded answers),
the current CUDA stream and a non-default CUDA device."""
import threading

import pytest
import torch

import convops
from conftest import assert_close, requires_cuda


def _work(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 20, 20, generator=g, requires_grad=True)
    dw = convops.depthwise_conv2d(x, torch.randn(8, 1, 5, 5, generator=g), None, 1, 2)
    dil = convops.dilated_conv2d(dw, torch.randn(8, 4, 3, 3, generator=g), None, 1, 2, 2, 2)
    off = torch.randn(2, 18, 20, 20, generator=g)
    out = convops.deform_conv2d(dil, off, torch.randn(4, 8, 3, 3, generator=g), padding=1,
                                mask=torch.rand(2, 9, 20, 20, generator=g))
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), grad


def test_two_threads_at_once_match_serial_results():
    expected = {seed: _work(seed) for seed in (1, 2)}
    results, errors = {1: [], 2: []}, []

    def run(seed):
        try:
            for _ in range(3):
                results[seed].append(_work(seed))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # Not bit-equality: BLAS may pick another blocking when two callers share the cores.
    for seed in (1, 2):
        assert len(results[seed]) == 3
        for i, result in enumerate(results[seed]):  # every iteration, not only the last
            for got, want in zip(result, expected[seed]):
                assert_close(got, want.double(), torch.float32, f"thread {seed} iteration {i}")


def _all_ops(x):
    dev = x.device
    dw = convops.depthwise_conv2d(x, torch.ones(8, 1, 3, 3, device=dev), None, 1, 1)
    dil = convops.dilated_conv2d(dw, torch.ones(8, 8, 3, 3, device=dev) * 0.1, None, 1, 2, 2)
    off = torch.ones(x.shape[0], 18, x.shape[2], x.shape[3], device=dev) * 0.5
    return convops.deform_conv2d(dil, off, torch.ones(4, 8, 3, 3, device=dev) * 0.1, padding=1)


@requires_cuda
def test_ops_run_on_the_current_stream():
    x = torch.randn(2, 8, 16, 16, device="cuda")
    expected = _all_ops(x)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The producer stream is held up (~100 ms of spinning) before it writes the input, so
        # a convops kernel launched on any other stream would run first and read the zeros
        # (stale data); on the current stream it waits for the copy.
        y = torch.zeros_like(x)
        torch.cuda._sleep(200_000_000)
        y.copy_(x)
        out = _all_ops(y)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_ops_run_on_a_non_default_device():
    x = torch.randn(2, 8, 16, 16)
    expected = _all_ops(x)
    out = _all_ops(x.to("cuda:1"))
    assert out.device == torch.device("cuda:1")
    assert_close(out, expected.double(), torch.float32, "cuda:1")
