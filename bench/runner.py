"""Runs cases: correctness gate first, then timing of every implementation and pass."""
import math
from dataclasses import asdict
from typing import Dict, List, Optional

import torch

from . import impls as impls_mod
from .cases import Case
from .metrics import pass_bytes, pass_flops
from .timing import nvtx_range, time_interleaved

# Loose, norm-wise tolerances for the gate (relative to max |reference|): the gate catches
# broken kernels, the test suite checks precision.
GATE_RTOL = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 3e-2,
             torch.bfloat16: 5e-2}


def _flatten(result) -> List[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def outputs_match(ours, ref, dtype) -> Optional[str]:
    """None when ours matches ref within the gate tolerance, else a short reason."""
    a_list, b_list = _flatten(ours), _flatten(ref)
    if len(a_list) != len(b_list):
        return f"{len(a_list)} outputs vs {len(b_list)}"
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        if a.shape != b.shape:
            return f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        a64, b64 = a.detach().double(), b.detach().double()
        if not torch.isfinite(a64).all():
            return f"output {i}: non-finite values"
        scale = b64.abs().max().item() if b64.numel() else 0.0
        err = (a64 - b64).abs().max().item() if a64.numel() else 0.0
        if err > GATE_RTOL[dtype] * max(scale, 1e-30):
            return f"output {i}: max error {err:.3g} vs scale {scale:.3g}"
    return None


def _rotations(case_tensors, device: str):
    """Copies of the inputs to rotate through so a case that fits in L2 is not timed hot."""
    if device != "cuda":
        return 1
    size = sum(t.numel() * t.element_size() for t in case_tensors.values() if t is not None)
    l2 = getattr(torch.cuda.get_device_properties(), "L2_cache_size", 50 << 20)
    return max(1, min(8, math.ceil(2 * l2 / max(size, 1))))


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def fix_malloc_threshold() -> None:
    """Make glibc serve every large allocation with mmap (and return it on free), so the CPU
    peak-RSS measurement sees each call's buffers instead of memory recycled from the heap.

    Only for the memory pass, after all timing: it makes every large allocation page-fault,
    which slows whoever allocates per call (oneDNN, torchvision) and would skew the timings."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):
        pass


def _trim_heap() -> None:
    """Give free heap pages back to the OS (glibc malloc_trim), so that a call reusing them
    faults them in again and its peak resident set counts them."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_extra_bytes(fn, device: str) -> Optional[int]:
    """Peak memory a call adds on top of what was live before it (outputs included).

    CUDA: the caching allocator's peak. CPU: the process's peak resident set, reset through
    /proc/self/clear_refs (Linux), so buffers from malloc/new count too; None elsewhere."""
    if device != "cuda":
        _trim_heap()
        before = _rss_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            return None
        fn(0)
        peak = _rss_kib("VmHWM")
        return None if before is None or peak is None else max(0, peak - before) * 1024
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_deferred_memory(deferred) -> None:
    """The CPU memory pass: peak extra memory of every (row, call) run_case deferred."""
    fix_malloc_threshold()
    for row, fn in deferred:
        row["peak_extra_bytes"] = _peak_extra_bytes(fn, row["device"])


def run_case(case: Case, dtype, device: str, channels_last: bool, passes, settings,
             implementations: Optional[Dict] = None, once: bool = False,
             deferred_memory: Optional[list] = None) -> List[dict]:
    """Check and time every pass. Peak memory is measured right after a row's timing, or, when
    deferred_memory is a list, (row, call) is appended to it for measure_deferred_memory."""
    impls = implementations or impls_mod.implementations(case)
    names = list(impls)
    tensors = impls_mod.make_tensors(case, dtype, device, channels_last)
    rot = 1 if once else _rotations(tensors, device)
    sets = [tensors] + [impls_mod.make_tensors(case, dtype, device, channels_last, seed=s)
                        for s in range(1, rot)]
    elem = torch.empty(0, dtype=dtype).element_size()
    layout = "channels_last" if channels_last else "nchw"
    rows = []
    for pass_name in passes:
        base = dict(case=case.name, suite=case.suite, pass_=pass_name,
                    dtype=str(dtype).replace("torch.", ""), layout=layout, device=device,
                    N=case.N, shape=asdict(case), bytes=pass_bytes(case, pass_name, elem),
                    flops=pass_flops(case, pass_name),
                    threads=torch.get_num_threads() if device == "cpu" else None)
        # Correctness gate: convops against the first baseline, before anything is timed.
        reference_name = names[1]
        baseline_note = None
        try:
            ours = impls[names[0]][pass_name](tensors)
            try:
                ref = impls[reference_name][pass_name](tensors)
            except (RuntimeError, NotImplementedError):
                # The baseline lacks this dtype (torchvision has no bf16): check against it in
                # float32 on the same values instead.
                upcast = {k: (v.float() if v is not None else None) for k, v in tensors.items()}
                ref = impls[reference_name][pass_name](upcast)
            problem = outputs_match(ours, ref, dtype)
            if problem is not None and dtype != torch.float64:
                # Before blaming convops, ask float64: a low-precision baseline can be the one
                # that is off (seen: oneDNN's bf16 channels_last depthwise weight gradient).
                exact = {k: (v.double() if v is not None else None) for k, v in tensors.items()}
                if outputs_match(ours, impls[reference_name][pass_name](exact), dtype) is None:
                    baseline_note = (f"{impls_mod.baseline_label(reference_name, device)} in "
                                     f"{base['dtype']} disagrees with its own "
                                     f"float64 result ({problem}); convops matches float64")
                    problem = None
        except Exception as exc:  # a crash is reported, not timed
            problem = f"error: {type(exc).__name__}: {exc}"[:300]
        group, timed = [], {}
        for name in names:
            row = dict(base, impl=impls_mod.baseline_label(name, device))
            group.append(row)
            if name == reference_name and baseline_note:
                row["baseline_inaccurate"] = baseline_note
            if name == names[0] and problem is not None:
                row.update(status="wrong", reason=problem)
                continue
            fn = lambda i, f=impls[name][pass_name]: f(sets[i % len(sets)])  # noqa: E731
            try:
                if once:
                    with nvtx_range(f"{case.name}/{pass_name}/{name}", device == "cuda"):
                        fn(0)
                    row.update(status="ran-once")
                else:
                    fn(0)  # a baseline that cannot run this case says so here
                    timed[name] = (row, fn)
            except Exception as exc:
                # A baseline without this dtype (torchvision has no bf16) is "unsupported".
                unsupported = name != names[0] and "not implemented" in str(exc)
                row.update(status="unsupported" if unsupported else "error",
                           reason=f"{type(exc).__name__}: {exc}"[:300])
        if timed:
            # Every implementation of the row in one interleaved loop: fair ratios on a noisy
            # machine.
            results = time_interleaved({name: fn for name, (_, fn) in timed.items()}, device,
                                       settings["warmup"], settings["repeats"],
                                       settings["min_seconds"], name=f"{case.name}/{pass_name}")
            for name, (row, fn) in timed.items():
                median, spread, count = results[name]
                row.update(status="ok", median_s=median, spread=spread, samples=count,
                           gbps=row["bytes"] / median / 1e9,
                           tflops=row["flops"] / median / 1e12)
                if deferred_memory is None:
                    row["peak_extra_bytes"] = _peak_extra_bytes(fn, device)
                else:
                    deferred_memory.append((row, fn))
        ours_row = group[0]
        if ours_row.get("status") == "ok":
            for other in group[1:]:
                if other.get("status") == "ok":
                    ours_row[f"speedup_vs_{other['impl']}"] = other["median_s"] / \
                        ours_row["median_s"]
        rows.extend(group)
    return rows
