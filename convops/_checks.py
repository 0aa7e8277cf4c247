"""Argument normalization and validation shared by every functional op.

These run before any kernel and raise ValueError/TypeError naming the argument; the C++ side
repeats the essential checks (TORCH_CHECK) for callers of torch.ops.convops.* directly.
"""
from typing import Sequence, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

IntPair = Union[int, Sequence[int]]


def pair(value: IntPair, name: str) -> Tuple[int, int]:
    # the common spellings first (these checks run on every call): an int, a pair of ints
    kind = type(value)
    if kind is int:
        return (value, value)
    if (kind is tuple or kind is list) and len(value) == 2 and type(value[0]) is int \
            and type(value[1]) is int:
        return (value[0], value[1])
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items


def positive_pair(value: IntPair, name: str) -> Tuple[int, int]:
    p = pair(value, name)
    if p[0] <= 0 or p[1] <= 0:
        raise ValueError(f"{name} must be > 0, got {p}")
    return p


def padding4(padding, kernel: Tuple[int, int], stride: Tuple[int, int],
             dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """(top, left, bottom, right) from an int, a pair, 'valid' or 'same' (F.conv2d's rules)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            begin = [t // 2 for t in totals]
            return (begin[0], begin[1], totals[0] - begin[0], totals[1] - begin[1])
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    p = pair(padding, "padding")
    if p[0] < 0 or p[1] < 0:
        raise ValueError(f"padding must be >= 0, got {p}")
    return (p[0], p[1], p[0], p[1])


def tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    return t


def same_dtype_device(ref: torch.Tensor, ref_name: str, **others) -> None:
    dtype, device = ref.dtype, ref.device
    for name, t in others.items():
        if t is None or (t.dtype == dtype and t.device == device):
            continue
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from {ref_name} dtype {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def dims(t: torch.Tensor, name: str, n: int, layout: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{name} must be {n}-D {layout}, got shape {tuple(t.shape)}")


def output_size(in_hw, kernel, stride, pad4, dilation, what: str) -> Tuple[int, int]:
    room_h = in_hw[0] + pad4[0] + pad4[2] - dilation[0] * (kernel[0] - 1) - 1
    room_w = in_hw[1] + pad4[1] + pad4[3] - dilation[1] * (kernel[1] - 1) - 1
    out = (room_h // stride[0] + 1 if room_h >= 0 else 0,
           room_w // stride[1] + 1 if room_w >= 0 else 0)
    if out[0] < 1 or out[1] < 1:
        raise ValueError(
            f"{what}: output size {tuple(out)} is below 1 for input size {tuple(in_hw)}, "
            f"kernel {tuple(kernel)}, stride {stride}, padding {pad4}, dilation {dilation}")
    return out


def compact_padding(pad4: Tuple[int, int, int, int]):
    """The kernels take (h, w) when padding is symmetric, (top, left, bottom, right) if not."""
    if pad4[0] == pad4[2] and pad4[1] == pad4[3]:
        return [pad4[0], pad4[1]]
    return list(pad4)
