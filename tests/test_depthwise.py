"""depthwise_conv2d: values and gradients against F.conv2d(groups=C), properties, errors."""
import contextlib
import functools
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convops
from conftest import (DTYPES, HAS_CUDA, assert_close, check_gpu_against_cpu, env_set,
                      requires_cuda, stable_seed)
from reference import conv_abs_terms
from reference import depthwise_conv2d as reference

def _grid(count, seed):
    """A reproducible random sample of the configuration space (the full product is huge)."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        kh = rng.choice([1, 2, 3, 4, 5, 7, 9, 13, 31]) if i % 7 else rng.choice([1, 31])
        kw = kh if rng.random() < 0.6 else rng.choice([1, 2, 3, 5, 6, 7])
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.randint(1, 3), rng.randint(1, 3))
        padding = rng.choice([0, 1, 2, (kh // 2, kw // 2), (0, 3), "same", "valid"])
        if padding == "same":
            stride = (1, 1)
        cases.append(dict(
            channels=rng.randint(1, 6), multiplier=rng.randint(1, 3), kernel=(kh, kw),
            stride=stride, dilation=dilation, padding=padding,
            batch=rng.randint(1, 3), bias=rng.random() < 0.7,
            channels_last=rng.random() < 0.5, dtype=DTYPES[i % 4]))
    return cases


def _inputs(case, device, dtype=None, requires_grad=True):
    """Inputs drawn from a generator seeded by the case: the same in every process and call."""
    dtype = dtype or case["dtype"]
    g = torch.Generator().manual_seed(stable_seed(case))
    kh, kw = case["kernel"]
    dh, dw = case["dilation"]
    size_h, size_w = case.get("size") or (
        max(dh * (kh - 1) + 1, 1) + random.Random(kh * 31 + kw).randint(0, 9),
        max(dw * (kw - 1) + 1, 1) + random.Random(kh * 17 + kw).randint(0, 11))
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(  # noqa: E731
        device=device, dtype=dtype)
    x = rand(case["batch"], case["channels"], size_h, size_w)
    if case["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    oc = case["channels"] * case["multiplier"]
    w = rand(oc, 1, kh, kw)
    b = rand(oc) if case["bias"] else None
    tensors = [t for t in (x, w, b) if t is not None]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return x, w, b


def _check_against_reference(case, device):
    """Checks forward and every gradient against the float64 reference; returns them."""
    x, w, b = _inputs(case, device)
    args = (case["stride"], case["padding"], case["dilation"])
    out = convops.depthwise_conv2d(x, w, b, *args)
    leaves = [t for t in (x, w, b) if t is not None]
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    rx, rw = ref_leaves[0], ref_leaves[1]
    rb = ref_leaves[2] if b is not None else None
    ref = reference(rx, rw, rb, *args)
    tag = f"[seed {stable_seed(case)} case {case}]"
    assert out.dtype == x.dtype and out.device == x.device
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(stable_seed(case, 1)),
                       dtype=torch.float64).to(x.dtype)
    # Sums of |terms| for conftest's element-wise float16/bfloat16 bound.
    abs_out, abs_grads = conv_abs_terms(
        lambda *t: reference(t[0], t[1], t[2] if len(t) > 2 else None, *args), ref_leaves, grad)
    kh, kw = case["kernel"]
    N, (Ho, Wo) = case["batch"], ref.shape[2:]
    terms = [case["multiplier"] * kh * kw, N * Ho * Wo, N * Ho * Wo]
    assert_close(out, ref, case["dtype"], f"{tag} forward", abs_out, kh * kw + 1)
    if case["channels_last"] and out.dim() == 4:
        assert out.is_contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(out, leaves, grad.to(device=device))
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    for name, g, rg, s, n in zip(["input", "weight", "bias"], grads, ref_grads, abs_grads, terms):
        assert g.dtype == x.dtype
        assert_close(g, rg, case["dtype"], f"{tag} grad_{name}", s, n)
    return out, grads


@pytest.mark.parametrize("case", _grid(160, seed=1), ids=lambda c: (
    f"k{c['kernel']}-s{c['stride']}-d{c['dilation']}-p{c['padding']}-m{c['multiplier']}-"
    f"{'cl' if c['channels_last'] else 'nchw'}-{str(c['dtype'])[6:]}").replace(" ", ""))
def test_matches_conv2d_cpu(case):
    _check_against_reference(case, "cpu")


# --- CPU forward kernels (csrc/cpu/depthwise_forward.h): float32 and bfloat16, per ISA build ---
CPU_ISAS = ["avx512", "avx2", "baseline"]
_ISA_LANES = {"avx512": 16, "avx2": 8, "baseline": 4}
_ISA_FLAGS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
              "avx2": {"avx2", "fma", "f16c", "bmi2"}, "baseline": set()}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _require_isa(isa):
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the vectorized CPU forward is built for x86-64 only")
    missing = _ISA_FLAGS[isa] - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {isa} ({', '.join(sorted(missing))})")
    if not _isa_built(isa):
        pytest.skip(f"this build leaves out the {isa} forward (a sanitized build: setup.py)")


@functools.lru_cache(maxsize=None)
def _isa_built(isa):
    """Whether the forward runs the `isa` build when CONVOPS_CPU_ISA asks for it."""
    with env_set("CONVOPS_CPU_ISA", isa):
        convops.depthwise_conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3), None, 1, 1)
        return _last_forward_path() == "nchw/" + isa


def _last_forward_path():
    return torch.ops.convops_cpu_debug.depthwise_forward_last_path()


def _forward_cases():
    """Hand-picked borders and tails, then a seeded sample: channel counts of several vectors
    and tails (1, 7, 16, 17, 33, 64, 80), widths that the register block does not divide,
    multipliers 1-3, strides 1-3, dilation, padding wider than the kernel's reach (outputs
    with no valid tap), maps of several NCHW row strips, batch 2."""
    f32, bf16 = torch.float32, torch.bfloat16
    cases = [
        dict(channels=17, multiplier=1, kernel=(3, 3), stride=(1, 1), dilation=(1, 1),
             padding=1, batch=2, bias=True, dtype=f32, size=(20, 37)),
        dict(channels=33, multiplier=1, kernel=(5, 5), stride=(2, 2), dilation=(1, 1),
             padding=2, batch=2, bias=False, dtype=bf16, size=(23, 29)),
        dict(channels=80, multiplier=1, kernel=(7, 7), stride=(1, 1), dilation=(1, 1),
             padding=3, batch=2, bias=True, dtype=bf16, size=(14, 14)),
        dict(channels=64, multiplier=1, kernel=(3, 3), stride=(3, 3), dilation=(2, 2),
             padding=5, batch=2, bias=True, dtype=f32, size=(11, 13)),
        dict(channels=7, multiplier=2, kernel=(3, 3), stride=(2, 1), dilation=(1, 1),
             padding=1, batch=2, bias=True, dtype=f32, size=(15, 19)),
        dict(channels=16, multiplier=3, kernel=(5, 5), stride=(1, 1), dilation=(2, 2),
             padding=4, batch=2, bias=True, dtype=bf16, size=(17, 21)),
        dict(channels=1, multiplier=1, kernel=(3, 3), stride=(1, 1), dilation=(1, 1),
             padding=1, batch=2, bias=True, dtype=f32, size=(9, 10)),
        dict(channels=16, multiplier=1, kernel=(31, 31), stride=(1, 1), dilation=(1, 1),
             padding=15, batch=2, bias=True, dtype=f32, size=(34, 45)),
        dict(channels=24, multiplier=1, kernel=(27, 27), stride=(1, 1), dilation=(1, 1),
             padding=13, batch=2, bias=False, dtype=bf16, size=(14, 14)),
        dict(channels=17, multiplier=1, kernel=(1, 5), stride=(1, 2), dilation=(1, 3),
             padding=(0, 6), batch=2, bias=True, dtype=bf16, size=(12, 40)),
        dict(channels=9, multiplier=1, kernel=(5, 1), stride=(3, 1), dilation=(2, 1),
             padding=(4, 0), batch=2, bias=False, dtype=f32, size=(30, 9)),
        # stride 2, interior of 6 pixels: too narrow for the wide blocks, so the held-weight 3x3
        # blocks run, the last one shifted
        dict(channels=19, multiplier=1, kernel=(3, 3), stride=(2, 2), dilation=(1, 1),
             padding=1, batch=2, bias=True, dtype=f32, size=(13, 14)),
        # dilated stride-1 rows slide in runs of one block per phase (the last run shifted)
        dict(channels=37, multiplier=1, kernel=(3, 3), stride=(1, 1), dilation=(4, 4),
             padding=4, batch=2, bias=True, dtype=f32, size=(21, 45)),
        dict(channels=20, multiplier=1, kernel=(5, 5), stride=(1, 1), dilation=(2, 3),
             padding=(4, 5), batch=2, bias=False, dtype=bf16, size=(19, 39)),
        # 7-wide output rows (7x7 maps of MobileNet / EfficientNet's last stages) run as one
        # sliding block of 7 pixels per channel vector, borders on both sides
        dict(channels=80, multiplier=1, kernel=(3, 3), stride=(1, 1), dilation=(1, 1),
             padding=1, batch=2, bias=True, dtype=f32, size=(7, 7)),
        dict(channels=37, multiplier=1, kernel=(5, 5), stride=(1, 1), dilation=(1, 1),
             padding=2, batch=2, bias=False, dtype=bf16, size=(8, 7)),
        dict(channels=33, multiplier=1, kernel=(7, 7), stride=(1, 1), dilation=(1, 1),
             padding=3, batch=2, bias=True, dtype=f32, size=(7, 7)),
        # one channel block, batch 1: the NCHW rows are split into strips with a halo
        dict(channels=16, multiplier=1, kernel=(3, 3), stride=(1, 1), dilation=(3, 3),
             padding=3, batch=1, bias=True, dtype=f32, size=(61, 50)),
        dict(channels=8, multiplier=1, kernel=(5, 5), stride=(2, 2), dilation=(1, 1),
             padding=2, batch=1, bias=True, dtype=bf16, size=(64, 48)),
    ]
    rng = random.Random(14)
    for i in range(36):
        k = rng.choice([1, 2, 3, 5, 7])
        kh, kw = (k, k) if rng.random() < 0.7 else (k, rng.choice([1, 3, 4]))
        dil = (rng.randint(1, 3), rng.randint(1, 3))
        pad = rng.choice([0, (kh // 2, kw // 2), (kh, kw + 1), "same"])
        stride = (1, 1) if pad == "same" else (rng.randint(1, 3), rng.randint(1, 3))
        h = dil[0] * (kh - 1) + 1 + rng.randint(0, 20)
        w = dil[1] * (kw - 1) + 1 + rng.randint(0, 30)
        cases.append(dict(channels=rng.choice([1, 7, 16, 17, 33, 64, 80]),
                          multiplier=rng.choice([1, 1, 2, 3]), kernel=(kh, kw), stride=stride,
                          dilation=dil, padding=pad, batch=rng.randint(1, 2),
                          bias=rng.random() < 0.7, dtype=(f32, bf16)[i % 2], size=(h, w)))
    return [dict(c, channels_last=cl) for c in cases for cl in (False, True)]


FORWARD_CASES = _forward_cases()


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: (
    f"C{c['channels']}x{c['multiplier']}-k{c['kernel']}-s{c['stride']}-d{c['dilation']}-"
    f"p{c['padding']}-{c['size']}-{'cl' if c['channels_last'] else 'nchw'}-"
    f"{str(c['dtype'])[6:]}").replace(" ", ""))
def test_vectorized_forward_cpu(case, isa, monkeypatch):
    _require_isa(isa)
    from convops import _C
    monkeypatch.setenv("CONVOPS_CPU_ISA", isa)
    x, w, b = _inputs(case, "cpu", requires_grad=False)
    args = (case["stride"], case["padding"], case["dilation"])
    seven_key = "depthwise_forward_seven_wide:" + isa
    seven_before = _C.cpu_path_counts().get(seven_key, 0)
    out = convops.depthwise_conv2d(x, w, b, *args)
    cl = case["channels_last"]
    # NHWC with a channel multiplier stays on the generic kernels
    expected = "generic" if cl and case["multiplier"] > 1 else _vector_layout(case, isa) + "/" + isa
    path = _last_forward_path()
    # in place, some rows take channel vectors in pairs (test_vectorized_forward_nhwc_pairs)
    assert path == expected or (expected == "nhwc/" + isa and path == "nhwc-pairs/" + isa)
    # 7-wide stride-1 rows of 3/5/7-wide filters slide as one block of 7 pixels
    seven = (path != "generic" and out.shape[-1] == 7 and case["stride"][1] == 1
             and case["dilation"][1] == 1 and case["kernel"][1] in (3, 5, 7))
    assert _C.cpu_path_counts().get(seven_key, 0) - seven_before == int(seven)
    ref = reference(x.double(), w.double(), b.double() if b is not None else None, *args)
    assert_close(out, ref, case["dtype"], f"forward, {isa}, seed {stable_seed(case)}")
    if cl:
        assert out.is_contiguous(memory_format=torch.channels_last)


def _vector_layout(case, isa):
    """The vectorized forward's layout path (the rule in cpu/depthwise_conv2d.cpp). NHWC runs on
    the row ring, else in place: with AVX-512 for stride-1 filters 9 or more rows tall (dilated
    or not); on narrower ISAs for bf16, and for undilated stride-1 filters 7 or more rows tall."""
    if not case["channels_last"]:
        return "nchw"
    stride1 = case["stride"][0] == 1
    if isa == "avx512":
        ring = stride1 and case["kernel"][0] >= 9
    else:
        ring = case["dtype"] == torch.bfloat16 or (stride1 and case["dilation"][0] == 1 and
                                                   case["kernel"][0] >= 7)
    return "nhwc-ring" if ring else "nhwc"


NHWC_CASES = [c for c in FORWARD_CASES if c["channels_last"] and c["multiplier"] == 1]


@pytest.mark.parametrize("variant", ["ring", "inplace"])
@pytest.mark.parametrize("case", NHWC_CASES, ids=lambda c: (
    f"C{c['channels']}-k{c['kernel']}-s{c['stride']}-d{c['dilation']}-p{c['padding']}-"
    f"{c['size']}-{str(c['dtype'])[6:]}").replace(" ", ""))
def test_vectorized_forward_nhwc_variants(case, variant, monkeypatch):
    """Both NHWC paths (the row ring and the in-place rows) on every NHWC case, whichever the
    rule picks, on the widest ISA this CPU runs."""
    monkeypatch.setenv("CONVOPS_CPU_NHWC", variant)
    x, w, b = _inputs(case, "cpu", requires_grad=False)
    args = (case["stride"], case["padding"], case["dilation"])
    out = convops.depthwise_conv2d(x, w, b, *args)
    path = _last_forward_path()
    if path == "generic":
        pytest.skip("no vectorized CPU forward on this machine")
    assert path.split("/")[0] in (("nhwc-ring",) if variant == "ring" else ("nhwc", "nhwc-pairs"))
    ref = reference(x.double(), w.double(), b.double() if b is not None else None, *args)
    assert_close(out, ref, case["dtype"], f"forward, nhwc {variant}, seed {stable_seed(case)}")
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_vectorized_forward_non_contiguous_and_thread_count(dtype, channels_last):
    g = torch.Generator().manual_seed(1414)
    base = torch.randn(2, 66, 31, 62, generator=g).to(dtype)
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    x = base[:, ::2, 1:-1, ::2]  # every other channel and column: 33 channels, 31 columns
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w = torch.randn(66, 1, 3, 3, generator=g).to(dtype)[::2]
    b = torch.randn(33, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 3):
            torch.set_num_threads(t)
            outs.append(convops.depthwise_conv2d(x, w, b, 1, 1))
            layout, isa = _last_forward_path().split("/")
            # bf16 NHWC 3x3 takes the ring below AVX-512 (the rule: _vector_layout)
            ring = dtype == torch.bfloat16 and isa != "avx512"
            assert layout == (("nhwc-ring" if ring else "nhwc-pairs") if channels_last
                              else "nchw")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]), "the forward depends on the thread count"
    ref = reference(x.double(), w.double(), b.double(), 1, 1)
    assert_close(outs[0], ref, dtype, "forward, seed 1414")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dilation", [(2, 2), (3, 1), (4, 4)])
def test_nhwc_inplace_dilated_rows_any_task_split(dtype, dilation, monkeypatch):
    """Dilated stride-1 rows in place run in phase order (oh mod dh) within each image of a
    task's row range (cpu/depthwise_forward_kernels.h, nhwc_rows): ranges that start and end
    inside an image, span images, or hold fewer rows than phases, at 1, 2, 3 and 7 threads
    (3 images of 13 rows: 39 tasks), all bit-identical and equal to F.conv2d in float64."""
    monkeypatch.setenv("CONVOPS_CPU_NHWC", "inplace")
    g = torch.Generator().manual_seed(2020 + dilation[0])
    x = torch.randn(3, 40, 13, 21, generator=g).to(dtype).to(memory_format=torch.channels_last)
    w = torch.randn(40, 1, 3, 3, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype)
    padding = (dilation[0], dilation[1])
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3, 7):
            torch.set_num_threads(t)
            outs.append(convops.depthwise_conv2d(x, w, b, 1, padding, dilation))
            path = _last_forward_path()
            if path == "generic":
                pytest.skip("no vectorized CPU forward on this machine")
            assert path.split("/")[0] in ("nhwc", "nhwc-pairs"), path
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out, outs[0]), "the forward depends on the thread count"
    ref = reference(x.double(), w.double(), b.double(), 1, padding, dilation)
    assert_close(outs[0], ref, dtype, f"forward, dilated in place, seed {2020 + dilation[0]}")


# NHWC rows in place that take two channel vectors per register block: channel counts of
# whole pairs, a pair plus a single vector, and a pair plus a tail (on every ISA's lane count),
# sliding 3x3 rows (dilated ones in phase runs) and strided blocked rows of 3-, 4-, 5- and 7-wide
# filters, each with borders and a width the blocks do not divide.
PAIR_CASES = [
    dict(channels=40, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=1, size=(9, 29)),
    # rows that blocks one pixel narrower than the pair block divide (AVX-512: 14 and 21 by 7)
    # run in those blocks, with no shifted last block
    dict(channels=64, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=1, size=(6, 14)),
    dict(channels=48, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=1, size=(5, 21)),
    dict(channels=48, kernel=(3, 3), stride=(1, 1), dilation=(2, 2), padding=2, size=(13, 37)),
    dict(channels=72, kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding=1, size=(15, 31)),
    # 3x3 stride 2 into 28 columns (AVX-512: 4 blocks of 7, no shifted last block), a pair plus
    # a single vector, and into 14 with borders on the right too
    dict(channels=48, kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding=1, size=(9, 55)),
    dict(channels=32, kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding=1, size=(7, 28)),
    dict(channels=34, kernel=(5, 5), stride=(2, 2), dilation=(1, 1), padding=2, size=(16, 40)),
    dict(channels=56, kernel=(7, 7), stride=(3, 2), dilation=(1, 2), padding=(3, 6),
         size=(20, 64)),
    dict(channels=32, kernel=(3, 4), stride=(2, 2), dilation=(1, 1), padding=(1, 2),
         size=(12, 50)),
    # with AVX-512, bf16 even / odd pairs: 3 pairs plus nothing, strided with borders; dilated
    dict(channels=96, kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding=1, size=(11, 27)),
    dict(channels=96, kernel=(3, 3), stride=(1, 1), dilation=(3, 3), padding=3, size=(9, 40)),
    # 7-wide rows: one block of 7 pixels per pair (AVX-512), then a single tail vector; and
    # even / odd bf16 pairs only
    dict(channels=80, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=1, size=(7, 7)),
    dict(channels=64, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=1, size=(9, 7)),
    # an odd number of full vectors (56: AVX-512 a pair + 1 + a tail of 8, AVX2 3 pairs + 1):
    # the odd one runs inside each sliding block, stride 1 (the last block shifted) and 2
    dict(channels=56, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=1, size=(6, 20)),
    dict(channels=56, kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding=1, size=(9, 37)),
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: (
    f"C{c['channels']}-k{c['kernel']}-s{c['stride']}-d{c['dilation']}").replace(" ", ""))
def test_vectorized_forward_nhwc_pairs(case, dtype, isa, monkeypatch):
    """With AVX-512, bf16 pairs run with even channels in one vector and odd ones in the other
    (weights and bias packed to match; single vectors and tails after the pairs in channel
    order): asserted to have run, and to give exactly what the channel-order pair kernels give
    (CONVOPS_CPU_BF16_EVEN_ODD=0)."""
    from convops import _C
    _require_isa(isa)
    monkeypatch.setenv("CONVOPS_CPU_ISA", isa)
    monkeypatch.setenv("CONVOPS_CPU_NHWC", "inplace")  # bf16 would take the ring
    case = dict(case, multiplier=1, batch=2, bias=True, dtype=dtype, channels_last=True)
    x, w, b = _inputs(case, "cpu", requires_grad=False)
    args = (case["stride"], case["padding"], case["dilation"])
    key = "depthwise_forward_bf16_even_odd:" + isa
    before = _C.cpu_path_counts().get(key, 0)
    out = convops.depthwise_conv2d(x, w, b, *args)
    assert _last_forward_path() == "nhwc-pairs/" + isa
    even_odd = dtype == torch.bfloat16 and isa == "avx512"
    assert _C.cpu_path_counts().get(key, 0) - before == int(even_odd)
    ref = reference(x.double(), w.double(), b.double(), *args)
    assert_close(out, ref, dtype, f"forward, nhwc pairs, {isa}, seed {stable_seed(case)}")
    if even_odd:
        monkeypatch.setenv("CONVOPS_CPU_BF16_EVEN_ODD", "0")
        channel_order = convops.depthwise_conv2d(x, w, b, *args)
        assert _C.cpu_path_counts().get(key, 0) - before == 1
        assert torch.equal(out, channel_order), "even/odd pairs differ from channel-order pairs"


# float32 NHWC rows in place through non-temporal stores (CONVOPS_CPU_STREAM_STORES=1 forces
# what large layers get by default): channel counts that are whole vectors on every ISA (48, 96)
# stream; tails (20 with 16 or 8 lanes) cannot (unaligned vectors) and take cached stores.
# Sliding pairs, pairs plus a single vector, strided and dilated rows, 5x5 single vectors.
STREAM_CASES = [
    dict(channels=48, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=1, size=(11, 30)),
    dict(channels=96, kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding=1, size=(13, 29)),
    dict(channels=48, kernel=(3, 3), stride=(1, 1), dilation=(3, 3), padding=3, size=(12, 40)),
    dict(channels=48, kernel=(5, 5), stride=(1, 1), dilation=(1, 1), padding=2, size=(9, 23)),
    dict(channels=20, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=1, size=(10, 21)),
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: (
    f"C{c['channels']}-k{c['kernel']}-s{c['stride']}-d{c['dilation']}").replace(" ", ""))
def test_vectorized_forward_nhwc_streamed_stores(case, isa, monkeypatch):
    """Streamed (non-temporal) output stores run where every full vector is aligned (asserted
    by the path counter), at 1 and 3 threads, and give exactly what cached stores give; a small
    layer does not stream by default."""
    from convops import _C
    _require_isa(isa)
    monkeypatch.setenv("CONVOPS_CPU_ISA", isa)
    monkeypatch.setenv("CONVOPS_CPU_NHWC", "inplace")
    case = dict(case, multiplier=1, batch=3, bias=True, dtype=torch.float32, channels_last=True)
    x, w, b = _inputs(case, "cpu", requires_grad=False)
    args = (case["stride"], case["padding"], case["dilation"])
    key = "depthwise_forward_nhwc_streamed:" + isa
    streams = case["channels"] % _ISA_LANES[isa] == 0
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            monkeypatch.delenv("CONVOPS_CPU_STREAM_STORES", raising=False)
            before = _C.cpu_path_counts().get(key, 0)
            cached = convops.depthwise_conv2d(x, w, b, *args)  # small: cached stores
            assert _C.cpu_path_counts().get(key, 0) == before
            monkeypatch.setenv("CONVOPS_CPU_STREAM_STORES", "1")
            out = convops.depthwise_conv2d(x, w, b, *args)
            assert _last_forward_path().startswith("nhwc"), _last_forward_path()
            assert _C.cpu_path_counts().get(key, 0) - before == int(streams)
            assert torch.equal(out, cached), f"streamed stores differ at {t} threads"
    finally:
        torch.set_num_threads(threads)
    ref = reference(x.double(), w.double(), b.double(), *args)
    assert_close(out, ref, torch.float32, f"forward, streamed, {isa}, seed {stable_seed(case)}")


# float32 NHWC rows in place whose register blocks read columns a multiple of 4 KB apart are
# staged at a padded pixel pitch first (dw_stage_pitch): the rule's cases (256 channels at
# dilation 4, 128 at dilation 8, 1024 undilated and at stride 2) and three it leaves in place
# (a 2 KB step; bf16 at a 4 KB step; a layer past a third of the cache, "big"), then forced
# (CONVOPS_CPU_NHWC_STAGE=1) on channel tails on every ISA's lane count, strides and dilations
# together (ring slots with sh > 1), asymmetric and 5x5 / 7x3 filters, and rows with no
# interior. (channels, kernel, stride, dilation, padding, size, dtype, staged by the rule)
STAGE_CASES = [
    (256, (3, 3), 1, 4, 4, (10, 36), torch.float32, True),
    (128, (3, 3), 1, 8, 8, (19, 70), torch.float32, True),
    (1024, (3, 3), 1, 1, 1, (6, 9), torch.float32, True),
    (1024, (3, 3), 2, 1, 1, (7, 11), torch.float32, True),
    (512, (3, 3), 1, 4, 4, (9, 36), torch.bfloat16, False),
    (256, (3, 3), 1, 4, 4, (64, 64), torch.float32, "big"),
    (256, (3, 3), 1, 2, 2, (8, 20), torch.float32, False),
    (512, (3, 3), 2, 1, 1, (7, 11), torch.bfloat16, False),
    (20, (3, 3), (2, 1), (1, 3), (1, 3), (13, 29), torch.float32, None),
    (20, (3, 3), (2, 1), (2, 2), 2, (15, 27), torch.bfloat16, None),
    (37, (5, 5), 1, 2, (3, 5), (12, 25), torch.float32, None),
    (48, (7, 3), (3, 2), (2, 1), (5, 0), (21, 17), torch.bfloat16, None),
    (33, (3, 3), 1, 3, 0, (9, 8), torch.float32, None),
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", STAGE_CASES, ids=lambda c: "C{}-k{}-s{}-d{}-{}".format(
    c[0], c[1], c[2], c[3], str(c[6])[6:]).replace(" ", ""))
def test_vectorized_forward_nhwc_staged_rows(case, isa, monkeypatch):
    """Staged rows run exactly where the rule (or CONVOPS_CPU_NHWC_STAGE=1) says, asserted by the
    path counter, at 1 and 3 threads (task ranges that start inside images and inside dilation
    phases) on two inputs of one shape (no row staged by an earlier call is reused), give the
    in-place rows' bits (CONVOPS_CPU_NHWC_STAGE=0), and match float64."""
    from convops import _C
    _require_isa(isa)
    C, kernel, stride, dil, pad, size, dtype, by_rule = case
    monkeypatch.setenv("CONVOPS_CPU_ISA", isa)
    monkeypatch.setenv("CONVOPS_CPU_NHWC", "inplace")  # bf16 on AVX2 would take the ring
    seed = 1424 + C * 7 + size[1]
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, C, *size, generator=g).to(dtype).to(memory_format=torch.channels_last)
          for _ in range(2)]
    w = torch.randn(C, 1, *kernel, generator=g).to(dtype)
    b = torch.randn(C, generator=g).to(dtype)
    args = (stride, pad, dil)
    key = "depthwise_forward_nhwc_staged:" + isa
    if by_rule is None:
        monkeypatch.setenv("CONVOPS_CPU_NHWC_STAGE", "1")
    if by_rule == "big":  # staged only where input + output fit a third of the last-level cache
        by_rule = 2 * xs[0].nbytes <= torch.ops.convops_cpu_debug.last_level_cache_bytes() // 3
    threads = torch.get_num_threads()
    try:
        outs = []
        for t, x in zip((1, 3), xs):
            torch.set_num_threads(t)
            before = _C.cpu_path_counts().get(key, 0)
            outs.append(convops.depthwise_conv2d(x, w, b, *args))
            assert _last_forward_path().startswith("nhwc"), _last_forward_path()
            assert _C.cpu_path_counts().get(key, 0) - before == int(by_rule is not False)
        monkeypatch.setenv("CONVOPS_CPU_NHWC_STAGE", "0")
        before = _C.cpu_path_counts().get(key, 0)
        in_place = [convops.depthwise_conv2d(x, w, b, *args) for x in xs]
        assert _C.cpu_path_counts().get(key, 0) == before
    finally:
        torch.set_num_threads(threads)
    what = f"forward, nhwc staged {case}, {isa}, seed {seed}"
    for out, x, ref in zip(outs, xs, in_place):
        assert torch.equal(out, ref), what + ": differs from the rows read in place"
        assert_close(out, reference(x.double(), w.double(), b.double(), *args), dtype, what)


# Stride-1 rows of filters 8 or more wide run in wide sliding blocks of 8 pixels per dilation
# phase (cpu/depthwise_forward_kernels.h): every border (the 27-wide filter on a 14-wide map has
# no interior at all), widths that 8 does not divide, channel tails on every ISA's lane count,
# even and asymmetric filters, no padding, dilated phase runs, and a row too narrow for a run
# (the other kernels take it). With AVX-512, undilated rows 14 and 28 wide run in blocks of 7
# ("sevens"; a dilated 14-wide row does not).
WIDE_CASES = [
    dict(channels=40, kernel=(9, 9), dilation=(1, 1), padding=4, size=(12, 19), wide=True),
    dict(channels=24, kernel=(11, 8), dilation=(1, 2), padding=(5, 7), size=(10, 30), wide=True),
    dict(channels=17, kernel=(31, 31), dilation=(1, 1), padding=15, size=(20, 8), wide=True),
    dict(channels=9, kernel=(13, 13), dilation=(3, 3), padding=18, size=(16, 60), wide=True),
    dict(channels=33, kernel=(27, 27), dilation=(1, 1), padding=13, size=(14, 14), wide=True,
         sevens=True),
    dict(channels=48, kernel=(9, 12), dilation=(1, 1), padding=0, size=(14, 40), wide=True),
    dict(channels=20, kernel=(9, 9), dilation=(2, 2), padding=8, size=(10, 10), wide=False),
    dict(channels=35, kernel=(10, 9), dilation=(1, 1), padding=(4, 3), size=(9, 30), wide=True,
         sevens=True),
    dict(channels=16, kernel=(9, 9), dilation=(1, 1), padding=(4, 2), size=(11, 18), wide=True,
         sevens=True),
    dict(channels=21, kernel=(9, 9), dilation=(2, 1), padding=(8, 4), size=(12, 14), wide=True,
         sevens=True),
    dict(channels=19, kernel=(9, 9), dilation=(1, 2), padding=8, size=(12, 14), wide=False),
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc-ring", "nhwc-inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: (
    f"C{c['channels']}-k{c['kernel']}-d{c['dilation']}-{c['size']}").replace(" ", ""))
def test_vectorized_forward_wide_sliding(case, dtype, layout, isa, monkeypatch):
    from convops import _C
    _require_isa(isa)
    monkeypatch.setenv("CONVOPS_CPU_ISA", isa)
    cl = layout != "nchw"
    if cl:
        monkeypatch.setenv("CONVOPS_CPU_NHWC", layout.split("-")[1])
    case = dict(case, multiplier=1, batch=2, bias=True, dtype=dtype, channels_last=cl,
                stride=(1, 1))
    x, w, b = _inputs(case, "cpu", requires_grad=False)
    args = (case["stride"], case["padding"], case["dilation"])
    key = "depthwise_forward_wide_sliding:" + isa
    sevens_key = "depthwise_forward_wide_sevens:" + isa
    before = _C.cpu_path_counts().get(key, 0)
    sevens_before = _C.cpu_path_counts().get(sevens_key, 0)
    out = convops.depthwise_conv2d(x, w, b, *args)
    assert _last_forward_path() == ("nchw" if not cl else layout.replace("-inplace", "")) + "/" + isa
    assert _C.cpu_path_counts().get(key, 0) - before == int(case["wide"])
    sevens = case.get("sevens", False) and isa == "avx512"
    assert _C.cpu_path_counts().get(sevens_key, 0) - sevens_before == int(sevens)
    ref = reference(x.double(), w.double(), b.double(), *args)
    assert_close(out, ref, dtype, f"forward, wide sliding, {layout}, {isa}, seed {stable_seed(case)}")


# On CPUs with AVX512_BF16 the AVX-512 build rounds its bf16 stores with vcvtneps2bf16, which
# flushes float32 denormals to zero and keeps NaN payloads where c10 keeps denormals and writes
# 0x7FC0; vectors holding either take the emulated rounding. Its bits must be the AVX2 and
# baseline builds' on every store path: NCHW (channel blocks, and AVX-512's narrow planes on a
# 14-wide map), the NHWC ring, NHWC in place in channel order (17
# channels: one vector with a tail; pairs with CONVOPS_CPU_BF16_EVEN_ODD=0) and in even / odd
# pairs (48: a pair and a single vector, 64: two pairs). On other AVX-512 CPUs this checks the
# emulated store alone.
@pytest.mark.parametrize("layout", ["nchw", "nchw-narrow", "nhwc-ring", "nhwc-inplace",
                                    "nhwc-inplace-channel-order"])
@pytest.mark.parametrize("channels", [17, 48, 64])
def test_vectorized_forward_avx512_bf16_stores_bit_identical(channels, layout, monkeypatch):
    from convops import _C
    _require_isa("avx512")
    cl = not layout.startswith("nchw")
    if cl:
        monkeypatch.setenv("CONVOPS_CPU_NHWC", layout.split("-")[1])
    if layout.endswith("channel-order"):
        monkeypatch.setenv("CONVOPS_CPU_BF16_EVEN_ODD", "0")
    g = torch.Generator().manual_seed(1416)
    x = torch.randn(2, channels, 20, 14 if layout == "nchw-narrow" else 37, generator=g).bfloat16()
    bits = x.view(torch.int16)
    # rows 4-9: bf16 denormals of both signs, so the float32 sums of output rows 5-8 are denormal
    sign = torch.randint(0, 2, bits[:, :, 4:10].shape, generator=g, dtype=torch.int16) * -0x8000
    bits[:, :, 4:10] = torch.randint(1, 0x80, bits[:, :, 4:10].shape, generator=g,
                                     dtype=torch.int16) | sign
    # NaNs with payloads: signaling and quiet, both signs (0xFFA5, 0xFFE3 as int16)
    bits[:, :, 14, 3::3][..., :4] = torch.tensor([0x7FA5, 0x7FC1, 0xFFA5 - 0x10000,
                                                  0xFFE3 - 0x10000], dtype=torch.int16)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(channels, 1, 3, 3, generator=g) * 0.5).bfloat16()
    others = ["avx2"] + (["baseline"] if _isa_built("baseline") else [])  # (sanitized builds)
    outs = {}
    for isa in ["avx512"] + others:
        monkeypatch.setenv("CONVOPS_CPU_ISA", isa)
        even_odd_key = "depthwise_forward_bf16_even_odd:" + isa
        narrow_key = "depthwise_forward_nchw_narrow:" + isa
        before = _C.cpu_path_counts().get(even_odd_key, 0)
        narrow_before = _C.cpu_path_counts().get(narrow_key, 0)
        outs[isa] = convops.depthwise_conv2d(x, w, None, 1, 1).view(torch.int16)
        path, ran = _last_forward_path().split("/")
        assert ran == isa and path.startswith(layout.split("-")[0] if not cl else
                                              layout.split("-inplace")[0]), (isa, path)
        even_odd = isa == "avx512" and layout == "nhwc-inplace" and channels > 32
        assert _C.cpu_path_counts().get(even_odd_key, 0) - before == int(even_odd)
        narrow = isa == "avx512" and layout == "nchw-narrow"
        assert _C.cpu_path_counts().get(narrow_key, 0) - narrow_before == int(narrow)
    out = outs["avx512"]
    denormal = ((out & 0x7F80) == 0) & ((out & 0x7F) != 0)
    nan = ((out & 0x7F80) == 0x7F80) & ((out & 0x7F) != 0)
    assert denormal.sum() > 1000 and nan.sum() > 100, (int(denormal.sum()), int(nan.sum()))
    for isa in others:
        differ = (out != outs[isa]).nonzero()
        assert differ.numel() == 0, f"avx512 differs from {isa} at {differ[:4].tolist()}"


# NHWC channel tails (channels not a multiple of the vector width) move through lane masks on
# AVX-512 (float and bf16) and AVX2 (float), element by element on the baseline build. On every
# row kernel that takes tails (3x3 / 5x5 / 7x7 sliding blocks, stride 2, dilated phases, wide 9x9
# blocks, in place and on the ring), in every build: outputs match float64 with every lane
# written (outputs are poisoned with NaN), and where the tail's vector runs the same row kernel
# as a full vector would (an even number of full vectors before it, so no pair takes it), its
# bits equal those of the same channels computed as a full vector (the input padded with extra
# channels up to a whole number of vectors). Channels 7, 41, 72: AVX-512 tails of 7, 9 and 8 lanes after 0, 2, 4 full vectors;
# AVX2 tails of 7 and 1 lanes, or none.
@pytest.mark.parametrize("layout", ["nhwc-ring", "nhwc-inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [7, 41, 72])
def test_vectorized_forward_nhwc_channel_tails(channels, dtype, layout, monkeypatch):
    from convops import _C
    _require_isa("avx2")
    monkeypatch.setenv("CONVOPS_CPU_NHWC", layout.split("-")[1])
    isas = [i for i in CPU_ISAS if not (_ISA_FLAGS[i] - _cpu_flags()) and _isa_built(i)]
    g = torch.Generator().manual_seed(1417 + channels)
    pad = 16  # extra channels, enough to fill the tail's vector on every ISA
    xp = torch.randn(2, channels + pad, 19, 26, generator=g).to(dtype)
    xp = xp.contiguous(memory_format=torch.channels_last)
    bp = torch.randn(channels + pad, generator=g).to(dtype)
    x, b = xp[:, :channels].contiguous(memory_format=torch.channels_last), bp[:channels]
    checked_bits = 0
    for k, stride, dil in [(3, 1, 1), (5, 1, 1), (7, 1, 1), (3, 2, 1), (3, 1, 2), (9, 1, 1)]:
        wp = (torch.randn(channels + pad, 1, k, k, generator=g) * 0.3).to(dtype)
        w = wp[:channels]
        args = (stride, dil * (k // 2), dil)
        what = f"tails, C{channels}, k{k} s{stride} d{dil}, {layout}"
        ref = reference(x.double(), w.double(), b.double(), *args)
        for isa in isas:
            monkeypatch.setenv("CONVOPS_CPU_ISA", isa)
            key = "depthwise_forward_nhwc_tail:" + isa
            before = _C.cpu_path_counts().get(key, 0)
            out = convops.depthwise_conv2d(x, w, b, *args)
            assert _last_forward_path().split("/")[1] == isa
            lanes = _ISA_LANES[isa]
            tail = channels % lanes != 0
            assert _C.cpu_path_counts().get(key, 0) - before == int(tail), (isa, k, stride, dil)
            assert_close(out, ref, dtype, f"{what}, {isa}")
            if tail and (channels // lanes) % 2 == 0:
                c = channels + lanes - channels % lanes
                full = convops.depthwise_conv2d(xp[:, :c], wp[:c], bp[:c], *args)[:, :channels]
                differ = (out != full).nonzero()
                assert differ.numel() == 0, f"{what}, {isa}: tail differs at {differ[:4].tolist()}"
                checked_bits += 1
    # 7 channels are a tail after zero full vectors with 8 or 16 lanes, so every AVX2 or AVX-512
    # CPU bit-checks all six geometries; 41 and 72 reach the check only where the lanes leave an
    # even number of full vectors (AVX-512: 2 + 9 and 4 + 8; AVX2: 5 + 1 and no tail at all)
    if channels == 7:
        assert checked_bits >= 6, checked_bits


# NCHW maps whose rows fit one AVX-512 vector (W, Wo <= 16) and filters up to 3 wide run one
# plane per task, rows in lanes (cpu/depthwise_forward_kernels.h, nchw_narrow_planes): undilated
# 3x3 stride-1 blocks of 7, 8 (the last shifted up), 4 or 1 rows; other filters, strides and
# dilations row by row. (C, multiplier, H, W, kernel, stride, dilation, padding, bias, narrow)
NARROW_CASES = [
    (19, 1, 14, 14, (3, 3), 1, 1, 1, True, True),  # 14 rows: two blocks of 7
    (5, 2, 23, 16, (3, 3), 1, 1, 1, False, True),  # all 16 lanes; blocks of 8, the last shifted
    (3, 3, 5, 13, (3, 3), 1, 1, 0, True, True),  # 3 rows: one at a time
    (4, 1, 7, 6, (3, 3), 1, 1, 2, True, True),  # 9x8 outputs, rows and columns with 1 or 2 taps
    (6, 1, 14, 14, (3, 3), 2, 1, 1, True, True),  # stride 2
    (6, 1, 16, 15, (3, 3), 3, 1, 1, False, True),  # stride 3
    (4, 2, 12, 12, (3, 3), 1, 2, 2, True, True),  # dilation 2
    (4, 1, 9, 11, (5, 3), 1, (1, 2), (2, 1), True, True),  # 5 rows tall, dilated columns
    (3, 1, 10, 16, (1, 3), 1, 1, (0, 1), True, True),
    (3, 1, 10, 16, (3, 1), (2, 1), 1, (1, 0), True, True),
    (2, 1, 6, 1, (1, 1), 1, 1, 0, True, True),  # one pixel wide
    (2, 1, 8, 17, (3, 3), 1, 1, 1, True, False),  # 17 wide: channel blocks
    (2, 1, 8, 16, (3, 3), 1, 1, 2, True, False),  # 18 output columns: channel blocks
    (2, 1, 14, 14, (5, 5), 1, 1, 2, True, False),  # 5 wide: channel blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", NARROW_CASES, ids=lambda c: "C{}x{}-{}x{}-k{}-s{}-d{}-p{}".format(
    *c[:8]).replace(" ", ""))
def test_vectorized_forward_nchw_narrow(case, dtype, monkeypatch):
    """Against float64 and against the channel blocks (CONVOPS_CPU_NCHW=blocks), with the path
    asserted; undilated 3x3 stride-1 planes sum each output's taps in the channel blocks' order,
    so their bits are equal. The input is a non-contiguous slice."""
    from convops import _C
    _require_isa("avx512")
    monkeypatch.setenv("CONVOPS_CPU_ISA", "avx512")
    C, m, H, W, kernel, stride, dil, pad, bias, narrow = case
    g = torch.Generator().manual_seed(1418 + H * 17 + W)
    x = torch.randn(2, C, H, W + 3, generator=g).to(dtype)[..., 2:W + 2]
    assert not x.is_contiguous()
    w = torch.randn(C * m, 1, *kernel, generator=g).to(dtype)
    b = torch.randn(C * m, generator=g).to(dtype) if bias else None
    args = (stride, pad, dil)
    key = "depthwise_forward_nchw_narrow:avx512"
    before = _C.cpu_path_counts().get(key, 0)
    out = convops.depthwise_conv2d(x, w, b, *args)
    assert _last_forward_path() == "nchw/avx512"
    assert _C.cpu_path_counts().get(key, 0) - before == int(narrow)
    monkeypatch.setenv("CONVOPS_CPU_NCHW", "blocks")
    blocks = convops.depthwise_conv2d(x, w, b, *args)
    assert _C.cpu_path_counts().get(key, 0) - before == int(narrow)
    ref = reference(x.double(), w.double(), b.double() if bias else None, *args)
    what = f"nchw narrow {case}, {dtype}, seed {1418 + H * 17 + W}"
    assert_close(out, ref, dtype, what)
    assert_close(blocks, ref, dtype, what + " (channel blocks)")
    if kernel == (3, 3) and stride == 1 and dil == 1:
        differ = (out != blocks).nonzero()
        assert differ.numel() == 0, f"{what}: differs from the channel blocks at {differ[:4].tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nhwc_ring_dilated_rows_in_phase_order_any_thread_count(dtype, monkeypatch):
    """The NHWC ring walks dilated rows in phase order within each image of a task's range;
    with 2 and 3 threads the ranges start and end inside images (3 images of 29 rows)."""
    monkeypatch.setenv("CONVOPS_CPU_NHWC", "ring")
    g = torch.Generator().manual_seed(1415)
    x = torch.randn(3, 21, 29, 23, generator=g).to(dtype).to(memory_format=torch.channels_last)
    w = torch.randn(21, 1, 3, 3, generator=g).to(dtype)
    b = torch.randn(21, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(convops.depthwise_conv2d(x, w, b, 1, 3, 3))
            if _last_forward_path() == "generic":
                pytest.skip("no vectorized CPU forward on this machine")
            assert _last_forward_path().startswith("nhwc-ring/")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    ref = reference(x.double(), w.double(), b.double(), 1, 3, 3)
    assert_close(outs[0], ref, dtype, "forward, nhwc ring, dilation 3, seed 1415")


def test_generic_forward_knob():
    x = torch.randn(1, 8, 9, 9)
    w = torch.randn(8, 1, 3, 3)
    fast = convops.depthwise_conv2d(x, w, None, 1, 1)
    assert _last_forward_path() != "generic"
    import os
    os.environ["CONVOPS_CPU_IMPL"] = "generic"
    try:
        slow = convops.depthwise_conv2d(x, w, None, 1, 1)
        assert _last_forward_path() == "generic"
    finally:
        del os.environ["CONVOPS_CPU_IMPL"]
    torch.testing.assert_close(fast, slow)


# CUDA kernel paths: the tiled NCHW forward, the plain one-thread-per-output forward
# (CONVOPS_CUDA_IMPL=plain), and int64 indexing forced on small tensors.
CUDA_IMPLS = {"tuned": {}, "plain": {"CONVOPS_CUDA_IMPL": "plain"},
              "int64": {"CONVOPS_CUDA_INDEX": "int64"}}

# Maps larger than one 32x32 output tile, channel counts past one warp.
TILE_SEAM_CASES = [
    dict(channels=17, multiplier=1, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=1,
         batch=2, bias=True, channels_last=False, dtype=torch.float32, size=(40, 37)),
    dict(channels=5, multiplier=2, kernel=(5, 5), stride=(2, 1), dilation=(1, 2),
         padding=(2, 4), batch=2, bias=False, channels_last=False, dtype=torch.bfloat16,
         size=(70, 45)),
    dict(channels=33, multiplier=1, kernel=(7, 7), stride=(1, 1), dilation=(1, 1),
         padding="same", batch=2, bias=True, channels_last=True, dtype=torch.float16,
         size=(34, 33)),
    dict(channels=3, multiplier=3, kernel=(3, 3), stride=(3, 3), dilation=(2, 2), padding=0,
         batch=3, bias=True, channels_last=False, dtype=torch.float64, size=(101, 99)),
]


def _check_gpu(case, gpu):
    check_gpu_against_cpu(_check_against_reference, case, gpu, ["input", "weight", "bias"])


@pytest.mark.parametrize("impl", list(CUDA_IMPLS))
@pytest.mark.parametrize("case", _grid(80, seed=2) + TILE_SEAM_CASES, ids=str)
def test_matches_conv2d_gpu(case, impl, gpu, monkeypatch):
    for key, value in CUDA_IMPLS[impl].items():
        monkeypatch.setenv(key, value)
    _check_gpu(case, gpu)


def _case(channels, kernel, size, dtype, channels_last, multiplier=1, stride=1, dilation=1,
          padding="same", batch=2, bias=True):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    return dict(channels=channels, multiplier=multiplier, kernel=pair(kernel),
                stride=pair(stride), dilation=pair(dilation), padding=padding, batch=batch,
                bias=bias, channels_last=channels_last, dtype=dtype, size=size)


F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
FWD_NHWC, FWD_NCHW = "depthwise_forward_nhwc_vec", "depthwise_forward_tiled_nchw"
FWD_PLAIN, IGRAD_GATHER = "depthwise_forward_plain", "depthwise_input_grad"
WGRAD_TILED = ("depthwise_weight_grad_tiled", "depthwise_weight_grad_reduce")
WGRAD_PLAIN = "depthwise_weight_grad"

# The tuned CUDA kernels, with realistic channel counts (several 16-byte packs, pack tails),
# maps larger than one tile, and the kernels each case must run: forward, input gradient
# (stride 1 and multiplier 1: the forward kernel on grad_output with flipped taps; otherwise the
# gather), weight gradient.
TUNED_PATH_CASES = [
    (_case(64, 3, (40, 37), F16, True), {FWD_NHWC, *WGRAD_TILED}),
    (_case(80, 5, (33, 30), BF16, True, stride=2, padding=2), {FWD_NHWC, IGRAD_GATHER,
                                                               *WGRAD_TILED}),
    (_case(16, 7, (21, 26), F32, True, dilation=2), {FWD_NHWC, *WGRAD_TILED}),
    (_case(6, (3, 5), (17, 19), F64, True, padding=(1, 0)), {FWD_NHWC, *WGRAD_TILED}),
    (_case(33, 3, (18, 20), F32, True), {FWD_PLAIN, IGRAD_GATHER, *WGRAD_TILED}),
    (_case(20, 3, (12, 13), F16, True, multiplier=2), {FWD_PLAIN, IGRAD_GATHER, *WGRAD_TILED}),
    (_case(17, 3, (7, 7), F32, False, batch=3), {FWD_NCHW, *WGRAD_TILED}),
    (_case(7, 3, (14, 14), F16, False, multiplier=2, padding=1), {FWD_NCHW, IGRAD_GATHER,
                                                                   *WGRAD_TILED}),
    (_case(64, 3, (56, 45), BF16, False), {FWD_NCHW, *WGRAD_TILED}),
    (_case(16, 3, (30, 70), F32, False, stride=(2, 1), padding=1), {FWD_NCHW, IGRAD_GATHER,
                                                                     *WGRAD_TILED}),
    (_case(5, 31, (40, 45), F32, False), {FWD_NCHW, *WGRAD_TILED}),
    (_case(3, 3, (150, 40), F32, False), {FWD_NCHW, *WGRAD_TILED}),  # 3 rows of 64-row tiles
    (_case(3, 31, (20, 23), BF16, True, dilation=(1, 2)), {FWD_PLAIN, IGRAD_GATHER,
                                                           *WGRAD_TILED}),
    (_case(2, 9, (120, 100), F32, False, stride=3, dilation=9, padding=0),
     {FWD_NCHW, IGRAD_GATHER, WGRAD_PLAIN}),
]


def _launches():
    from convops import emulator
    return emulator.launch_counts()


TUNED_SETTINGS = {"int32": {}, "int64": {"CONVOPS_CUDA_INDEX": "int64"},
                  "grid-loop": {"CONVOPS_CUDA_MAX_GRID": "3"}}


@pytest.mark.parametrize("setting", list(TUNED_SETTINGS))
@pytest.mark.parametrize("case,kernels", TUNED_PATH_CASES,
                         ids=[str(i) for i in range(len(TUNED_PATH_CASES))])
def test_tuned_kernels_gpu(case, kernels, setting, gpu, monkeypatch):
    """Each tuned kernel against the float64 reference and the CPU op, asserting (in the
    emulator) which kernels ran; int64 forces 64-bit indexing; grid-loop caps the tuned
    kernels' grids at 3 blocks so their loops over blocks run (the geometry used when a grid
    would exceed the device limit)."""
    for key, value in TUNED_SETTINGS[setting].items():
        monkeypatch.setenv(key, value)
    before = _launches() if gpu.emulated else {}
    _check_gpu(case, gpu)
    if gpu.emulated:
        after = _launches()
        ran = {k for k, v in after.items() if v > before.get(k, 0) and k.startswith("depthwise")}
        assert ran == kernels, f"ran {sorted(ran)}, expected {sorted(kernels)}"


def test_misaligned_1x1_weight_takes_the_plain_kernel(gpu):
    # A 1x1 filter's (kh, kw, C) copy is the weight itself; a slice 4 bytes in is misaligned.
    # The slice is taken on the device, so the real GPU sees the misaligned pointer too.
    x = torch.randn(2, 8, 9, 10).to(memory_format=torch.channels_last)
    w = torch.randn(9, 1, 1, 1, device=gpu.device)[1:]
    assert w.data_ptr() % 16 != 0
    before = _launches() if gpu.emulated else {}
    out = convops.depthwise_conv2d(x.to(gpu.device), w, None, 1, 0)
    expected = F.conv2d(x.double(), w.double().cpu(), None, 1, 0, 1, 8)
    assert_close(out, expected, torch.float32, "1x1")
    if gpu.emulated:
        after = _launches()
        assert after.get(FWD_NHWC, 0) == before.get(FWD_NHWC, 0)


def test_huge_stride_and_padding_stay_exact(gpu):
    # Strides and padding past int32 with tiny tensors: the int32 index path must not be taken.
    x, w = torch.randn(1, 2, 1, 1), torch.randn(2, 1, 1, 1)
    out = convops.depthwise_conv2d(x.to(gpu.device), w.to(gpu.device), None, (2 ** 33, 1),
                                   (2 ** 32, 0))
    assert out.shape == (1, 2, 2, 1)
    assert (out.cpu() == 0).all(), out


def test_misaligned_channels_last_input_takes_the_plain_kernel(gpu):
    # A view starting 2 bytes into its storage cannot use 16-byte loads.
    storage = torch.randn(2 * 20 * 9 * 16 + 1, dtype=torch.float16, device=gpu.device)
    x = storage[1:].view(2, 9, 20, 16).permute(0, 3, 1, 2)  # channels_last, misaligned
    w = torch.randn(16, 1, 3, 3, dtype=torch.float16, device=gpu.device)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    before = _launches() if gpu.emulated else {}
    out = convops.depthwise_conv2d(x, w, None, 1, 1)
    expected = F.conv2d(x.double().cpu(), w.double().cpu(), None, 1, 1, 1, 16)
    assert_close(out, expected, torch.float16, "misaligned input")
    if gpu.emulated:
        after = _launches()
        assert after.get(FWD_PLAIN, 0) > before.get(FWD_PLAIN, 0)
        assert after.get(FWD_NHWC, 0) == before.get(FWD_NHWC, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_matches_cpu(dtype, channels_last, gpu):
    case = dict(channels=8, multiplier=2, kernel=(7, 5), stride=(2, 1), dilation=(1, 2),
                padding=(3, 4), batch=2, bias=True, channels_last=channels_last, dtype=dtype)
    x, w, b = _inputs(case, "cpu", requires_grad=False)
    args = (case["stride"], case["padding"], case["dilation"])
    with gpu.native_cpu():
        cpu = convops.depthwise_conv2d(x, w, b, *args)
    out = convops.depthwise_conv2d(x.to(gpu.device), w.to(gpu.device), b.to(gpu.device), *args)
    assert_close(out, cpu.double(), dtype, "gpu vs cpu")


def test_large_kernels_gpu(gpu):
    # 31x31 on a map smaller than the kernel (padding 'same'): the tiled path's halo exceeds
    # the tile, and 63x63 does not fit shared memory (plain path).
    for kernel, size in [((31, 31), (20, 45)), ((63, 63), (9, 70))]:
        case = dict(channels=2, multiplier=1, kernel=kernel, stride=(1, 1), dilation=(1, 1),
                    padding="same", batch=2, bias=True, channels_last=False,
                    dtype=torch.float32, size=size)
        _check_gpu(case, gpu)


def test_large_kernels_and_tall_images():
    # 63 is the largest kernel the API promises; also a non-square 1x63 and a 63x1.
    for kernel in [(63, 63), (1, 63), (63, 1)]:
        case = dict(channels=2, multiplier=1, kernel=kernel, stride=(1, 1), dilation=(1, 1),
                    padding="same", batch=1, bias=True, channels_last=False,
                    dtype=torch.float32)
        _check_against_reference(case, "cpu")


@pytest.mark.parametrize("channels_last", [False, True])
def test_non_contiguous_inputs(channels_last):
    base = torch.randn(2, 6, 20, 24, dtype=torch.float64)
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    x = base[:, ::2, 1:-1, ::2].requires_grad_()  # every other channel and column
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64)[::2].requires_grad_()  # strided weight
    out = convops.depthwise_conv2d(x, w, None, 1, 1)
    ref = reference(x, w, None, 1, 1)
    assert_close(out, ref, torch.float64, "forward")
    g = torch.randn(out.shape, dtype=torch.float64).transpose(2, 3).contiguous().transpose(2, 3)
    assert not g.is_contiguous()
    grads = torch.autograd.grad(out, (x, w), g)
    ref_grads = torch.autograd.grad(ref, (x, w), g)
    for name, a, e in zip(["input", "weight"], grads, ref_grads):
        assert_close(a, e, torch.float64, f"grad_{name}")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("multiplier", [1, 2])
def test_gradcheck(channels_last, multiplier):
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(3 * multiplier, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3 * multiplier, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: convops.depthwise_conv2d(x, w, b, (2, 1), (1, 0), (1, 2))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_only_requested_gradients_are_computed():
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    go = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    gi, gw, gb = torch.ops.convops.depthwise_conv2d_backward(go, x, w, [1, 1], [0, 0], [1, 1],
                                                             [False, True, False])
    assert gi.numel() == 0 and gb.numel() == 0 and gw.shape == w.shape
    x.requires_grad_()
    out = convops.depthwise_conv2d(x, w, torch.randn(4, dtype=torch.float64))
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert gx.shape == x.shape


def _opcheck_samples(device="cpu"):
    samples = []
    for cl in (False, True):
        x = torch.randn(2, 3, 10, 9, device=device, requires_grad=True)
        if cl:
            x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(6, 1, 3, 3, device=device, requires_grad=True)
        b = torch.randn(6, device=device, requires_grad=True)
        samples.append((x, w, b, [1, 2], [1, 1], [1, 1]))
        samples.append((x, w, None, [1, 1], [0, 1, 2, 1], [2, 1]))
    return samples


def test_opcheck_forward():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.convops.depthwise_conv2d.default, args)


def test_opcheck_backward():
    for x, w, b, stride, padding, dilation in _opcheck_samples():
        out = torch.ops.convops.depthwise_conv2d(x, w, b, stride, padding, dilation)
        go = torch.randn_like(out)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(torch.ops.convops.depthwise_conv2d_backward.default,
                                  (go, x.detach(), w.detach(), stride, padding, dilation, mask))


def test_calls_needing_no_gradient_stay_in_cpp():
    """The autograd kernels are C++ (csrc/autograd.cpp): a call that needs no gradient (inputs
    that do not require grad, or no_grad) enters no Python function. The Python autograd kernel
    of torch.library.register_autograd cost about 5 us per call here."""
    g = torch.Generator().manual_seed(765)
    x = torch.randn(2, 4, 9, 9, generator=g)
    w, b = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, generator=g)
    wd = torch.randn(4, 4, 3, 3, generator=g)
    offset, mask = torch.randn(2, 18, 9, 9, generator=g), torch.rand(2, 9, 9, 9, generator=g)
    ops = torch.ops.convops
    calls = {  # name: (op, arguments after the input)
        "depthwise": (ops.depthwise_conv2d.default, (w, b, [1, 1], [1, 1], [1, 1])),
        "dilated": (ops.dilated_conv2d.default, (wd, b, [1, 1], [2, 2], [2, 2])),
        "deform": (ops.deform_conv2d.default, (wd, offset, mask, b, [1, 1], [1, 1], [1, 1])),
    }

    def record(frame, event, arg):
        # OpOverload.__call__ (torch/_ops.py) is how Python reaches any op; nothing else may run
        if event == "call" and not frame.f_code.co_filename.endswith("_ops.py"):
            entered.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    for name, (op, args) in calls.items():
        for grad_wanted_but_off in (False, True):
            xi = x.clone().requires_grad_(grad_wanted_but_off)
            entered = []
            with torch.no_grad() if grad_wanted_but_off else contextlib.nullcontext():
                sys.setprofile(record)
                try:
                    out = op(xi, *args)
                finally:
                    sys.setprofile(None)
            assert out.shape[:2] == (2, 4) and not out.requires_grad
            assert entered == [], f"{name}: Python ran inside the op call: {entered[:5]}"


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = nn.Sequential(convops.DepthwiseConv2d(4, 3, padding=1), nn.ReLU(),
                          convops.DepthwiseConv2d(4, 5, stride=2, padding="valid",
                                                  depth_multiplier=2))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    out = compiled(x)
    ref = model(x)
    assert_close(out, ref, torch.float32, "compiled forward")
    (g,) = torch.autograd.grad(out.sum(), x)
    (rg,) = torch.autograd.grad(ref.sum(), x)
    assert_close(g, rg, torch.float32, "compiled backward")


def test_torch_export_module():
    model = convops.DepthwiseSeparableConv2d(4, 8, 3, padding="same").eval()
    x = torch.randn(2, 4, 12, 12)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "convops.depthwise_conv2d.default" in targets
    assert_close(exported.module()(x), model(x), torch.float32, "exported")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_natively_and_matches_fp32(dtype, channels_last):
    # fp32 operands under autocast: the result equals the float64 convolution of the
    # dtype-rounded operands within the element-wise bound (conftest.py).
    x = torch.randn(2, 24, 19, 18)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(24, 1, 3, 3, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = convops.depthwise_conv2d(x, w, b, 1, 1)
    assert out.dtype == dtype
    r = [t.detach().to(dtype).double() for t in (x, w, b)]
    ref = reference(*r, 1, 1)
    abs_sum = reference(*[t.abs() for t in r], 1, 1)
    assert_close(out, ref, dtype, "autocast", abs_sum, 10)
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_is_deterministic(channels_last):
    x = torch.randn(4, 16, 33, 31)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(16, 1, 5, 5, requires_grad=True)
    results = []
    for _ in range(2):
        out = convops.depthwise_conv2d(x, w, None, 1, 2)
        results.append(torch.autograd.grad(out, (x, w), torch.ones_like(out)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_batch():
    x = torch.randn(0, 4, 8, 8, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    out = convops.depthwise_conv2d(x, w, b, 1, 1)
    assert out.shape == (0, 8, 8, 8)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# --- modules ----------------------------------------------------------------------------------

def test_module_state_dict_matches_nn_conv2d():
    ours = convops.DepthwiseConv2d(6, (3, 5), stride=2, padding=(1, 2), depth_multiplier=2)
    theirs = nn.Conv2d(6, 12, (3, 5), stride=2, padding=(1, 2), groups=6)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 15, 17)
    assert_close(ours(x), theirs(x).double(), torch.float32, "module")
    ours.load_state_dict(nn.Conv2d(6, 12, (3, 5), groups=6).state_dict())
    no_bias = convops.DepthwiseConv2d(6, 3, bias=False)
    assert set(no_bias.state_dict()) == {"weight"}


def test_depthwise_separable_module():
    m = convops.DepthwiseSeparableConv2d(4, 10, 3, stride=1, padding=1, dilation=1)
    assert isinstance(m.depthwise, convops.DepthwiseConv2d)
    assert isinstance(m.pointwise, nn.Conv2d) and m.pointwise.kernel_size == (1, 1)
    x = torch.randn(2, 4, 9, 9)
    ref = F.conv2d(F.conv2d(x, m.depthwise.weight, m.depthwise.bias, 1, 1, groups=4),
                   m.pointwise.weight, m.pointwise.bias)
    assert_close(m(x), ref.double(), torch.float32, "separable")
    assert set(m.state_dict()) == {"depthwise.weight", "depthwise.bias", "pointwise.weight",
                                   "pointwise.bias"}


# --- errors -----------------------------------------------------------------------------------

def _ok():
    return torch.randn(2, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(4)


ERROR_CASES = [
    ("input", TypeError, lambda x, w, b: (x.numpy(), w, b, {})),
    ("input", ValueError, lambda x, w, b: (x[0], w, b, {})),
    ("weight", ValueError, lambda x, w, b: (x, w[:, :, 0], b, {})),
    ("weight", ValueError, lambda x, w, b: (x, torch.randn(4, 2, 3, 3), b, {})),
    ("weight", ValueError, lambda x, w, b: (x, torch.randn(6, 1, 3, 3), None, {})),
    ("bias", ValueError, lambda x, w, b: (x, w, torch.randn(5), {})),
    ("weight dtype", TypeError, lambda x, w, b: (x, w.double(), b, {})),
    ("bias dtype", TypeError, lambda x, w, b: (x, w, b.half(), {})),
    ("input", TypeError, lambda x, w, b: (x.int(), w.int(), None, {})),
    ("stride", ValueError, lambda x, w, b: (x, w, b, {"stride": 0})),
    ("stride", ValueError, lambda x, w, b: (x, w, b, {"stride": (1, -1)})),
    ("dilation", ValueError, lambda x, w, b: (x, w, b, {"dilation": 0})),
    ("padding", ValueError, lambda x, w, b: (x, w, b, {"padding": -1})),
    ("padding", ValueError, lambda x, w, b: (x, w, b, {"padding": "full"})),
    ("padding='same'", ValueError, lambda x, w, b: (x, w, b, {"padding": "same", "stride": 2})),
    ("output size", ValueError, lambda x, w, b: (x, torch.randn(4, 1, 9, 3), b, {})),
    ("output size", ValueError, lambda x, w, b: (x, w, b, {"dilation": 5})),
    ("stride", TypeError, lambda x, w, b: (x, w, b, {"stride": 1.5})),
]


@pytest.mark.parametrize("name,exc,make", ERROR_CASES, ids=[f"{i}-{c[0]}" for i, c in
                                                            enumerate(ERROR_CASES)])
def test_bad_arguments_raise_clear_errors(name, exc, make):
    x, w, b, kwargs = make(*_ok())
    with pytest.raises(exc, match=name.split()[0].split("=")[0]):
        convops.depthwise_conv2d(x, w, b, **kwargs)


@requires_cuda
def test_device_mismatch_is_caught():
    x, w, b = _ok()
    with pytest.raises(ValueError, match="weight"):
        convops.depthwise_conv2d(x.cuda(), w, None)


def test_direct_op_call_checks_in_cpp():
    x, w, b = _ok()
    with pytest.raises(RuntimeError, match="stride"):
        torch.ops.convops.depthwise_conv2d(x, w, b, [0, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.convops.depthwise_conv2d(x, torch.randn(3, 1, 3, 3), None, [1, 1], [0, 0],
                                           [1, 1])
