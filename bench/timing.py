"""Timers. CPU: perf_counter per call. CUDA: many back-to-back calls between one event pair,
behind a sleep kernel that keeps the host ahead of the GPU, after an L2 flush; the host's
enqueue time is reported separately. Also the bandwidth/matmul probes and per-dtype ceilings."""
import math
import statistics
import time
from contextlib import contextmanager

import torch

# Roofline ceilings on an H100 SXM (GUIDE §3): copy and bf16/fp16 MMA measured on H100s in this
# workplace, TF32 / FP32 FFMA / FP64 (tensor core) from the data sheet.
H100_COPY_BPS = 3.0e12
H100_PEAK_FLOPS = {"float16": 790e12, "bfloat16": 790e12, "tf32": 495e12, "float32": 67e12,
                   "float64": 67e12}
TARGET_BATCH_S = 2e-3      # device time one timed batch should last
MAX_BATCH = 200


@contextmanager
def nvtx_range(name: str, enabled: bool):
    if enabled:
        torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        if enabled:
            torch.cuda.nvtx.range_pop()


def profiler_active() -> bool:
    return torch.autograd.profiler._is_profiler_enabled


class CudaClock:
    """The CUDA side of the batch timer; a fake replaces it in the tests."""

    def __init__(self):
        l2 = getattr(torch.cuda.get_device_properties(), "L2_cache_size", 50 << 20)
        # twice L2, written between batches: nobody's inputs survive in L2
        self.flush_buffer = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device="cuda")
        self._cycles_per_s = None

    @property
    def flush_bytes(self):
        return self.flush_buffer.numel()

    def flush(self):
        self.flush_buffer.fill_(1)

    def sleep(self, seconds):
        if self._cycles_per_s is None:  # calibrate _sleep's cycles against events once
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            torch.cuda._sleep(10 ** 7)
            e.record()
            e.synchronize()
            self._cycles_per_s = 10 ** 7 / max(s.elapsed_time(e) / 1e3, 1e-6)
        torch.cuda._sleep(int(seconds * self._cycles_per_s))

    def record(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(self, start, end):
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def synchronize(self):
        torch.cuda.synchronize()


def _summary(samples):
    samples = sorted(samples)
    median = statistics.median(samples)
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]  # noqa: E731
    return median, (q(0.75) - q(0.25)) / median if median > 0 else 0.0, len(samples)


def _batch(clock, fn, first, count, sleep_s, name):
    """One timed batch: flush L2, sleep (so the host enqueues the whole batch before the GPU
    reaches the start event), then `count` calls between one event pair. Returns (device s,
    host enqueue s), both per call."""
    clock.flush()
    if sleep_s:
        clock.sleep(sleep_s)
    with nvtx_range(name, True):
        t0 = time.perf_counter()
        start = clock.record()
        for i in range(first, first + count):
            fn(i)
        end = clock.record()
        host = time.perf_counter() - t0
    return clock.elapsed(start, end) / count, host / count


def time_interleaved(fns, device: str, warmup: int, repeats: int, min_seconds: float,
                     name: str = "", clock=None):
    """Per-call seconds of several functions, {key: (median, spread as (p75 - p25) / median,
    samples, host seconds per call or None)}. Rounds alternate between the functions, one
    sample (CPU: a call, CUDA: a batch) each per round, so a machine that slows down moves
    every function alike. fn(i) must use input set i (rotating), so back-to-back calls of a
    batch read different tensors."""
    if profiler_active():
        raise RuntimeError("timing under a profiler: profiler runs are never timings")
    if device == "cuda" or clock is not None:
        return _time_cuda(fns, warmup, repeats, min_seconds, name, clock or CudaClock())
    for fn in fns.values():
        for _ in range(warmup):
            fn(0)
    samples = {key: [] for key in fns}
    start_all = time.perf_counter()
    budget = min_seconds * len(fns)
    i = 0
    while i < repeats or (time.perf_counter() - start_all < budget and i < 50 * repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            samples[key].append(time.perf_counter() - t0)
        i += 1
    return {key: _summary(values) + (None,) for key, values in samples.items()}


def _time_cuda(fns, warmup, repeats, min_seconds, name, clock):
    plan = {}
    for key, fn in fns.items():
        for i in range(max(warmup, 1)):
            fn(i)
        clock.synchronize()
        # size the batch from one flushed call, the sleep from the host time of a batch
        per_call, host = _batch(clock, fn, 0, 1, 0.0, f"{name}/{key}/probe")
        count = max(1, min(MAX_BATCH, math.ceil(TARGET_BATCH_S / max(per_call, 1e-7))))
        plan[key] = (count, min(0.1, 1.5 * host * count + 1e-4))
    samples = {key: [] for key in fns}
    hosts = {key: [] for key in fns}
    start_all = time.perf_counter()
    budget = min_seconds * len(fns)
    r = 0
    while r < repeats or (time.perf_counter() - start_all < budget and r < 10 * repeats):
        for key, fn in fns.items():
            count, sleep_s = plan[key]
            dev, host = _batch(clock, fn, r * count, count, sleep_s, f"{name}/{key}")
            samples[key].append(dev)
            hosts[key].append(host)
        r += 1
    return {key: _summary(samples[key]) + (statistics.median(hosts[key]),) for key in fns}


def time_fn(fn, device: str, warmup: int, repeats: int, min_seconds: float, name: str = ""):
    """Per-call seconds of one function: (median, spread, samples, host s per call or None)."""
    return time_interleaved({name: fn}, device, warmup, repeats, min_seconds, name)[name]


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large clone (read + write counted), the practical memory ceiling."""
    n = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    x = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    median = time_fn(lambda i: x.clone(), device, warmup=2, repeats=5, min_seconds=0.2)[0]
    return 2 * x.numel() * x.element_size() / median


def matmul_flops(device: str, dtype) -> float:
    """FLOP/s of a large matmul in `dtype` (under the current TF32 flags)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    median = time_fn(lambda i: a @ b, device, warmup=1, repeats=3, min_seconds=0.2)[0]
    return 2 * n ** 3 / median


def ceiling_key(dtype, tf32: bool) -> str:
    name = str(dtype).replace("torch.", "")
    return "tf32" if name == "float32" and tf32 else name


def ceilings(device: str, device_name: str, dtypes, tf32: bool, probe: bool) -> dict:
    """Roofline ceilings per dtype: {"copy_Bps": ..., "flops": {dtype: (FLOP/s, source)}}.
    An H100 takes the table above (fp32 rows: TF32 or FFMA per the policy); any other device
    measures a matmul per dtype, unless probe is False (--once), which leaves them unknown."""
    h100 = device == "cuda" and "H100" in device_name
    out = {"copy_Bps": None, "copy_source": None, "flops": {}}
    if probe:
        out["copy_Bps"], out["copy_source"] = copy_bandwidth(device), "measured clone"
    elif h100:
        out["copy_Bps"], out["copy_source"] = H100_COPY_BPS, "H100 table"
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        if h100:
            key = ceiling_key(dtype, tf32)
            out["flops"][name] = (H100_PEAK_FLOPS[key], f"H100 table ({key})")
        elif probe:
            out["flops"][name] = (matmul_flops(device, dtype), "measured matmul")
    return out
