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
# (already rounded) low-precision inputs, so only the kernel's own rounding is measured.
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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None,
                 what: str = "") -> None:
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values in result"
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
