"""Shapes users run: channel counts across several vector widths and register blocks (1 .. 80),
maps larger than one tile, batch >= 2, every op in every layout, channels_last or strided
grad_output, weights, offsets and masks; float16/bfloat16 checked element-wise against the
bound stated in conftest.py. The grids are chosen, not Cartesian products: each case covers a
different channel count, layout mix and dtype, and the emulated CUDA cases stay small."""
import pytest
import torch
import torch.nn.functional as F

import convops
from conftest import (DTYPES, assert_close, check_gpu_against_cpu, engine_rounds_columns,
                      stable_seed,
                      within_lowp_bound)
from reference import conv_abs_terms, deform_abs_terms
from reference import deform_conv2d as deform_reference

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def relayout(t, how):
    """The same values as NCHW ('nchw'), channels_last ('cl'), a view with every other element
    of a wider buffer ('strided'), or a transposed-storage view ('t'); 1-D tensors: 'strided'
    or contiguous."""
    if t is None:
        return None
    if how == "cl" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if how == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "t" and t.dim() == 4:
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t.contiguous()


def assert_layout_kept(x, out, tag):
    """A channels_last input gives a channels_last output (where the input is not also NCHW-
    contiguous, e.g. one channel or a 1x1 map, which PyTorch reads as NCHW)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), tag


def _tag(case):
    return f"[seed {stable_seed(case)} case {case}]"


def conv_case(op, c, oc, k, size, dtype, x="nchw", w="nchw", go="nchw", batch=2, stride=1,
              padding=None, dilation=1, groups=None, bias=True):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    k, stride, dilation = pair(k), pair(stride), pair(dilation)
    if padding is None:
        padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k))
    groups = c if op == "depthwise" else (groups or 1)
    return dict(op=op, c=c, oc=oc, k=k, size=size, dtype=dtype, layouts=dict(x=x, w=w, go=go),
                batch=batch, stride=stride, padding=pair(padding), dilation=dilation,
                groups=groups, bias=bias)


def check_conv(case, device):
    """Forward and every gradient of depthwise/dilated against F.conv2d in float64; float16 and
    bfloat16 element-wise within conftest's bound. Returns (out, grads)."""
    tag = _tag(case)
    gen = torch.Generator().manual_seed(stable_seed(case))
    dt, L = case["dtype"], case["layouts"]
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(dt)  # noqa: E731
    kh, kw = case["k"]
    x = rnd(case["batch"], case["c"], *case["size"])
    w = rnd(case["oc"], case["c"] // case["groups"], kh, kw)
    b = rnd(case["oc"]) if case["bias"] else None
    leaves = [relayout(x, L["x"]), relayout(w, L["w"]), relayout(b, L["w"])]
    leaves = [t.to(device).requires_grad_() if t is not None else None for t in leaves]
    args = (case["stride"], case["padding"], case["dilation"])
    if case["op"] == "depthwise":
        out = convops.depthwise_conv2d(*leaves, *args)
    else:
        out = convops.dilated_conv2d(*leaves, *args, case["groups"])
    ref_leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None
                  for t in leaves]
    ref = F.conv2d(*ref_leaves, *args, groups=case["groups"])
    assert out.dtype == dt
    assert_layout_kept(leaves[0], out, tag)
    go = relayout(torch.randn(ref.shape, generator=gen, dtype=F64).to(dt), L["go"])
    live = [i for i, t in enumerate(leaves) if t is not None]
    abs_fwd, abs_grads = conv_abs_terms(
        lambda *t: F.conv2d(*t, *args, groups=case["groups"]) if len(t) == 3 else
        F.conv2d(*t, None, *args, groups=case["groups"]), [ref_leaves[i] for i in live], go)
    N, (Ho, Wo) = case["batch"], ref.shape[2:]
    taps, cg, ocg = kh * kw, case["c"] // case["groups"], case["oc"] // case["groups"]
    assert_close(out, ref, dt, f"{tag} forward", abs_fwd, cg * taps + 1)
    grads = torch.autograd.grad(out, [leaves[i] for i in live], go.to(device))
    ref_grads = torch.autograd.grad(ref, [ref_leaves[i] for i in live], go.double())
    terms = {0: ocg * taps, 1: N * Ho * Wo, 2: N * Ho * Wo}
    names = ["input", "weight", "bias"]
    for i, a, e, s in zip(live, grads, ref_grads, abs_grads):
        assert a.dtype == dt
        assert_close(a, e, dt, f"{tag} grad_{names[i]}", s, terms[i])
    return out, grads


# (channels, out channels, kernel, map, dtype, layouts of x / w / grad_out, extra)
DEPTHWISE_CPU = [
    conv_case("depthwise", 1, 1, 3, (41, 37), F32, "cl", "strided", "nchw"),
    conv_case("depthwise", 7, 14, 5, (23, 40), BF16, "cl", "nchw", "cl", stride=2),
    conv_case("depthwise", 16, 16, 3, (40, 40), F16, "nchw", "t", "cl", dilation=2),
    conv_case("depthwise", 17, 17, 3, (33, 29), BF16, "cl", "strided", "strided"),
    conv_case("depthwise", 17, 34, 3, (21, 22), F32, "strided", "nchw", "cl", batch=3),
    conv_case("depthwise", 33, 33, 7, (36, 35), F16, "cl", "t", "nchw", dilation=(1, 2)),
    conv_case("depthwise", 33, 33, 5, (30, 31), F32, "nchw", "strided", "strided", stride=(2, 1)),
    conv_case("depthwise", 64, 64, 3, (28, 26), F32, "cl", "nchw", "t", stride=2),
    conv_case("depthwise", 64, 128, 3, (19, 21), BF16, "nchw", "nchw", "cl"),
    conv_case("depthwise", 80, 80, 3, (40, 37), BF16, "cl", "nchw", "cl"),
    conv_case("depthwise", 80, 80, (1, 7), (17, 40), F16, "cl", "strided", "nchw", batch=3),
    conv_case("depthwise", 48, 96, 5, (20, 18), F64, "cl", "strided", "cl", dilation=2),
    conv_case("depthwise", 20, 20, 3, (26, 25), F16, "nchw", "nchw", "nchw", stride=3,
              padding=0, bias=False),
    conv_case("depthwise", 40, 40, 9, (24, 24), F32, "cl", "nchw", "strided", padding=2),
]


def _ids(cases):
    return [f"{c['op']}-c{c['c']}-oc{c['oc']}-k{c['k'][0]}x{c['k'][1]}-{c['size'][0]}x"
            f"{c['size'][1]}-{'-'.join(c['layouts'].values())}-{str(c['dtype'])[6:]}"
            for c in cases]


@pytest.mark.parametrize("case", DEPTHWISE_CPU, ids=_ids(DEPTHWISE_CPU))
def test_depthwise_realistic_cpu(case):
    check_conv(case, "cpu")


DILATED_CPU = [
    conv_case("dilated", 7, 16, 3, (30, 33), F32, "cl", "strided", "nchw", dilation=2),
    conv_case("dilated", 16, 33, 3, (40, 40), BF16, "nchw", "t", "cl", dilation=6),
    conv_case("dilated", 17, 64, 3, (25, 27), F16, "cl", "nchw", "strided", dilation=(3, 1)),
    conv_case("dilated", 33, 80, 3, (21, 24), BF16, "cl", "nchw", "cl", dilation=2),
    conv_case("dilated", 64, 70, 3, (22, 19), F32, "nchw", "nchw", "cl", dilation=12,
              padding=12),
    conv_case("dilated", 80, 80, 3, (20, 20), F16, "strided", "strided", "nchw", groups=2,
              dilation=4),
    conv_case("dilated", 66, 34, 3, (23, 21), BF16, "cl", "t", "nchw", groups=2, stride=2,
              dilation=2),
    conv_case("dilated", 16, 16, (1, 3), (40, 17), F64, "cl", "nchw", "cl", dilation=(1, 5)),
]


@pytest.fixture(params=["direct", "engine"])
def dilated_impl(request, monkeypatch):
    if request.param == "engine":
        monkeypatch.setenv("CONVOPS_CPU_IMPL", "engine")
    return request.param


@pytest.mark.parametrize("case", DILATED_CPU, ids=_ids(DILATED_CPU))
def test_dilated_realistic_cpu(case, dilated_impl):
    if dilated_impl == "direct" and case["dtype"] == F64:
        pytest.skip("float64 has no direct kernels: the engine run covers it")
    check_conv(case, "cpu")


def deform_case(c, oc, k, size, dtype, og=1, groups=1, x="nchw", w="nchw", off="nchw",
                mask="nchw", go="nchw", batch=2, stride=1, dilation=1, scale=2.0, bias=True):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    k, stride, dilation = pair(k), pair(stride), pair(dilation)
    padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k))
    return dict(op="deform", c=c, oc=oc, k=k, size=size, dtype=dtype, og=og, groups=groups,
                layouts=dict(x=x, w=w, off=off, mask=mask, go=go), batch=batch, stride=stride,
                padding=padding, dilation=dilation, scale=scale, bias=bias)


DEFORM_GRADS = ("input", "offset", "weight", "mask", "bias")


def check_deform(case, device):
    tag = _tag(case)
    gen = torch.Generator().manual_seed(stable_seed(case))
    dt, L = case["dtype"], case["layouts"]
    kh, kw = case["k"]
    (sh, sw), (ph, pw), (dh, dw) = case["stride"], case["padding"], case["dilation"]
    H, W = case["size"]
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    N, og = case["batch"], case["og"]
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=F64) * scale).to(dt)  # noqa
    t = dict(input=relayout(rnd(N, case["c"], H, W), L["x"]),
             offset=relayout(rnd(N, 2 * og * kh * kw, Ho, Wo, scale=case["scale"]), L["off"]),
             weight=relayout(rnd(case["oc"], case["c"] // case["groups"], kh, kw), L["w"]),
             mask=relayout(torch.rand(N, og * kh * kw, Ho, Wo, generator=gen, dtype=F64).to(dt),
                           L["mask"]) if L["mask"] else None,
             bias=relayout(rnd(case["oc"]), L["w"]) if case["bias"] else None)
    t = {k: (v.to(device).requires_grad_() if v is not None else None) for k, v in t.items()}
    args = (case["stride"], case["padding"], case["dilation"])
    out = convops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], *args,
                                mask=t["mask"])
    r = {k: (v.detach().double().cpu().requires_grad_() if v is not None else None)
         for k, v in t.items()}
    ref = deform_reference(r["input"], r["offset"], r["weight"], r["bias"], *args, r["mask"])
    assert out.dtype == dt
    assert_layout_kept(t["input"], out, tag)
    go = relayout(torch.randn(ref.shape, generator=gen, dtype=F64).to(dt), L["go"])
    terms = deform_abs_terms(r["input"], r["offset"], r["weight"], r["bias"], *args, r["mask"],
                             go)
    # Positions: only points within 2 of the image read anything.
    pos = 4 * (max(H, W) + 2)
    cg, ocg, taps = case["c"] // case["groups"], case["oc"] // case["groups"], kh * kw
    cpo = case["c"] // og
    counts = dict(forward=4 * cg * taps + pos, weight=N * Ho * Wo + 4 + pos,
                  mask=ocg + 4 * cpo + pos, offset=ocg + 4 * cpo + pos, bias=N * Ho * Wo)
    assert_close(out, ref, dt, f"{tag} forward", terms["forward"], counts["forward"],
                 rounded_operands=engine_rounds_columns(device))
    names = [k for k in DEFORM_GRADS if t[k] is not None]
    grads = torch.autograd.grad(out, [t[k] for k in names], go.to(device))
    ref_grads = torch.autograd.grad(ref, [r[k] for k in names], go.double())
    for name, a, e in zip(names, grads, ref_grads):
        assert a.dtype == dt, name
        # The input gradient of a deformable layer sums a data-dependent number of scattered
        # contributions per pixel: it keeps the norm-wise tolerance.
        bound = (terms[name], counts[name]) if name != "input" else (None, None)
        assert_close(a, e, dt, f"{tag} grad_{name}", *bound,
                     rounded_operands=name == "weight" and engine_rounds_columns(device))
    return out, grads


DEFORM_CPU = [
    deform_case(16, 16, 3, (33, 35), F32, og=2, x="cl", off="cl", mask="strided", go="cl"),
    deform_case(17, 33, 3, (25, 24), BF16, x="nchw", w="strided", off="strided", mask="cl"),
    deform_case(33, 16, 3, (20, 23), F16, og=3, x="cl", w="t", off="t", mask="nchw",
                go="strided", scale=0.7),
    deform_case(64, 64, 3, (17, 18), F32, og=4, groups=4, x="cl", off="cl", mask=None,
                go="cl", stride=2),
    deform_case(80, 40, (3, 1), (21, 19), BF16, og=2, groups=2, x="strided", off="nchw",
                mask="cl", dilation=2, scale=6.0),
    deform_case(7, 14, 3, (40, 40), F64, x="cl", w="strided", off="strided", mask="t",
                go="cl", batch=3),
]


@pytest.mark.parametrize("case", DEFORM_CPU, ids=[
    f"deform-c{c['c']}-og{c['og']}-g{c['groups']}-{c['size'][0]}x{c['size'][1]}-"
    f"{'-'.join(str(v) for v in c['layouts'].values())}-{str(c['dtype'])[6:]}"
    for c in DEFORM_CPU])
def test_deform_realistic_cpu(case):
    check_deform(case, "cpu")


# Emulated CUDA (every GPU thread is a fiber): small maps that still span two tiles or chunks,
# channel counts past one warp / 16-byte pack, channels_last and strided operands.
GPU_CASES = [
    conv_case("depthwise", 17, 17, 3, (34, 9), F32, "cl", "strided", "cl"),
    conv_case("depthwise", 33, 66, 3, (9, 10), BF16, "nchw", "t", "cl"),
    conv_case("dilated", 17, 20, 3, (12, 11), F16, "cl", "strided", "cl", dilation=2),
    deform_case(17, 8, 3, (10, 9), F32, og=1, x="cl", w="t", off="cl", mask="strided",
                go="cl"),
    deform_case(16, 16, 3, (9, 8), BF16, og=2, groups=2, x="strided", off="strided", mask="cl"),
]


@pytest.mark.parametrize("case", GPU_CASES, ids=[f"{c['op']}-{i}" for i, c in
                                                 enumerate(GPU_CASES)])
def test_realistic_gpu(case, gpu):
    check = check_deform if case["op"] == "deform" else check_conv
    names = ([k for k in DEFORM_GRADS if k != "mask" or case["layouts"]["mask"]]
             if case["op"] == "deform" else ["input", "weight", "bias"])
    check_gpu_against_cpu(check, case, gpu, names)


# --- the low-precision bound can fail ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("op", ["depthwise", "dilated"])
def test_one_dropped_term_fails_the_bound(op, dtype):
    """The kernel's correct output passes the element-wise bound; the same output with one
    product term w*x removed at one pixel fails it (a typical term: the median magnitude among
    that pixel's terms)."""
    c, oc = (33, 33) if op == "depthwise" else (16, 24)
    case = conv_case(op, c, oc, 3, (12, 13), dtype, "cl", "nchw", "nchw")
    gen = torch.Generator().manual_seed(stable_seed(case))
    x = torch.randn(2, c, 12, 13, generator=gen, dtype=F64).to(dtype)
    w = torch.randn(oc, c // case["groups"], 3, 3, generator=gen, dtype=F64).to(dtype)
    args = (1, 1, 1)
    out = (convops.depthwise_conv2d(x, w, None, *args) if op == "depthwise" else
           convops.dilated_conv2d(x, w, None, *args))
    ref = F.conv2d(x.double(), w.double(), None, *args, groups=case["groups"])
    abs_sum = F.conv2d(x.double().abs(), w.double().abs(), None, *args, groups=case["groups"])
    terms = (c // case["groups"]) * 9 + 1
    ok, message = within_lowp_bound(out, ref, abs_sum, terms, dtype)
    assert ok, message
    # Output (n=1, oc=5, y=6, x=7); its terms are w[5, ci, ky, kx] * x[1, g(5)*cg + ci, ...].
    n, o, y, xx = 1, 5, 6, 7
    cg = c // case["groups"]
    c0 = (o // (oc // case["groups"])) * cg
    patch = x.double()[n, c0:c0 + cg, y - 1:y + 2, xx - 1:xx + 2]
    products = (w.double()[o] * patch).flatten()
    term = products[products.abs().argsort()[products.numel() // 2]]
    dropped = out.double().clone()
    dropped[n, o, y, xx] = (ref[n, o, y, xx] - term).to(dtype).double()
    ok, _ = within_lowp_bound(dropped, ref, abs_sum, terms, dtype)
    assert not ok, f"dropping the term {term.item():.4g} at {(n, o, y, xx)} passed the bound"


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_one_dropped_term_fails_the_bound_deform(dtype):
    case = deform_case(16, 16, 3, (10, 11), dtype, og=2)
    gen = torch.Generator().manual_seed(stable_seed(case))
    x = torch.randn(2, 16, 10, 11, generator=gen, dtype=F64).to(dtype)
    off = (torch.randn(2, 36, 10, 11, generator=gen, dtype=F64) * 2).to(dtype)
    mask = torch.rand(2, 18, 10, 11, generator=gen, dtype=F64).to(dtype)
    w = torch.randn(16, 16, 3, 3, generator=gen, dtype=F64).to(dtype)
    out = convops.deform_conv2d(x, off, w, None, 1, 1, 1, mask)
    ref = deform_reference(x, off, w, None, (1, 1), (1, 1), (1, 1), mask)
    terms = deform_abs_terms(x, off, w, None, (1, 1), (1, 1), (1, 1), mask,
                             torch.ones_like(ref))
    count = 4 * 16 * 9 + 4 * (11 + 2)
    ok, message = within_lowp_bound(out, ref, terms["forward"], count, dtype)
    assert ok, message
    # One (channel, tap) term of output (1, 3, 4, 5): weight * mask * bilinear sample, taken
    # from the reference with every other weight zeroed.
    n, o, y, xx = 1, 3, 4, 5
    per_term = []
    for ci in range(16):
        for tap in range(9):
            w1 = torch.zeros_like(w, dtype=F64)
            w1[o, ci, tap // 3, tap % 3] = w[o, ci, tap // 3, tap % 3].double()
            per_term.append(deform_reference(x[n:n + 1], off[n:n + 1], w1, None, (1, 1),
                                             (1, 1), (1, 1), mask[n:n + 1])[0, o, y, xx])
    per_term = torch.stack(per_term)
    term = per_term[per_term.abs().argsort()[per_term.numel() // 2]]
    dropped = out.double().clone()
    dropped[n, o, y, xx] = (ref[n, o, y, xx] - term).to(dtype).double()
    ok, _ = within_lowp_bound(dropped, ref, terms["forward"], count, dtype)
    assert not ok, f"dropping the term {term.item():.4g} passed the bound"


def test_dtype_grid_is_covered():
    # Every dtype appears in every op's CPU grid (the grids are hand-picked, so check it).
    for grid in (DEPTHWISE_CPU, DILATED_CPU, DEFORM_CPU):
        assert {c["dtype"] for c in grid} == set(DTYPES)
