"""Shared test settings: tolerances (stated once, here), devices, comparison helpers."""
import contextlib
import os
import zlib

import pytest
import torch

# Optional packages: decided once, here. Every package a test imports is installed by the
# README's test command, so none is skipped for being absent; a missing one stops the run at
# once with the command to fix it, instead of failing one test in a thousand.
TEST_PACKAGES = ["torchvision", "hypothesis", "onnx", "onnxruntime", "onnxscript", "matplotlib",
                 "tqdm"]


def pytest_configure(config):
    import importlib.util
    missing = [name for name in TEST_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.exit(f"missing test packages {missing}: install them with the README's test "
                    f"command (pip install ... {' '.join(missing)})", returncode=4)


# Every freshly allocated kernel output is NaN-filled before the kernel writes it, so a kernel
# that skips an element fails instead of passing on a lucky zero.
os.environ["CONVOPS_POISON_OUTPUTS"] = "1"

import convops  # noqa: E402,F401
from convops import emulator  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes  # noqa: E402

# Norm-wise tolerances, relative to the largest magnitude of the float64 reference:
#   max|actual - expected| <= ATOL + RTOL * max|expected|
# float16/bfloat16 results are compared with a float64 reference computed from the same
# (already rounded) low-precision inputs, so only the kernel's own rounding is measured; where
# a test passes the absolute terms (abs_sum, below) they get the tighter element-wise bound.
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-4, 2e-3),
    torch.bfloat16: (1e-3, 1.6e-2),
}

# fp32 on TF32 tensor cores (torch.backends.cudnn.allow_tf32, which convops's CUDA engine
# follows as F.conv2d does): 10 mantissa bits in the products, like float16.
TF32_TOLERANCE = (1e-4, 2e-3)

# Every dtype the ops take, in the order the case grids cycle through.
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def stable_seed(*parts) -> int:
    """A seed that is the same in every process (unlike hash(), which is salted per run)."""
    return zlib.crc32(repr(parts).encode())


# --- The element-wise bound for float16/bfloat16 results ------------------------------------
# Inputs are rounded to the dtype first and the float64 reference `ref` is computed from those
# rounded values, so the only error left is the kernel's own arithmetic. Every kernel widens its
# operands to fp32 (products of two fp16/bf16 values are exact in fp32), sums the n terms
# t_i of each output element in fp32, and rounds the sum once to the dtype. A recursive fp32
# sum of n terms, in any order and blocking, is within gamma_n = n*u/(1 - n*u) of the exact sum,
# relative to sum |t_i| (Higham, Accuracy and Stability, 4.2), u = 2^-24; the final rounding
# adds half an ulp of the dtype at the fp32 result. Hence, element-wise,
#
#   |actual - ref| <= half_ulp_dtype(|ref| + e32) + e32,   e32 = K * 2^-24 * sum_i |t_i|,
#
# with K = n + 8 (8 covers the bias, the widening and a final scale such as a mask; gamma_n's
# denominator is < 1.001 for every n here). sum_i |t_i| is the same op evaluated on |inputs|
# (for a convolution: conv(|x|, |w|) + |b|; for a gradient: its reference with |grad_output|).
# Deformable sampling adds the fp32 error of the sample position p: the bilinear weights are
# off by at most ~2u|p| each, so there the terms use the four corners with weight one and K
# grows by 4*max|p| (tests/reference.py deform_abs_terms).
#
# The CUDA deformable engine feeds its tensor cores sampled columns rounded to the input dtype
# (as torchvision's columns are): one more rounding per term of the forward and the weight
# gradient, which adds 2^-bits * sum_i |t_i| (rounded_operands=True; engine_rounds_columns()).
HALF_ULP_BITS = {torch.float16: 11, torch.bfloat16: 8}  # 1 + explicit mantissa bits
FP32_UNIT = 2.0 ** -24


def half_ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half an ulp of `dtype` at float64 magnitudes (subnormals included)."""
    tiny = torch.finfo(dtype).tiny
    exponent = torch.floor(torch.log2(magnitude.clamp_min(tiny)))
    return torch.exp2(exponent - HALF_ULP_BITS[dtype])


def lowp_bound(expected: torch.Tensor, abs_sum: torch.Tensor, terms: int,
               dtype: torch.dtype, rounded_operands: bool = False) -> torch.Tensor:
    """The element-wise error bound stated above (float64, on the CPU)."""
    abs_sum = abs_sum.detach().double().cpu()
    e32 = (terms + 8) * FP32_UNIT * abs_sum
    if rounded_operands:
        e32 = e32 + 2.0 ** -HALF_ULP_BITS[dtype] * abs_sum
    return half_ulp(expected.detach().double().cpu().abs() + e32, dtype) + e32


def engine_rounds_columns(device) -> bool:
    """Whether a deformable call on `device` runs the CUDA implicit-GEMM engine (on a GPU, or
    in the emulator), whose tensor cores take columns rounded to the input dtype."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    on_gpu = str(device).startswith("cuda") or isinstance(_get_current_dispatch_mode(),
                                                          emulator._EmulatedCuda)
    return on_gpu and os.environ.get("CONVOPS_CUDA_IMPL") != "plain"


def within_lowp_bound(actual, expected, abs_sum, terms, dtype, rounded_operands=False):
    """(ok, message) for the element-wise low-precision check (non-finite values fail)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bound = lowp_bound(e, abs_sum, terms, dtype, rounded_operands)
    err = (a - e).abs()
    bad = ~(err <= bound)  # NaN fails
    if not bad.any():
        return True, ""
    i = tuple(int(v) for v in bad.nonzero()[0])
    return False, (f"{int(bad.sum())} of {a.numel()} elements outside the {dtype} bound; first "
                   f"at {i}: got {a[i].item():.6g}, expected {e[i].item():.6g}, bound "
                   f"{bound[i].item():.3g} (sum|terms| {abs_sum.detach().double().cpu()[i].item():.3g}, "
                   f"{terms} terms)")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None,
                 what: str = "", abs_sum: torch.Tensor = None, terms: int = None,
                 rounded_operands: bool = False) -> None:
    """Norm-wise for float32/float64; element-wise (lowp_bound) for float16/bfloat16 when the
    absolute terms are given."""
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values in result"
    if abs_sum is not None and dtype in HALF_ULP_BITS:
        ok, message = within_lowp_bound(a, e, abs_sum, terms, dtype, rounded_operands)
        assert ok, f"{what}: {message}"
        return
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} " \
                                      f"(atol {atol}, rtol {rtol}, {dtype})"


def check_gpu_against_cpu(check, case, gpu, names):
    """check(case, device) compares one case's forward and gradients with a float64 reference
    and returns (out, grads); this runs it on the GPU backend and on convops's CPU kernels and
    also compares the two, as the same op on two backends must agree."""
    out, grads = check(case, gpu.device)
    with gpu.native_cpu():
        cpu_out, cpu_grads = check(case, "cpu")
    assert_close(out, cpu_out.double(), case["dtype"], "forward vs cpu op")
    for name, a, c in zip(names, grads, cpu_grads):
        assert_close(a, c.double(), case["dtype"], f"grad_{name} vs cpu op")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 results are compared at fp32 precision, so TF32 (cuDNN's default, followed by
    convops's CUDA engine) is off in every test except those that turn it on themselves."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=requires_cuda)])
def device(request):
    return request.param


@pytest.fixture(params=[False, True], ids=["nondeterministic", "deterministic"])
def deterministic_mode(request):
    """Runs a test with torch.use_deterministic_algorithms off and on (CUDA atomics and cuBLAS
    vs the ordered scatter and convops's own GEMM), restoring the previous setting. Not
    warn_only: anything convops calls that has no deterministic implementation raises."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(prev)


class GpuBackend:
    """Where a CUDA test runs: on a real GPU ("cuda"), or in the CUDA emulator on CPU tensors
    ("emu-<order>", see convops/emulator.py), through the same test function."""

    def __init__(self, name: str):
        self.name = name
        self.emulated = name.startswith("emu")
        self.device = "cpu" if self.emulated else "cuda"
        self.order = name.split("-", 1)[1] if self.emulated else None

    def native_cpu(self):
        """Inside this block convops ops run convops's CPU kernels again (for comparisons)."""
        return _disable_current_modes() if self.emulated else contextlib.nullcontext()

    def __repr__(self):
        return self.name


# Every CUDA test runs on the GPU when there is one, and always in the emulator under two
# orders of blocks and threads (a fixed random seed, so failures replay).
GPU_BACKENDS = (["cuda"] if HAS_CUDA else []) + ["emu-forward", "emu-random:20261123"]


@pytest.fixture(params=GPU_BACKENDS)
def gpu(request):
    backend = GpuBackend(request.param)
    if not backend.emulated:
        yield backend
        return
    with emulator.emulated_cuda(backend.order):
        yield backend


# --- Reproducibility ---------------------------------------------------------------------------
# Tests draw their data from generators seeded by stable_seed(case); anything that still uses
# the global RNGs (torch.randn without a generator, modules' initialization) is seeded per test
# from a stable hash of its node id, so every run and every xdist worker draws the same values.
# A failing test's report names that seed.

@pytest.fixture(autouse=True)
def _seed_global_rngs(request):
    import random
    seed = stable_seed(request.node.nodeid)
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("global_seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seed = dict(item.user_properties).get("global_seed", stable_seed(item.nodeid))
        report.sections.append(("replay", f"global RNG seed {seed} = stable_seed({item.nodeid!r})"
                                          "; case data: the seed printed in the assertion"))


@contextlib.contextmanager
def env_set(name, value):
    """os.environ[name] = value inside the block, restored after (for code that cannot take
    pytest's monkeypatch: cached helpers, hypothesis examples)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
