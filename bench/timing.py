"""Timers: CUDA events on GPU, perf_counter on CPU; medians and spread; copy bandwidth."""
import statistics
import time
from contextlib import contextmanager

import torch


@contextmanager
def nvtx_range(name: str, enabled: bool):
    if enabled:
        torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        if enabled:
            torch.cuda.nvtx.range_pop()


def time_fn(fn, device: str, warmup: int, repeats: int, min_seconds: float, name: str = ""):
    """Per-call seconds: (median, spread as (p75 - p25) / median, samples)."""
    cuda = device == "cuda"
    for _ in range(warmup):
        fn(0)
    if cuda:
        torch.cuda.synchronize()
    samples = []
    start_all = time.perf_counter()
    i = 0
    while i < repeats or (time.perf_counter() - start_all < min_seconds and i < 50 * repeats):
        with nvtx_range(f"{name}#{i}", cuda):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn(i)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(i)
                samples.append(time.perf_counter() - t0)
        i += 1
    samples.sort()
    median = statistics.median(samples)
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]  # noqa: E731
    return median, (q(0.75) - q(0.25)) / median if median > 0 else 0.0, len(samples)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large clone (read + write counted), the practical memory ceiling."""
    n = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    x = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    median, _, _ = time_fn(lambda i: x.clone(), device, warmup=2, repeats=5, min_seconds=0.2)
    return 2 * x.numel() * x.element_size() / median


def matmul_flops(device: str, dtype) -> float:
    """FLOP/s of a large matmul, the practical compute ceiling for the roofline chart."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    median, _, _ = time_fn(lambda i: a @ b, device, warmup=1, repeats=3, min_seconds=0.2)
    return 2 * n ** 3 / median
