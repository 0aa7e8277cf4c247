"""`python -m convops.info`: is the extension really built, with which kernels?"""
import platform

import torch


def build_info() -> dict:
    import convops
    from convops import _C

    ops = sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("convops::"))
    return {
        "convops": convops.__version__,
        "torch": torch.__version__,
        "torch_built_against": _C.torch_built_against,
        "cuda_compiled": bool(_C.cuda_compiled),
        "cuda_archs": _C.cuda_archs or "-",
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
