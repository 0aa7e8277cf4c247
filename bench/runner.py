"""Runs cases: correctness gate first, then timing of every implementation and pass."""
import math
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

import torch

from . import impls as impls_mod
from .cases import Case
from .metrics import pass_bytes, pass_flops
from .timing import nvtx_range, time_interleaved

# The gate uses the test suite's tolerances (tests/conftest.py TOLERANCES, kept equal by a
# test): max|ours - ref64| <= atol + rtol * max|ref64|, where ref64 is the baseline run in
# float64 on the same (already rounded) inputs, so only the kernel's own rounding counts.
GATE_TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-6, 1e-5),
            torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-3, 1.6e-2)}


def gate_tolerance(dtype, tf32: bool):
    """fp32 rows under TF32 are gated as fp16: TF32 keeps fp16's 10-bit mantissa."""
    return GATE_TOL[torch.float16 if dtype == torch.float32 and tf32 else dtype]


def tf32_flags() -> dict:
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def _flatten(result) -> List[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def outputs_match(ours, ref, tol) -> Optional[str]:
    """None when ours matches ref within tol = (atol, rtol), else a short reason."""
    atol, rtol = tol
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
        if err > atol + rtol * scale:
            return f"output {i}: max error {err:.3g} vs scale {scale:.3g} (atol {atol}, " \
                   f"rtol {rtol})"
    return None


def _is_oom(exc) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


def _free_after_oom(device):
    if device == "cuda":
        torch.cuda.empty_cache()


def gate(impls, names, pass_name, tensors, dtype, device, tf32) -> Tuple[Optional[str], Optional[str]]:
    """(problem with convops or None, note on the baseline or None). Skips the informational
    baseline check when the reference already is the row's dtype. A CUDA OOM anywhere is
    reported as "oom: ...", never retried in another dtype."""
    ref_name = names[1]
    # CUDA: float64. CPU: float32, because aten's float64 depthwise convolutions take its slow
    # path (minutes for --quick); fp32 from the same rounded inputs is far inside the
    # fp16/bf16 bounds, and for fp32 rows it adds at most the baseline's own fp32 rounding.
    ref_dtype = torch.float64 if device == "cuda" or dtype == torch.float64 else torch.float32
    try:
        ours = impls[names[0]][pass_name](tensors)
        exact = {k: (v.to(ref_dtype) if v is not None else None) for k, v in tensors.items()}
        ref64 = impls[ref_name][pass_name](exact)
    except Exception as exc:
        if _is_oom(exc):
            _free_after_oom(device)
            return f"oom: {type(exc).__name__}: {exc}"[:300], None
        return f"error: {type(exc).__name__}: {exc}"[:300], None
    problem = outputs_match(ours, ref64, gate_tolerance(dtype, tf32))
    note = None
    if ref_dtype == dtype:
        return problem, note
    try:  # informational: is the baseline itself within the tests' bound?
        theirs = impls[ref_name][pass_name](tensors)
        bad = outputs_match(theirs, ref64, gate_tolerance(dtype, tf32))
        if bad:
            note = f"{ref_name} in {str(dtype)[6:]} vs its own {str(ref_dtype)[6:]} result: {bad}"
    except Exception as exc:
        if _is_oom(exc):
            _free_after_oom(device)
    return problem, note


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
             deferred_memory: Optional[list] = None, clock=None) -> List[dict]:
    """Check and time every pass. Peak memory is measured right after a row's timing, or, when
    deferred_memory is a list, (row, call) is appended to it for measure_deferred_memory.
    once: every call runs once inside an NVTX range (for ncu), with no gate and no timing."""
    impls = implementations or impls_mod.implementations(case, device)
    names = list(impls)
    tensors = impls_mod.make_tensors(case, dtype, device, channels_last)
    rot = 1 if once else _rotations(tensors, device)
    sets = [tensors] + [impls_mod.make_tensors(case, dtype, device, channels_last, seed=s)
                        for s in range(1, rot)]
    elem = torch.empty(0, dtype=dtype).element_size()
    layout = "channels_last" if channels_last else "nchw"
    flags = tf32_flags()
    tf32 = flags["cudnn_allow_tf32"] and dtype == torch.float32
    backends = impls_mod.describe_backends(case, impls, tensors, device)
    rows = []
    for pass_name in passes:
        base = dict(case=case.name, suite=case.suite, pass_=pass_name,
                    dtype=str(dtype).replace("torch.", ""), layout=layout, device=device,
                    N=case.N, shape=asdict(case), bytes=pass_bytes(case, pass_name, elem),
                    flops=pass_flops(case, pass_name), input_sets=len(sets),
                    threads=torch.get_num_threads() if device == "cpu" else None, **flags,
                    tf32_in_row=tf32)
        # Correctness gate: convops against the first baseline in float64, before timing.
        problem, note = (None, None) if once else gate(impls, names, pass_name, tensors, dtype,
                                                       device, tf32)
        group, timed = [], {}
        for name in names:
            row = dict(base, impl=impls_mod.label(name, backends.get(name)), **(
                {"backend": backends[name]["backend"],
                 "backend_kernels": backends[name].get("kernels")} if name in backends else {}))
            group.append(row)
            call = impls[name].get(pass_name)
            if name == names[1] and note:
                row["baseline_inaccurate"] = note
            if name == names[0] and problem is not None:
                row.update(status="oom" if problem.startswith("oom") else "wrong",
                           reason=problem)
                continue
            if call is None or isinstance(call, impls_mod.NotTimed):
                row.update(status="n/a", reason=getattr(call, "reason", "no such pass"))
                continue
            fn = lambda i, f=call: f(sets[i % len(sets)])  # noqa: E731
            try:
                if once:
                    with nvtx_range(f"{case.name}/{pass_name}/{row['impl']}", device == "cuda"):
                        fn(0)
                    row.update(status="ran-once")
                else:
                    fn(0)  # a baseline that cannot run this case says so here
                    timed[name] = (row, fn)
            except Exception as exc:
                # A baseline without this dtype (torchvision has no bf16) is "unsupported";
                # an OOM is reported as such and never retried in another dtype.
                if _is_oom(exc):
                    _free_after_oom(device)
                    status = "oom"
                elif name != names[0] and "not implemented" in str(exc):
                    status = "unsupported"
                else:
                    status = "error"
                row.update(status=status, reason=f"{type(exc).__name__}: {exc}"[:300])
        if timed:
            # Every implementation of the row in one interleaved loop: fair ratios on a noisy
            # machine.
            try:
                results = time_interleaved({name: fn for name, (_, fn) in timed.items()},
                                           device, settings["warmup"], settings["repeats"],
                                           settings["min_seconds"],
                                           name=f"{case.name}/{pass_name}", clock=clock)
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                _free_after_oom(device)
                for row, _ in timed.values():
                    row.update(status="oom", reason=f"{type(exc).__name__}: {exc}"[:300])
                timed = {}
            for name, (row, fn) in timed.items():
                median, spread, count, host = results[name]
                row.update(status="ok", median_s=median, spread=spread, samples=count,
                           host_s=host, gbps=row["bytes"] / median / 1e9,
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
