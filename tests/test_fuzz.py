"""Property-based fuzzing (hypothesis) of every op against its float64 reference: shapes,
strides, paddings, dilations, groups, offset groups, dtypes; every tensor (input, weight, bias,
grad_output, offset, mask) independently NCHW, channels_last, strided or transposed; channel
counts up to 80 and maps up to 40x40; offsets inside and far outside the image; masks. Empty
batches are rare (about 2.5% of examples, at most 5%): every other example also compares every
gradient. float16/bfloat16 are checked element-wise against conftest's bound.
test_example_mix measures the mix the strategy draws (run with -s to see it).
test_fuzz_cpu_depthwise_forward fuzzes the vectorized CPU depthwise forward alone (the examples
above rarely draw a channels_last float32/bfloat16 input with multiplier 1), and
test_fuzz_reaches_cpu_depthwise_forward_paths checks that it reaches every path."""
import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch

import convops
from conftest import assert_close, env_set, stable_seed
from reference import depthwise_conv2d as depthwise_reference
from test_realistic import check_conv, check_deform, relayout

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])
LAYOUTS = st.sampled_from(["nchw", "cl", "strided", "t"])
TENSORS = ("x", "w", "go", "off", "mask")


@st.composite
def batch_size(draw):
    # One value in 40 is an empty batch, a value mid-range: hypothesis favours the ends of a
    # range, which would make empty batches common. test_example_mix measures the fraction.
    v = draw(st.integers(0, 39))
    return 0 if v == 17 else 1 + v % 3


@st.composite
def conv_problem(draw, op):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if op == "deform":
        kh, kw = min(kh, 3), min(kw, 3)
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    # Either many channels on a small map or few channels on a large one: both reach the
    # kernels' wide paths, and each example stays small enough for 200 per op in CI.
    wide = draw(st.booleans())
    max_c, max_hw = (80, 16) if wide else (12, 40)
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), max_hw))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), max_hw))
    if op == "depthwise":
        groups = c = draw(st.integers(1, max_c))
        oc = c * draw(st.integers(1, 2 if wide else 3))
    else:
        groups = draw(st.integers(1, 4))
        c = groups * draw(st.integers(1, max(1, max_c // groups)))
        oc = groups * draw(st.integers(1, max(1, max_c // groups)))
    layouts = {name: draw(LAYOUTS) for name in TENSORS}
    case = dict(op=op, c=c, oc=oc, k=(kh, kw), size=(h, w), dtype=draw(DTYPES),
                layouts=dict(x=layouts["x"], w=layouts["w"], go=layouts["go"]),
                batch=draw(batch_size()), stride=(sh, sw), padding=(ph, pw),
                dilation=(dh, dw), groups=groups, bias=draw(st.booleans()))
    if op == "deform":
        og = draw(st.sampled_from([g for g in (1, 2, 3, 4) if c % g == 0]))
        with_mask = draw(st.booleans())
        case.update(og=og, scale=draw(st.sampled_from([0.5, 2.0, 50.0])),
                    layouts=dict(x=layouts["x"], w=layouts["w"], off=layouts["off"],
                                 mask=layouts["mask"] if with_mask else None,
                                 go=layouts["go"]))
    return case


@FUZZ
@given(conv_problem("depthwise"))
def test_fuzz_depthwise(case):
    check_conv(case, "cpu")


@FUZZ
@given(conv_problem("dilated"))
def test_fuzz_dilated(case):
    check_conv(case, "cpu")


@FUZZ
@given(conv_problem("deform"))
def test_fuzz_deform(case):
    check_deform(case, "cpu")


FUZZ_TESTS = {"depthwise": test_fuzz_depthwise, "dilated": test_fuzz_dilated,
              "deform": test_fuzz_deform}


@pytest.mark.parametrize("op", list(FUZZ_TESTS))
def test_example_mix(op, monkeypatch):
    """The examples the fuzz test of `op` runs (the same derandomized test, its checks replaced
    by a recorder): at most 5% empty batches (and some), channels past 64, maps past 32, every
    layout for every tensor, every dtype. Run with -s to see the mix."""
    import sys
    drawn = []
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "check_conv", lambda case, device: drawn.append(case))
    monkeypatch.setattr(module, "check_deform", lambda case, device: drawn.append(case))
    FUZZ_TESTS[op]()
    n = len(drawn)
    empty = sum(c["batch"] == 0 for c in drawn) / n
    channels = [c["c"] for c in drawn]
    sizes = [max(c["size"]) for c in drawn]
    layouts = collections.Counter((t, c["layouts"].get(t)) for c in drawn for t in TENSORS
                                  if t in c["layouts"])
    print(f"\n{op}: {n} examples, empty batches {empty:.1%}, channels {min(channels)}.."
          f"{max(channels)} (>16: {sum(c > 16 for c in channels) / n:.0%}), max map side "
          f"{max(sizes)} (>20: {sum(s > 20 for s in sizes) / n:.0%}), dtypes "
          f"{dict(collections.Counter(str(c['dtype'])[6:] for c in drawn))}, layouts "
          f"{dict(sorted(layouts.items(), key=str))}")
    assert 0 < empty <= 0.05
    assert max(channels) > 64 and max(sizes) > 32
    for t in {name for name, _ in layouts}:
        assert {how for (name, how) in layouts if name == t} >= {"nchw", "cl", "strided", "t"}
    assert len({c["dtype"] for c in drawn}) == 4


@st.composite
def depthwise_forward_problem(draw):
    """The CPU depthwise forward's vectorized paths (float32/bfloat16, NCHW any multiplier,
    NHWC multiplier 1 in place and on the row ring): filters up to 7x7, and rows up to 13 wide
    (the wide sliding blocks of filters 8 or more wide), strides and dilations 1-3, padding up
    to the filter's size, 1-80 channels (vector tails and pairs; 32 and 64 often), maps up to
    40x48, which NHWC path runs (the rule's or a forced one), whether AVX-512's bf16 pairs
    run in even / odd order (the rule) or in channel order (CONVOPS_CPU_BF16_EVEN_ODD=0), and
    whether float32 NHWC rows store through non-temporal stores (CONVOPS_CPU_STREAM_STORES=1,
    taken where the channels are whole vectors), and whether NCHW maps at most 16 wide run as
    AVX-512 planes (the rule) or in channel blocks (CONVOPS_CPU_NCHW=blocks). Examples whose
    channels + batch are even also stage NHWC rows in place (CONVOPS_CPU_NHWC_STAGE=1, set by
    check_depthwise_forward; the rule stages no layer this small)."""
    # 3 wide often: the rows that take channel vectors in pairs
    kh, kw = draw(st.integers(1, 7)), draw(st.just(3) | st.integers(1, 7) | st.integers(8, 13))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh)), draw(st.integers(0, kw))
    layout = draw(st.sampled_from(["cl", "cl", "nchw", "strided"]))
    return dict(k=(kh, kw), dilation=(dh, dw), padding=(ph, pw),
                stride=(draw(st.integers(1, 3)), draw(st.sampled_from([1, 1, 2, 3]))),
                c=draw(st.sampled_from([32, 64]) | st.integers(1, 80)), layout=layout,
                multiplier=1 if layout == "cl" else draw(st.sampled_from([1, 1, 2, 3])),
                size=(draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 40)),
                      draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 48))),
                batch=draw(st.integers(1, 3)), bias=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                nhwc=draw(st.sampled_from(["", "ring", "inplace"])),
                even_odd=draw(st.sampled_from(["", "0"])),
                stream=draw(st.sampled_from(["", "1"])),
                nchw=draw(st.sampled_from(["", "", "blocks"])))


def _path_runs(prefix):
    return sum(n for path, n in convops._C.cpu_path_counts().items() if path.startswith(prefix))


def check_depthwise_forward(case):
    """The forward against float64 F.conv2d; returns the CPU forward path that ran (its layout
    part, "+wide" where its rows ran in wide sliding blocks, "+even-odd" where bf16 pairs ran
    in even / odd channel order, "+streamed" where the output went through streamed stores,
    "+narrow" where NCHW ran as planes, "+staged" where NHWC rows were staged)."""
    wide_before = _path_runs("depthwise_forward_wide_sliding:")
    even_odd_before = _path_runs("depthwise_forward_bf16_even_odd:")
    streamed_before = _path_runs("depthwise_forward_nhwc_streamed:")
    narrow_before = _path_runs("depthwise_forward_nchw_narrow:")
    staged_before = _path_runs("depthwise_forward_nhwc_staged:")
    gen = torch.Generator().manual_seed(stable_seed(case))
    c, oc = case["c"], case["c"] * case["multiplier"]
    x = relayout(torch.randn(case["batch"], c, *case["size"], generator=gen).to(case["dtype"]),
                 case["layout"])
    w = torch.randn(oc, 1, *case["k"], generator=gen).to(case["dtype"])
    b = torch.randn(oc, generator=gen).to(case["dtype"]) if case["bias"] else None
    args = (case["stride"], case["padding"], case["dilation"])
    # staged NHWC rows for about half the examples, from values already drawn (a draw of its own
    # would move every later example away from the paths the reach test counts on)
    stage = "1" if (case["c"] + case["batch"]) % 2 == 0 else ""
    with env_set("CONVOPS_CPU_NHWC", case["nhwc"]), \
            env_set("CONVOPS_CPU_BF16_EVEN_ODD", case["even_odd"]), \
            env_set("CONVOPS_CPU_STREAM_STORES", case["stream"]), \
            env_set("CONVOPS_CPU_NCHW", case["nchw"]), \
            env_set("CONVOPS_CPU_NHWC_STAGE", stage):
        out = convops.depthwise_conv2d(x, w, b, *args)
    ref = depthwise_reference(x, w, b, *args)
    assert_close(out, ref, case["dtype"], f"depthwise forward {case}, seed {stable_seed(case)}")
    path, isa = (torch.ops.convops_cpu_debug.depthwise_forward_last_path().split("/") + [""])[:2]
    _FORWARD_ISAS.add(isa)
    return (path + ("+wide" if _path_runs("depthwise_forward_wide_sliding:") > wide_before else "")
            + ("+even-odd" if _path_runs("depthwise_forward_bf16_even_odd:") > even_odd_before
               else "")
            + ("+streamed" if _path_runs("depthwise_forward_nhwc_streamed:") > streamed_before
               else "")
            + ("+narrow" if _path_runs("depthwise_forward_nchw_narrow:") > narrow_before else "")
            + ("+staged" if _path_runs("depthwise_forward_nhwc_staged:") > staged_before else ""))


_FORWARD_ISAS = set()


@settings(FUZZ, max_examples=500)  # each example is small: ~4 s in all
@given(depthwise_forward_problem())
def test_fuzz_cpu_depthwise_forward(case):
    check_depthwise_forward(case)


def test_fuzz_reaches_cpu_depthwise_forward_paths(monkeypatch):
    """The forward fuzz examples reach every vectorized CPU forward path: NCHW, and NHWC in
    place (single channel vectors and pairs, with AVX-512 also bf16 pairs in even / odd order)
    and on the row ring, each layout also in wide sliding blocks; float32 rows in place also
    through streamed stores; with AVX-512, NCHW narrow maps as planes; NHWC rows in place
    also staged."""
    import sys
    paths = collections.Counter()
    module = sys.modules[__name__]
    check = module.check_depthwise_forward
    monkeypatch.setattr(module, "check_depthwise_forward", lambda case: paths.update([check(case)]))
    test_fuzz_cpu_depthwise_forward()
    print(f"\nforward paths: {dict(paths)}")
    if set(paths) == {"generic"}:
        pytest.skip("no vectorized CPU forward on this machine")
    assert any(p.endswith("+staged") and p.startswith("nhwc-pairs") for p in paths), dict(paths)
    assert any(p.endswith("+staged") and p.startswith("nhwc+") for p in paths), dict(paths)
    paths = {p.removesuffix("+staged") for p in paths}  # staged rows are still those paths
    assert paths >= {"nchw", "nhwc", "nhwc-pairs", "nhwc-ring", "nchw+wide", "nhwc+wide",
                     "nhwc-ring+wide"}, paths
    assert ("nhwc-pairs+even-odd" in paths) == ("avx512" in _FORWARD_ISAS), paths
    assert {"nhwc-pairs+streamed", "nhwc+streamed"} <= paths, paths
    assert ("nchw+narrow" in paths) == ("avx512" in _FORWARD_ISAS), paths
