"""Build convops._C and convops._emu with torch.utils.cpp_extension.

convops._C holds the CPU kernels, and the CUDA kernels when torch has CUDA, nvcc is found and a
GPU is visible, or always with FORCE_CUDA=1 (a build machine without a GPU).
convops._emu is always built: the same CUDA kernel sources compiled by the host compiler
against the CUDA emulator (csrc/emu), registering torch.ops.convops_emu.* on CPU tensors.
Environment knobs:
  FORCE_CUDA=1            compile csrc/cuda/*.cu even without a visible GPU
  FORCE_CPU=1             never compile the CUDA sources
  TORCH_CUDA_ARCH_LIST    e.g. "9.0" or "8.0;9.0+PTX" (read by torch's build helpers)
  MAX_JOBS                parallel compile jobs (read by torch's ninja backend)
  NVCC_FLAGS              extra flags appended to the nvcc command line
  DEBUG=1                 -O0 -g (and -G -lineinfo for nvcc)
  SANITIZE=1              AddressSanitizer + UBSan build of the CPU kernels and the emulator
                          (CPU only; run with libasan preloaded, see .ci/run; the CPU depthwise
                          forward leaves out its AVX-512 build where this machine cannot run
                          it, and its baseline build where this machine runs AVX2)
  DEV_NO_AVX512=1         an ordinary build without the AVX-512 depthwise forward where this
                          machine cannot run it: a quicker rebuild while iterating on the CPU
                          depthwise forward (its costliest file); never for a release
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _derive_cuda_home():
    """Point CUDA_HOME at a real toolkit folder before torch guesses it.

    torch derives CUDA_HOME from the location of `nvcc` on PATH; when that `nvcc` is a wrapper
    script (as on our build machines) the guess is wrong, so look for the folder that really
    holds include/cuda_runtime.h.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script usually names the real binary
            with open(nvcc, "r", errors="ignore") as f:
                for token in f.read(4096).split():
                    if token.endswith("/bin/nvcc") and os.path.isfile(token):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_derive_cuda_home()

try:
    import torch  # noqa: E402
    from torch.utils import cpp_extension  # noqa: E402
except ImportError:
    # pip builds in an isolated environment unless told not to; there the torch that convops
    # must be compiled against is missing.
    sys.exit("convops is compiled against the torch installed in this environment, which this "
             "build cannot see (pip's build isolation, or no torch installed). Install torch "
             "first, then build without isolation:\n"
             "    pip install torch\n"
             "    pip install --no-build-isolation .        (or -e . for a development install)")


def _want_cuda():
    if _env_flag("FORCE_CPU") or _env_flag("SANITIZE"):
        return False
    if _env_flag("FORCE_CUDA"):
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        return True
    if cpp_extension.CUDA_HOME is None or torch.version.cuda is None:
        return False
    if not torch.cuda.is_available():
        print("convops: nvcc found but no GPU is visible: the CUDA kernels are skipped "
              "(FORCE_CUDA=1 builds them anyway)", flush=True)
        return False
    return True


def _cuda_arch_summary():
    """The archs nvcc will be asked for, as 'sm_90,compute_90', recorded in the binary."""
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    except Exception:  # private helper: keep the build going if it ever moves
        return os.environ.get("TORCH_CUDA_ARCH_LIST", "unknown")
    archs = []
    for flag in flags:
        if "code=" in flag:
            archs.append(flag.split("code=")[-1].strip("[]"))
    return ",".join(archs) or "unknown"


def _cpu_flags():
    """This (build) machine's CPU flags, or None where /proc/cpuinfo cannot tell."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f
                             if line.startswith("flags")), []))
    except OSError:
        return None


def _cpu_runs_avx512():
    """Whether this machine has the AVX-512 the CPU depthwise forward's widest build needs."""
    flags = _cpu_flags()
    return flags is None or {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags


def _cpu_runs_avx2():
    """Whether this machine runs the CPU depthwise forward's AVX2 build."""
    flags = _cpu_flags()
    return flags is not None and {"avx2", "fma", "f16c", "bmi2"} <= flags


def build_extensions():
    with_cuda = _want_cuda()
    debug = _env_flag("DEBUG")
    sanitize = _env_flag("SANITIZE")
    # vptr is left out: its type checks misfire on torch classes across hidden-visibility
    # boundaries. -O1 keeps the sanitized build quick to compile.
    sanitizer_flags = ["-fsanitize=address,undefined", "-fno-sanitize=vptr",
                       "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"] \
        if sanitize else []
    optimize = ["-O0", "-g"] if debug else ["-O1", "-g"] if sanitize else None
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("CONVOPS_BUILD_PYTHON", None), ("CONVOPS_VERSION", f'"{VERSION}"'),
                     ("CONVOPS_TORCH_VERSION", f'"{torch.__version__}"')]
    if (sanitize or _env_flag("DEV_NO_AVX512")) and not _cpu_runs_avx512():
        # The sanitized build checks the kernels this machine runs: an AVX-512 build that it
        # cannot run would only double the build's time (the costliest file under ASan).
        define_macros.append(("CONVOPS_DW_FORWARD_NO_AVX512", None))
    if sanitize:
        define_macros.append(("CONVOPS_DW_FORWARD_UNOPTIMIZED", None))  # see its header
    if sanitize and _cpu_runs_avx2():
        # ... nor the baseline build where the AVX2 one runs (its tests never force another ISA;
        # each ISA file costs 5-6 minutes under ASan)
        define_macros.append(("CONVOPS_DW_FORWARD_NO_BASELINE", None))
    cxx_flags = optimize or ["-O3"]
    cxx_flags += ["-fdiagnostics-color=always"]  # torch picks the C++ standard it needs
    cxx_flags += sanitizer_flags
    # at::parallel_for is inline `#pragma omp parallel` code: without -fopenmp it compiles to a
    # serial loop and every CPU kernel runs on one thread.
    cxx_flags += ["-fopenmp"]
    extra_compile_args = {"cxx": cxx_flags}
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros += [("CONVOPS_WITH_CUDA", None),
                          ("CONVOPS_CUDA_ARCHS", f'"{_cuda_arch_summary()}"')]
        nvcc_flags = ["-O0", "-G", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["--expt-relaxed-constexpr"]
        nvcc_flags += os.environ.get("NVCC_FLAGS", "").split()
        extra_compile_args["nvcc"] = nvcc_flags
    main = ext_cls(
        name="convops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"] + sanitizer_flags,
    )
    # The emulator build of csrc/cuda: hidden visibility keeps its host instantiations of the
    # CUDA launchers from being confused with _C's.
    emu_macros = [("CONVOPS_EMULATE_CUDA", None)]
    if sanitize:
        emu_macros.append(("CONVOPS_EMU_SANITIZED", None))
    emulator = cpp_extension.CppExtension(
        name="convops._emu",
        sources=sorted(glob.glob("csrc/emu/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=emu_macros,
        extra_compile_args={"cxx": (optimize or ["-O2"]) +
                            ["-fvisibility=hidden", "-fdiagnostics-color=always"] +
                            sanitizer_flags},
        extra_link_args=sanitizer_flags,
    )
    return [main, emulator]


setup(
    name="convops",
    version=VERSION,
    description="Depthwise, dilated and deformable convolution kernels for PyTorch (CPU + CUDA)",
    packages=find_packages(include=["convops", "convops.*"]),
    ext_modules=build_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
    zip_safe=False,
)
