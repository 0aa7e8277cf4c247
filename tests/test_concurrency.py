"""Thread safety on CPU: two threads calling every op at once get the single-threaded answers."""
import threading

import torch

import convops
from conftest import assert_close


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
    results, errors = {}, []

    def run(seed):
        try:
            for _ in range(3):
                results[seed] = _work(seed)
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
        for got, want in zip(results[seed], expected[seed]):
            assert_close(got, want.double(), torch.float32, f"thread {seed}")
