"""deform_conv2d: against torchvision and a pure-PyTorch reference, properties, modules, errors."""
import random

import pytest
import torch
import torch.nn.functional as F
import torchvision

import convops
from conftest import (DTYPES, assert_close, check_gpu_against_cpu, engine_rounds_columns,
                      requires_cuda, stable_seed)
from reference import deform_abs_terms
from reference import deform_conv2d as reference

def _grid(count, seed):
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        groups = rng.choice([1, 1, 2, 4])
        og = rng.choice([1, 1, 2, 4])
        kernel = (rng.choice([1, 2, 3]), rng.choice([1, 3, 4]))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        size = tuple(d * (k - 1) + 1 + rng.randint(0, 6) for d, k in zip(dilation, kernel))
        cases.append(dict(
            batch=rng.randint(1, 2), channels=4 * rng.randint(1, 2), out_per_group=rng.randint(1, 3),
            groups=groups, og=og, kernel=kernel,
            stride=(rng.randint(1, 2), rng.randint(1, 3)),
            padding=(rng.randint(0, 2), rng.randint(0, 2)),
            dilation=dilation, size=size, mask=rng.random() < 0.6,
            bias=rng.random() < 0.6, offset_scale=rng.choice([0.7, 3.0, 12.0]),
            channels_last=rng.random() < 0.4, dtype=DTYPES[i % 4]))
    return cases


def _inputs(case, device="cpu", dtype=None):
    dtype = dtype or case["dtype"]
    g = torch.Generator().manual_seed(stable_seed(case))
    C, groups, og = case["channels"], case["groups"], case["og"]
    kh, kw = case["kernel"]
    H, W = case["size"]
    (sh, sw), (ph, pw), (dh, dw) = case["stride"], case["padding"], case["dilation"]
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    oc = groups * case["out_per_group"]
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)  # noqa
    x = mk(case["batch"], C, H, W)
    if case["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    tensors = {
        "input": x,
        "offset": mk(case["batch"], 2 * og * kh * kw, Ho, Wo, scale=case["offset_scale"]),
        "weight": mk(oc, C // groups, kh, kw),
        "mask": torch.rand(case["batch"], og * kh * kw, Ho, Wo, generator=g,
                           dtype=torch.float64) if case["mask"] else None,
        "bias": mk(oc) if case["bias"] else None,
    }
    return {k: (v.to(device=device, dtype=dtype) if v is not None else None)
            for k, v in tensors.items()}


def _call(fn, t, case):
    return fn(t["input"], t["offset"], t["weight"], t["bias"], case["stride"], case["padding"],
              case["dilation"], mask=t["mask"])


GRAD_NAMES = ("input", "offset", "weight", "mask", "bias")


def _check(case, device, against):
    """Forward and every gradient against `against` in float64; returns (out, grads)."""
    t = _inputs(case, device)
    leaves = {k: v.detach().requires_grad_() for k, v in t.items() if v is not None}
    t = dict(t, **leaves)
    out = _call(convops.deform_conv2d, t, case)
    ref_t = {k: (v.detach().double().cpu().requires_grad_() if v is not None else None)
             for k, v in t.items()}
    ref = _call(against, ref_t, case)
    tag = f"[seed {stable_seed(case)} case {case}]"
    assert out.dtype == case["dtype"]
    if case["channels_last"]:
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(stable_seed(case, 1)),
                       dtype=torch.float64).to(case["dtype"])
    # Sums of |terms| and term counts for conftest's element-wise float16/bfloat16 bound (the
    # input gradient, a data-dependent scatter, keeps the norm-wise tolerance).
    abs_terms = deform_abs_terms(ref_t["input"], ref_t["offset"], ref_t["weight"],
                                 ref_t["bias"], case["stride"], case["padding"],
                                 case["dilation"], ref_t["mask"], grad)
    (kh, kw), (H, W), N = case["kernel"], case["size"], case["batch"]
    Ho, Wo = ref.shape[2:]
    cg, ocg = case["channels"] // case["groups"], case["out_per_group"]
    cpo, pos = case["channels"] // case["og"], 4 * (max(H, W) + 2)
    counts = dict(forward=4 * cg * kh * kw + pos, weight=N * Ho * Wo + 4 + pos,
                  mask=ocg + 4 * cpo + pos, offset=ocg + 4 * cpo + pos, bias=N * Ho * Wo)
    assert_close(out, ref, case["dtype"], f"{tag} forward", abs_terms["forward"],
                 counts["forward"],
                 rounded_operands=engine_rounds_columns(device))
    names = [k for k in GRAD_NAMES if t[k] is not None]
    grads = torch.autograd.grad(out, [t[k] for k in names], grad.to(device))
    ref_grads = torch.autograd.grad(ref, [ref_t[k] for k in names], grad.double())
    for name, a, e in zip(names, grads, ref_grads):
        assert a.dtype == case["dtype"], name
        bound = (abs_terms[name], counts[name]) if name != "input" else (None, None)
        assert_close(a, e, case["dtype"], f"{tag} grad_{name}", *bound,
                     rounded_operands=name == "weight" and engine_rounds_columns(device))
    return out, grads


def _torchvision(input, offset, weight, bias, stride, padding, dilation, mask=None):
    return torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation,
                                         mask)


@pytest.mark.parametrize("case", [c for c in _grid(60, seed=3)
                                  if c["dtype"] in (torch.float64, torch.float32)], ids=str)
def test_matches_torchvision_cpu(case):
    _check(case, "cpu", _torchvision)


@pytest.mark.parametrize("case", _grid(24, seed=4), ids=str)
def test_matches_pure_pytorch_reference(case):
    _check(case, "cpu", reference)


def _check_gpu(case, gpu):
    names = [k for k in GRAD_NAMES if k in ("input", "offset", "weight") or case[k]]
    check_gpu_against_cpu(lambda c, device: _check(c, device, reference), case, gpu, names)


# Larger than the grid's maps: several warps of pixels per chunk, channel counts past a warp.
LARGE_CASES = [
    dict(batch=2, channels=33, out_per_group=5, groups=1, og=3, kernel=(3, 3), stride=(1, 1),
         padding=(1, 1), dilation=(1, 1), size=(21, 19), mask=True, bias=True,
         offset_scale=3.0, channels_last=True, dtype=torch.float32),
    dict(batch=2, channels=16, out_per_group=3, groups=4, og=2, kernel=(3, 2), stride=(2, 1),
         padding=(2, 1), dilation=(2, 1), size=(25, 14), mask=False, bias=False,
         offset_scale=0.7, channels_last=False, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", _grid(40, seed=5) + LARGE_CASES, ids=str)
def test_matches_reference_gpu(case, deterministic_mode, gpu):
    _check_gpu(case, gpu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_cpu(dtype, gpu):
    case = _grid(1, seed=6)[0] | {"dtype": dtype, "mask": True, "bias": True}
    t = _inputs(case, "cpu")
    with gpu.native_cpu():
        cpu = _call(convops.deform_conv2d, t, case)
    out = _call(convops.deform_conv2d, {k: v.to(gpu.device) if v is not None else None
                                        for k, v in t.items()}, case)
    assert_close(out, cpu.double(), dtype, "gpu vs cpu")


def chunks_per_image(case, budget):
    """Column chunks per image of the gather engine (CPU and CUDA) under CONVOPS_COLUMN_BUDGET."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (case["kernel"], case["stride"], case["padding"],
                                              case["dilation"])
    H, W = case["size"]
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return -(-Ho * Wo // max(1, int(budget) // (case["channels"] * kh * kw)))


def _chunked(cases, budgets):
    """(case, budget) pairs whose budget splits every image into >= 2 chunks."""
    return [pytest.param(c, b, id=f"{b}-{c}") for c in cases for b in budgets
            if chunks_per_image(c, b) >= 2]


@pytest.mark.parametrize("case,budget", _chunked(_grid(4, seed=15), ["1", "50", "700"]))
def test_small_column_chunks_gpu(case, budget, deterministic_mode, gpu, monkeypatch):
    # Several chunks per image in the plain CUDA engine (the implicit-GEMM engine has no
    # columns), starting and ending mid-row; the emulator's launch counts show them (one
    # im2col per chunk, forward and weight gradient).
    from convops import emulator
    monkeypatch.setenv("CONVOPS_CUDA_IMPL", "plain")
    monkeypatch.setenv("CONVOPS_COLUMN_BUDGET", budget)
    before = emulator.launch_counts().get("gather_im2col", 0)
    _check_gpu(case, gpu)
    if gpu.emulated:
        ran = emulator.launch_counts().get("gather_im2col", 0) - before
        assert ran >= case["batch"] * chunks_per_image(case, budget), ran


@pytest.mark.parametrize("case,budget", _chunked(_grid(10, seed=14), ["1", "50", "700"]))
def test_small_column_chunks(case, budget, monkeypatch):
    from convops import _C
    monkeypatch.setenv("CONVOPS_COLUMN_BUDGET", budget)
    before = _C.cpu_path_counts()
    _check(case, "cpu", _torchvision if case["dtype"] in (torch.float32, torch.float64)
           else reference)
    after = _C.cpu_path_counts()
    for key in ("engine_forward_chunks", "engine_backward_chunks"):
        ran = after.get(key, 0) - before.get(key, 0)
        assert ran == case["batch"] * chunks_per_image(case, budget), (key, ran)


def test_zero_offsets_and_unit_mask_equal_conv2d():
    x = torch.randn(2, 8, 11, 12, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    off = torch.zeros(2, 2 * 2 * 9, 6, 12, dtype=torch.float64)
    mask = torch.ones(2, 2 * 9, 6, 12, dtype=torch.float64)
    out = convops.deform_conv2d(x, off, w, b, (2, 1), (1, 1), (1, 1), mask)
    assert_close(out, F.conv2d(x, w, b, (2, 1), (1, 1), (1, 1), groups=2), torch.float64, "conv")


def test_integer_offsets_equal_a_shifted_conv():
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    off = torch.zeros(1, 18, 8, 8, dtype=torch.float64)
    off[:, 0::2] = 1.0   # every tap one row down
    off[:, 1::2] = -2.0  # and two columns left
    out = convops.deform_conv2d(x, off, w)
    shifted = F.pad(x, (2, 0, 0, 1))[:, :, 1:, :-2]  # x[y + 1, x - 2], zero outside
    assert_close(out, F.conv2d(shifted, w), torch.float64, "shifted")


@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck(with_mask):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    # Keep sample points away from integer grid lines, where bilinear has kinks.
    off = (torch.randint(-3, 4, (1, 2 * 2 * 6, 5, 7)).double() +
           0.2 + 0.6 * torch.rand(1, 24, 5, 7, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(1, 12, 5, 7, dtype=torch.float64, requires_grad=True) if with_mask else None
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(x, off, w, b, *m):
        return convops.deform_conv2d(x, off, w, b, (1, 1), (0, 1), (1, 1), m[0] if m else None)
    args = (x, off, w, b) + ((mask,) if with_mask else ())
    assert torch.autograd.gradcheck(fn, args)


def _op_samples():
    x = torch.randn(2, 4, 7, 8, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    off = torch.randn(2, 2 * 2 * 9, 7, 8, requires_grad=True)
    mask = torch.rand(2, 18, 7, 8, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    xcl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    return [(x, w, off, mask, b, [1, 1], [1, 1], [1, 1]),
            (xcl, w, off, None, None, [1, 1], [1, 1], [1, 1])]


def test_opcheck():
    for args in _op_samples():
        torch.library.opcheck(torch.ops.convops.deform_conv2d.default, args)
        out = torch.ops.convops.deform_conv2d(*args)
        go = torch.randn_like(out)
        x, w, off, mask, b, s, p, d = [a.detach() if isinstance(a, torch.Tensor) else a
                                       for a in args]
        for output_mask in ([True] * 5, [False, True, False, False, True],
                            [True, False, True, True, False]):
            torch.library.opcheck(torch.ops.convops.deform_conv2d_backward.default,
                                  (go, x, w, off, mask, s, p, d, output_mask))


def test_torch_compile_fullgraph_and_export():
    torch._dynamo.reset()
    model = convops.ModulatedDeformConv2dPack(4, 6, 3, padding=1)
    torch.nn.init.normal_(model.conv_offset.weight, std=0.1)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x), model(x)
    assert_close(out, ref.double(), torch.float32, "compiled")
    (g,) = torch.autograd.grad(out.sum(), x)
    (rg,) = torch.autograd.grad(ref.sum(), x)
    assert_close(g, rg.double(), torch.float32, "compiled backward")
    exported = torch.export.export(model.eval(), (x.detach(),))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "convops.deform_conv2d.default" in targets
    assert_close(exported.module()(x.detach()), model(x.detach()).double(), torch.float32, "export")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_native_and_matches_fp32(dtype):
    # Under autocast the op runs natively in the autocast dtype: the result must equal the
    # float64 reference of the dtype-rounded operands within the element-wise bound.
    from conftest import within_lowp_bound
    from reference import deform_abs_terms
    m = convops.DeformConv2d(16, 8, 3, padding=1)
    x, off = torch.randn(2, 16, 9, 10), torch.randn(2, 18, 9, 10) * 2
    mask = torch.rand(2, 9, 9, 10)
    with torch.autocast("cpu", dtype=dtype):
        out = m(x, off, mask)
    assert out.dtype == dtype
    r = [t.detach().to(dtype).double() for t in (x, off, m.weight, m.bias, mask)]
    ref = reference(r[0], r[1], r[2], r[3], (1, 1), (1, 1), (1, 1), r[4])
    terms = deform_abs_terms(r[0], r[1], r[2], r[3], (1, 1), (1, 1), (1, 1), r[4],
                             torch.ones_like(ref))
    ok, message = within_lowp_bound(out, ref, terms["forward"], 4 * 16 * 9 + 4 * 12, dtype)
    assert ok, message
    out.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and torch.isfinite(m.weight.grad).all()


def test_backward_is_deterministic():
    case = _grid(1, seed=7)[0] | {"dtype": torch.float32, "mask": True, "bias": True}
    t = _inputs(case)
    leaves = {k: v.requires_grad_() for k, v in t.items() if v is not None}
    results = []
    for _ in range(2):
        out = _call(convops.deform_conv2d, t, case)
        results.append(torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dy,dx", [(-1.0, 0.3), (0.5, -1.0), (1.0, 0.0), (-1.0, -1.0), (2.0, 5.0),
                                   (-1.5, 0.3), (0.2, -1.7), (6.5, 0.2), (-1.0, 6.0)])
def test_offsets_on_grid_lines_and_borders_match_torchvision(dy, dx):
    # Integer offsets put samples exactly on grid lines and on y = -1 / x = -1, where the
    # bilinear slope is one-sided: torchvision's convention is the reference.
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    off = torch.zeros(1, 18, 4, 4, dtype=torch.float64)
    off[:, 0::2], off[:, 1::2] = dy, dx
    mask = torch.rand(1, 9, 4, 4, dtype=torch.float64)
    leaves = [x, off.requires_grad_(), w, mask.requires_grad_()]
    ours = convops.deform_conv2d(x, off, w, mask=mask)
    theirs = torchvision.ops.deform_conv2d(x, off, w, mask=mask)
    assert_close(ours, theirs, torch.float64, "forward")
    g = torch.randn_like(ours)
    for name, a, e in zip(["input", "offset", "weight", "mask"],
                          torch.autograd.grad(ours, leaves, g),
                          torch.autograd.grad(theirs, leaves, g)):
        assert_close(a, e, torch.float64, f"grad_{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_inf_and_huge_offsets_match_the_reference(dtype):
    # The semantics (README): a sample point whose offset is NaN, +-Inf or so large that it
    # lies outside the image reads nothing: its value is zero, and it adds nothing to any
    # gradient, its own offset and mask gradients included (all zero). The reference
    # (reference.bilinear_gather) implements exactly that; compare element-wise, NaN
    # positions included, for the forward and every gradient.
    g = torch.Generator().manual_seed(stable_seed("nan-offsets", str(dtype)))
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64).to(dtype)
    off = torch.randn(2, 18, 5, 4, generator=g, dtype=torch.float64).to(dtype)
    specials = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9, -2.5]
    for i, v in enumerate(specials):  # y or x of several taps, pixels and images
        off[i % 2, (5 * i) % 18, i % 5, (3 * i) % 4] = v
    off[1, :, 2, 1] = float("nan")  # every tap of one pixel
    mask = torch.rand(2, 9, 5, 4, generator=g, dtype=torch.float64).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, off, w, mask)]
    out = convops.deform_conv2d(leaves[0], leaves[1], leaves[2], None, 1, 0, 1, leaves[3])
    refs = [t.clone().double().requires_grad_() for t in (x, off, w, mask)]
    ref = reference(refs[0], refs[1], refs[2], None, (1, 1), (0, 0), (1, 1), refs[3])
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    names = ["forward", "input", "offset", "weight", "mask"]
    got = [out] + list(torch.autograd.grad(out, leaves, go.to(dtype)))
    want = [ref] + list(torch.autograd.grad(ref, refs, go))
    for name, a, e in zip(names, got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{name}: NaN positions differ"
        assert_close(a, e, dtype, name)
    # The special offsets' own gradients, and the all-NaN pixel's output (bias-free), are 0.
    for i, v in enumerate(specials[:-1]):
        at = (i % 2, (5 * i) % 18, i % 5, (3 * i) % 4)
        assert got[2][at] == 0, (v, at)
    assert (got[0][1, :, 2, 1] == 0).all() and (got[4][1, :, 2, 1] == 0).all()


def test_empty_batch():
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    off = torch.randn(0, 18, 4, 4, requires_grad=True)
    out = convops.deform_conv2d(x, off, w)
    assert out.shape == (0, 4, 4, 4)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


# --- modules ----------------------------------------------------------------------------------

def test_deformconv2d_state_dict_round_trips_with_torchvision():
    ours = convops.DeformConv2d(4, 6, 3, stride=1, padding=1, groups=2)
    theirs = torchvision.ops.DeformConv2d(4, 6, 3, stride=1, padding=1, groups=2)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x, off = torch.randn(2, 4, 8, 8), torch.randn(2, 18, 8, 8)
    assert_close(ours(x, off), theirs(x, off).double(), torch.float32, "module")
    mask = torch.rand(2, 9, 8, 8)
    assert_close(ours(x, off, mask), theirs(x, off, mask).double(), torch.float32, "masked")


def test_mmcv_pack_modules():
    m = convops.ModulatedDeformConv2dPack(4, 8, 3, stride=1, padding=1, deform_groups=2)
    assert m.conv_offset.out_channels == 3 * 2 * 9
    assert set(m.state_dict()) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}
    assert torch.count_nonzero(m.conv_offset.weight) == 0  # zero-initialized
    x = torch.randn(2, 4, 7, 7)
    # Zero offsets and sigmoid(0) = 0.5 masks: half a plain convolution.
    assert_close(m(x), 0.5 * F.conv2d(x, m.weight, None, 1, 1).double() +
                 m.bias.view(1, -1, 1, 1).double(), torch.float32, "zero-init pack")
    torch.nn.init.normal_(m.conv_offset.weight, std=0.3)
    raw = m.conv_offset(x)
    offset, mask = raw[:, :36], torch.sigmoid(raw[:, 36:])
    expected = torchvision.ops.deform_conv2d(x, offset, m.weight, m.bias, 1, 1, 1, mask)
    assert_close(m(x), expected.double(), torch.float32, "pack")

    v1 = convops.DeformConv2dPack(4, 8, (3, 1), padding=(1, 0))
    assert v1.bias is None and v1.conv_offset.out_channels == 2 * 3
    assert set(v1.state_dict()) == {"weight", "conv_offset.weight", "conv_offset.bias"}
    assert_close(v1(x), F.conv2d(x, v1.weight, None, 1, (1, 0)).double(), torch.float32, "v1")

    mod = convops.ModulatedDeformConv2d(4, 8, 3, padding=1, deform_groups=2)
    mod.load_state_dict({k: v for k, v in m.state_dict().items() if "conv_offset" not in k})
    assert_close(mod(x, offset, mask), expected.double(), torch.float32, "modulated")


def test_mmcv_checkpoint_keys_load_as_is():
    # An mmcv DCNv2 layer's checkpoint: exactly these keys and shapes.
    ckpt = {"weight": torch.randn(16, 8, 3, 3), "bias": torch.randn(16),
            "conv_offset.weight": torch.randn(27, 8, 3, 3), "conv_offset.bias": torch.randn(27)}
    m = convops.ModulatedDeformConv2dPack(8, 16, 3, padding=1)
    m.load_state_dict(ckpt)  # strict
    assert torch.equal(m.conv_offset.bias, ckpt["conv_offset.bias"])


# --- errors -----------------------------------------------------------------------------------

def _ok():
    return dict(input=torch.randn(2, 4, 8, 8), offset=torch.randn(2, 18, 8, 8),
                weight=torch.randn(6, 4, 3, 3), bias=torch.randn(6), padding=(1, 1),
                mask=torch.rand(2, 9, 8, 8))


ERROR_CASES = [
    ("offset", ValueError, dict(offset=torch.randn(2, 17, 8, 8))),
    ("offset", ValueError, dict(offset=torch.randn(2, 18, 7, 8))),
    ("offset", ValueError, dict(offset=torch.randn(1, 18, 8, 8))),
    ("mask", ValueError, dict(mask=torch.rand(2, 8, 8, 8))),
    ("mask", ValueError, dict(mask=torch.rand(2, 9, 8, 7))),
    ("mask", ValueError, dict(mask=torch.rand(3, 9, 8, 8))),
    ("weight", ValueError, dict(weight=torch.randn(6, 3, 3, 3))),
    ("groups", ValueError, dict(weight=torch.randn(5, 2, 3, 3))),
    ("offset_groups", ValueError, dict(offset=torch.randn(2, 18 * 3, 8, 8))),
    ("bias", ValueError, dict(bias=torch.randn(5))),
    ("offset dtype", TypeError, dict(offset=torch.randn(2, 18, 8, 8, dtype=torch.float64))),
    ("mask dtype", TypeError, dict(mask=torch.rand(2, 9, 8, 8).half())),
    ("stride", ValueError, dict(stride=0)),
    ("dilation", ValueError, dict(dilation=(1, 0))),
    ("padding", ValueError, dict(padding=-1)),
    ("output size", ValueError, dict(padding=0, input=torch.randn(2, 4, 2, 8),
                                     offset=torch.randn(2, 18, 1, 6), mask=None)),
    ("input", ValueError, dict(input=torch.randn(4, 8, 8))),
    ("input", TypeError, dict(input=torch.randn(2, 4, 8, 8).long())),
]


@pytest.mark.parametrize("name,exc,change", ERROR_CASES,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(ERROR_CASES)])
def test_bad_arguments_raise_clear_errors(name, exc, change):
    args = _ok() | change
    with pytest.raises(exc, match=name.split()[0]):
        convops.deform_conv2d(args["input"], args["offset"], args["weight"], args["bias"],
                              args.get("stride", 1), args["padding"], args.get("dilation", 1),
                              args["mask"])


@requires_cuda
def test_device_mismatch_is_caught():
    a = _ok()
    with pytest.raises(ValueError, match="offset"):
        convops.deform_conv2d(a["input"].cuda(), a["offset"], a["weight"].cuda(), padding=1)
