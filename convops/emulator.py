"""Run convops's CUDA kernels on the CPU, in the CUDA emulator (csrc/emu).

The extension ``convops._emu`` is the same CUDA kernel source compiled by the host compiler
against an emulation of the CUDA execution model; it registers ``torch.ops.convops_emu.<op>``
with the schemas of ``torch.ops.convops.<op>``, on CPU tensors.

``with convops.emulator.emulated_cuda():`` sends every convops op called inside it on CPU
tensors (forward and backward, through the public API and autograd) to the emulator instead of
the CPU kernels. ``CONVOPS_EMU_ORDER=forward|reverse|random:<seed>`` sets the order in which the
emulator runs blocks and threads (read at every launch).
"""
import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _emu  # noqa: F401  registers torch.ops.convops_emu.*

ORDERS = ("forward", "reverse", "random")


def sanitized() -> bool:
    """True when the emulator was built with AddressSanitizer (SANITIZE=1)."""
    return bool(_emu.sanitized)


class _EmulatedCuda(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "convops":
            packet = getattr(torch.ops.convops_emu, func._schema.name.split("::", 1)[1])
            func = getattr(packet, func._overloadname)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def emulated_cuda(order: str = None):
    """Within this block convops ops on CPU tensors run the CUDA kernels in the emulator.

    order: None (keep CONVOPS_EMU_ORDER), 'forward', 'reverse' or 'random:<seed>'.
    """
    previous = os.environ.get("CONVOPS_EMU_ORDER")
    if order is not None:
        os.environ["CONVOPS_EMU_ORDER"] = order
    try:
        with _EmulatedCuda():
            yield
    finally:
        if order is not None:
            if previous is None:
                os.environ.pop("CONVOPS_EMU_ORDER", None)
            else:
                os.environ["CONVOPS_EMU_ORDER"] = previous


def launch_counts() -> dict:
    """{kernel name: number of launches} of the emulated kernels run so far in this process."""
    return _emu.launch_counts()


def selftest(kernel: str, input: torch.Tensor) -> torch.Tensor:
    """Runs one of the emulator's own test kernels (csrc/emu/selftest.cpp)."""
    return torch.ops.convops_emu.selftest(kernel, input)
