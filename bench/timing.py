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


def _timed_call(fn, i: int, cuda: bool, name: str) -> float:
    with nvtx_range(f"{name}#{i}", cuda):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn(i)
        return time.perf_counter() - t0


def _summary(samples):
    samples = sorted(samples)
    median = statistics.median(samples)
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]  # noqa: E731
    return median, (q(0.75) - q(0.25)) / median if median > 0 else 0.0, len(samples)


def time_interleaved(fns, device: str, warmup: int, repeats: int, min_seconds: float,
                     name: str = ""):
    """Per-call seconds of several functions, {key: (median, spread as (p75 - p25) / median,
    samples)}. Calls alternate between the functions, one sample each per round, so a machine
    that slows down or speeds up (shared hosts, clocks) moves every function alike and the
    ratios stay fair."""
    cuda = device == "cuda"
    for fn in fns.values():
        for _ in range(warmup):
            fn(0)
    if cuda:
        torch.cuda.synchronize()
    samples = {key: [] for key in fns}
    start_all = time.perf_counter()
    budget = min_seconds * len(fns)
    i = 0
    while i < repeats or (time.perf_counter() - start_all < budget and i < 50 * repeats):
        for key, fn in fns.items():
            samples[key].append(_timed_call(fn, i, cuda, f"{name}/{key}"))
        i += 1
    return {key: _summary(values) for key, values in samples.items()}


def time_fn(fn, device: str, warmup: int, repeats: int, min_seconds: float, name: str = ""):
    """Per-call seconds of one function: (median, spread as (p75 - p25) / median, samples)."""
    return time_interleaved({name: fn}, device, warmup, repeats, min_seconds, name)[name]


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
