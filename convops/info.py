"""`python -m convops.info`: is the extension really built, with which kernels?"""
import platform

import torch


def _why_no_cuda() -> str:
    """Why this build has no CUDA kernels, in the words setup.py uses."""
    if torch.version.cuda is None:
        return "this torch has no CUDA"
    return ("built where no GPU was visible (or with FORCE_CPU=1); rebuild with FORCE_CUDA=1 "
            "to compile the CUDA kernels anyway")


def _emulator() -> str:
    try:
        from convops import emulator
    except ImportError as e:
        return f"missing ({e})"
    ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("convops_emu::")]
    sanitized = ", AddressSanitizer + UBSan" if emulator.sanitized() else ""
    return f"built (torch.ops.convops_emu, {len(ops)} ops{sanitized})"


def build_info() -> dict:
    import convops
    from convops import _C

    ops = sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("convops::"))
    cuda = bool(_C.cuda_compiled)
    return {
        "convops": convops.__version__,
        "torch": torch.__version__,
        "torch_built_against": _C.torch_built_against,
        "cuda_compiled": True if cuda else f"False ({_why_no_cuda()})",
        "cuda_archs": _C.cuda_archs or "-",
        "emulator": _emulator(),
        "dilated_cpu": _C.dilated_cpu_kernels(),
        "torch_cuda": torch.version.cuda or "-",
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
        "python": platform.python_version(),
        "ops": ops,
    }


def main() -> None:
    info = build_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "ops":
            value = ", ".join(value)
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
