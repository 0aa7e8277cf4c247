"""Property-based fuzzing (hypothesis) of every op against its reference: random shapes,
strides, paddings, dilations, groups, offset groups, dtypes, layouts, non-contiguous views,
offsets inside and far outside the image, masks, tiny and empty batches."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convops
from conftest import assert_close
from reference import deform_conv2d as deform_reference

# 200 examples per op within CI's budget: every example is a tiny problem.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])


def _layout(x, how):
    """NCHW, channels_last, or a non-contiguous view with the same values."""
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "strided":
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@st.composite
def conv_problem(draw, depthwise):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 16))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 16))
    if depthwise:
        # 8-33 channels: whole channel vectors and tails of the vectorized CPU forward
        groups = c = draw(st.one_of(st.integers(1, 6), st.sampled_from([8, 16, 17, 33])))
        oc = c * draw(st.integers(1, 3))
    else:
        groups = draw(st.integers(1, 3))
        c = groups * draw(st.integers(1, 3))
        oc = groups * draw(st.integers(1, 3))
    return dict(n=draw(st.integers(0, 2)), c=c, oc=oc, groups=groups, h=h, w=w, k=(kh, kw),
                stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
                bias=draw(st.booleans()), dtype=draw(DTYPES),
                layout=draw(st.sampled_from(["nchw", "channels_last", "strided"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _check_conv(p, op):
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["n"], p["c"], p["h"], p["w"], generator=g, dtype=torch.float64)
    w = torch.randn(p["oc"], p["c"] // p["groups"], *p["k"], generator=g, dtype=torch.float64)
    b = torch.randn(p["oc"], generator=g, dtype=torch.float64) if p["bias"] else None
    dt = p["dtype"]
    xs = _layout(x.to(dt), p["layout"]).requires_grad_()
    ws = w.to(dt).requires_grad_()
    bs = b.to(dt).requires_grad_() if b is not None else None
    args = (p["stride"], p["padding"], p["dilation"])
    out = op(xs, ws, bs, *args)
    rx, rw = x.to(dt).double().requires_grad_(), w.to(dt).double().requires_grad_()
    rb = b.to(dt).double().requires_grad_() if b is not None else None
    ref = F.conv2d(rx, rw, rb, *args, groups=p["groups"])
    assert_close(out, ref, dt, "forward")
    if out.numel() == 0:
        return
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dt)
    leaves = [t for t in (xs, ws, bs) if t is not None]
    ref_leaves = [t for t in (rx, rw, rb) if t is not None]
    for a, e in zip(torch.autograd.grad(out, leaves, go),
                    torch.autograd.grad(ref, ref_leaves, go.double())):
        assert_close(a, e, dt, "gradient")


@FUZZ
@given(conv_problem(depthwise=True))
def test_fuzz_depthwise(p):
    _check_conv(p, convops.depthwise_conv2d)


@FUZZ
@given(conv_problem(depthwise=False))
def test_fuzz_dilated(p):
    groups = p["groups"]
    _check_conv(p, lambda x, w, b, s, pad, d: convops.dilated_conv2d(x, w, b, s, pad, d, groups))


@FUZZ
@given(conv_problem(depthwise=False), st.integers(1, 3), st.booleans(),
       st.sampled_from([0.5, 2.0, 50.0]))
def test_fuzz_deform(p, og_factor, with_mask, offset_scale):
    g = torch.Generator().manual_seed(p["seed"])
    c = p["c"] * og_factor  # keep c divisible by both groups and offset groups
    og = og_factor
    kh, kw = p["k"]
    (sh, sw), (ph, pw), (dh, dw) = p["stride"], p["padding"], p["dilation"]
    ho = (p["h"] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (p["w"] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    dt = p["dtype"]
    x = torch.randn(p["n"], c, p["h"], p["w"], generator=g, dtype=torch.float64).to(dt)
    w = torch.randn(p["oc"], c // p["groups"], kh, kw, generator=g, dtype=torch.float64).to(dt)
    off = (torch.randn(p["n"], 2 * og * kh * kw, ho, wo, generator=g, dtype=torch.float64)
           * offset_scale).to(dt)
    mask = torch.rand(p["n"], og * kh * kw, ho, wo, generator=g,
                      dtype=torch.float64).to(dt) if with_mask else None
    b = torch.randn(p["oc"], generator=g, dtype=torch.float64).to(dt) if p["bias"] else None
    xs = _layout(x, p["layout"]).requires_grad_()
    leaves = [xs, off.requires_grad_(), w.requires_grad_()] + \
        ([mask.requires_grad_()] if with_mask else []) + ([b.requires_grad_()] if p["bias"] else [])
    out = convops.deform_conv2d(xs, off, w, b, p["stride"], p["padding"], p["dilation"], mask)
    refs = [t.detach().double().requires_grad_() for t in leaves]
    rmask = refs[3] if with_mask else None
    rb = refs[-1] if p["bias"] else None
    ref = deform_reference(refs[0], refs[1], refs[2], rb, p["stride"], p["padding"],
                           p["dilation"], rmask)
    assert_close(out, ref, dt, "forward")
    if out.numel() == 0:
        return
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dt)
    for a, e in zip(torch.autograd.grad(out, leaves, go),
                    torch.autograd.grad(ref, refs, go.double())):
        assert_close(a, e, dt, "gradient")
