"""The bad-input battery: every malformed call, each in a forked child process, so that a crash
(SIGSEGV, SIGFPE, abort) fails the test instead of killing the run. Each must raise a Python
exception that names the offending argument before any kernel runs."""
import multiprocessing as mp

import pytest
import torch

import convops
import test_deform
import test_depthwise
import test_dilated

CTX = mp.get_context("fork")


def _in_child(fn, conn):
    try:
        fn()
        conn.send(("ok", ""))
    except BaseException as exc:  # report every exception type to the parent
        conn.send((type(exc).__name__, str(exc)))


def run_isolated(fn, timeout=60):
    """(exception type name or 'ok', message, exit code) of fn() run in a forked child."""
    parent, child = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_in_child, args=(fn, child))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return "timeout", "", None
    result = parent.recv() if parent.poll() else ("crashed", "", proc.exitcode)
    return result[0], result[1], proc.exitcode


def _depthwise_call(make):
    def call():
        x, w, b, kwargs = make(*test_depthwise._ok())
        convops.depthwise_conv2d(x, w, b, **kwargs)
    return call


def _deform_call(change):
    def call():
        a = test_deform._ok() | change
        convops.deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], a.get("stride", 1),
                              a["padding"], a.get("dilation", 1), a["mask"])
    return call


def _dilated_call(change):
    def call():
        a = test_dilated._ok() | change
        convops.dilated_conv2d(a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                               a["dilation"], a["groups"])
    return call


MODULE_CASES = [
    ("depth_multiplier", ValueError, lambda: convops.DepthwiseConv2d(4, 3, depth_multiplier=0)),
    ("kernel_size", ValueError, lambda: convops.DepthwiseConv2d(4, 0)),
    ("padding", ValueError, lambda: convops.DepthwiseConv2d(4, 3, padding="full")),
    ("padding='same'", ValueError, lambda: convops.DepthwiseConv2d(4, 3, 2, padding="same")),
    ("groups", ValueError, lambda: convops.DilatedConv2d(4, 6, 3, groups=4)),
    ("stride", ValueError, lambda: convops.DilatedConv2d(4, 4, 3, stride=0)),
    ("groups", ValueError, lambda: convops.DeformConv2d(4, 6, 3, groups=4)),
    ("deform_groups", ValueError, lambda: convops.ModulatedDeformConv2dPack(4, 4, 3,
                                                                            deform_groups=3)),
    ("dilation", ValueError, lambda: convops.DeformConv2dPack(4, 4, 3, dilation=0)),
    ("input", ValueError, lambda: convops.DepthwiseConv2d(4, 3)(torch.randn(4, 8, 8))),
    ("weight", ValueError, lambda: convops.DepthwiseConv2d(4, 3)(torch.randn(1, 5, 8, 8))),
    ("offset", ValueError, lambda: convops.DeformConv2d(4, 4, 3)(torch.randn(1, 4, 8, 8),
                                                                 torch.randn(1, 9, 6, 6))),
    ("mask", ValueError, lambda: convops.ModulatedDeformConv2d(4, 4, 3)(
        torch.randn(1, 4, 8, 8), torch.randn(1, 18, 6, 6), torch.rand(1, 3, 6, 6))),
    ("groups", ValueError, lambda: convops.DilatedConv2d(4, 4, 3, groups=2)(
        torch.randn(1, 6, 8, 8))),
    ("output size", ValueError, lambda: convops.DilatedConv2d(4, 4, 3, dilation=5)(
        torch.randn(1, 4, 8, 8))),
]

# Direct torch.ops calls skip the Python checks: the C++ checks must still raise, not crash.
DIRECT_CASES = [
    ("stride", lambda: torch.ops.convops.depthwise_conv2d(
        torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), None, [0, 1], [0, 0], [1, 1])),
    ("padding", lambda: torch.ops.convops.dilated_conv2d(
        torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), None, [1, 1], [-1, 0], [1, 1])),
    ("dilation", lambda: torch.ops.convops.deform_conv2d(
        torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), torch.randn(1, 18, 3, 3), None, None,
        [1, 1], [0, 0], [0, 1])),
    ("offset", lambda: torch.ops.convops.deform_conv2d(
        torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), torch.randn(1, 17, 3, 3), None, None,
        [1, 1], [0, 0], [1, 1])),
    ("offset", lambda: torch.ops.convops.deform_conv2d(
        torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), torch.randn(1, 18, 4, 3), None, None,
        [1, 1], [0, 0], [1, 1])),
    ("mask", lambda: torch.ops.convops.deform_conv2d(
        torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), torch.randn(1, 18, 3, 3),
        torch.rand(1, 8, 3, 3), None, [1, 1], [0, 0], [1, 1])),
    ("grad_output", lambda: torch.ops.convops.depthwise_conv2d_backward(
        torch.randn(1, 2, 4, 4), torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), [1, 1],
        [0, 0], [1, 1], [True, True, True])),
    ("grad_output", lambda: torch.ops.convops.deform_conv2d_backward(
        torch.randn(1, 2, 2, 3), torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3),
        torch.randn(1, 18, 3, 3), None, [1, 1], [0, 0], [1, 1], [True] * 5)),
    ("output size", lambda: torch.ops.convops.depthwise_conv2d(
        torch.randn(1, 2, 2, 2), torch.randn(2, 1, 3, 3), None, [1, 1], [0, 0], [1, 1])),
    ("input", lambda: torch.ops.convops.dilated_conv2d(
        torch.randn(2, 5, 5), torch.randn(2, 2, 3, 3), None, [1, 1], [0, 0], [1, 1])),
    ("input", lambda: torch.ops.convops.deform_conv2d(
        torch.randn(1, 0, 5, 5), torch.randn(2, 1, 3, 3), torch.randn(1, 18, 3, 3), None, None,
        [1, 1], [0, 0], [1, 1])),
    ("input", lambda: torch.ops.convops.dilated_conv2d(
        torch.randn(1, 0, 5, 5), torch.randn(2, 1, 3, 3), None, [1, 1], [0, 0], [1, 1])),
    ("input", lambda: torch.ops.convops.depthwise_conv2d(
        torch.randn(1, 0, 5, 5), torch.randn(2, 1, 3, 3), None, [1, 1], [0, 0], [1, 1])),
    ("float32, float64", lambda: torch.ops.convops.depthwise_conv2d(
        torch.ones(1, 2, 5, 5, dtype=torch.int32), torch.ones(2, 1, 3, 3, dtype=torch.int32),
        None, [1, 1], [0, 0], [1, 1])),
]

BATTERY = (
    [(f"depthwise-{n}", exc, _depthwise_call(make)) for n, exc, make in
     test_depthwise.ERROR_CASES] +
    [(f"deform-{n}", exc, _deform_call(change)) for n, exc, change in test_deform.ERROR_CASES] +
    [(f"dilated-{n}", exc, _dilated_call(change)) for n, exc, change in
     test_dilated.ERROR_CASES] +
    [(f"module-{n}", exc, fn) for n, exc, fn in MODULE_CASES] +
    [("deform-input", ValueError, lambda: convops.deform_conv2d(
        torch.randn(1, 0, 5, 5), torch.randn(1, 18, 3, 3), torch.randn(2, 1, 3, 3))),
     ("dilated-input", ValueError, lambda: convops.dilated_conv2d(
         torch.randn(1, 0, 5, 5), torch.randn(2, 1, 3, 3)))] +
    [(f"direct-{n}", RuntimeError, fn) for n, fn in DIRECT_CASES]
)


@pytest.mark.parametrize("name,exc,fn", BATTERY, ids=[f"{i}-{c[0]}" for i, c in
                                                      enumerate(BATTERY)])
def test_bad_input_raises_in_child(name, exc, fn):
    kind, message, code = run_isolated(fn)
    assert kind not in ("crashed", "timeout"), f"{name}: child {kind} (exit code {code})"
    assert kind == exc.__name__, f"{name}: expected {exc.__name__}, got {kind}: {message}"
    argument = name.split("-", 1)[1].split()[0].split("=")[0]
    assert argument in message, f"{name}: message does not name '{argument}': {message}"


def _nan_inf_offsets():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    off = torch.full((1, 18, 4, 4), float("nan"))
    off[:, ::3] = float("inf")
    off[:, 1::3] = -1e38
    off.requires_grad_()
    mask = torch.full((1, 9, 4, 4), float("nan"), requires_grad=True)
    out = convops.deform_conv2d(x, off, torch.randn(2, 2, 3, 3), mask=mask)
    out.sum().backward()


def test_nan_inf_offsets_and_masks_never_crash():
    kind, message, code = run_isolated(_nan_inf_offsets)
    assert kind == "ok", f"{kind}: {message} (exit code {code})"


def test_battery_size():
    # The closing note quotes this count; keep it honest.
    assert len(BATTERY) >= 60, len(BATTERY)
