"""dilated_conv2d and ASPP: against F.conv2d, properties, errors."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convops
from conftest import DTYPES, assert_close, check_gpu_against_cpu, requires_cuda, stable_seed
from reference import conv_abs_terms

def _grid(count, seed):
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        groups = rng.choice([1, 1, 2, 3])
        kernel = (rng.choice([1, 2, 3, 5]), rng.choice([1, 3, 4]))
        dilation = (rng.randint(1, 12), rng.randint(1, 12)) if i % 3 else (1, 1)
        padding = rng.choice([0, 1, "same", "valid", (3, 1), dilation])
        stride = (1, 1) if padding == "same" else (rng.randint(1, 3), rng.randint(1, 2))
        size = tuple(d * (k - 1) + 1 + rng.randint(0, 6) for d, k in zip(dilation, kernel))
        cases.append(dict(batch=rng.randint(1, 2), channels=groups * rng.randint(1, 3),
                          out=groups * rng.randint(1, 3), groups=groups, kernel=kernel,
                          stride=stride, padding=padding, dilation=dilation, size=size,
                          bias=rng.random() < 0.6, channels_last=rng.random() < 0.4,
                          dtype=DTYPES[i % 4]))
    return cases


def _check(case, device):
    """Forward and every gradient against F.conv2d in float64; returns (out, grads)."""
    g = torch.Generator().manual_seed(stable_seed(case))
    x = torch.randn(case["batch"], case["channels"], *case["size"], generator=g,
                    dtype=torch.float64)
    if case["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(case["out"], case["channels"] // case["groups"], *case["kernel"],
                    generator=g, dtype=torch.float64)
    b = torch.randn(case["out"], generator=g, dtype=torch.float64) if case["bias"] else None
    leaves = [t for t in (x, w, b) if t is not None]
    ours = [t.to(device=device, dtype=case["dtype"]).requires_grad_() for t in leaves]
    ref = [t.to(case["dtype"]).double().requires_grad_() for t in leaves]
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    out = convops.dilated_conv2d(ours[0], ours[1], ours[2] if b is not None else None, *args)
    expected = F.conv2d(ref[0], ref[1], ref[2] if b is not None else None, *args)
    tag = f"[seed {stable_seed(case)} case {case}]"
    assert out.dtype == case["dtype"]
    if case["channels_last"]:
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64).to(case["dtype"])
    # Sums of |terms| for conftest's element-wise float16/bfloat16 bound.
    abs_out, abs_grads = conv_abs_terms(
        lambda *t: F.conv2d(t[0], t[1], t[2] if len(t) > 2 else None, *args), ref, grad)
    kh, kw = case["kernel"]
    cg, ocg = case["channels"] // case["groups"], case["out"] // case["groups"]
    N, (Ho, Wo) = case["batch"], expected.shape[2:]
    assert_close(out, expected, case["dtype"], f"{tag} forward", abs_out, cg * kh * kw + 1)
    grads = torch.autograd.grad(out, ours, grad.to(device))
    ref_grads = torch.autograd.grad(expected, ref, grad.double())
    terms = [ocg * kh * kw, N * Ho * Wo, N * Ho * Wo]
    for name, a, e, s, n in zip(["input", "weight", "bias"], grads, ref_grads, abs_grads, terms):
        assert_close(a, e, case["dtype"], f"{tag} grad_{name}", s, n)
    return out, grads


# CPU paths: the direct register-blocked kernels in each vector build (AVX-512 with bf16
# channel-pair dot products, AVX-512 float32, AVX2) and the plain gather engine. Each run
# asserts, through the extension's path counters (_C.cpu_path_counts()), that the path it names
# is the one that ran; a build the CPU lacks is skipped with that reason. float64 has only the
# engine, and only bfloat16 with paired channels has a bf16-pair path, so those combinations
# are not generated (they would repeat another path's run).
from convops import _C  # noqa: E402

CPU_PATHS = {"avx512-bf16pairs": {}, "avx512": {"CONVOPS_CPU_ISA": "avx512"},
             "avx2": {"CONVOPS_CPU_ISA": "avx2"}, "engine": {"CONVOPS_CPU_IMPL": "engine"}}


def _counts():
    return _C.cpu_path_counts()


def use_cpu_path(path, monkeypatch):
    """Selects `path`, or skips when this CPU cannot run it (the reason names what it lacks)."""
    for key, value in CPU_PATHS[path].items():
        monkeypatch.setenv(key, value)
    runs = _C.dilated_cpu_kernels()
    if path == "avx512-bf16pairs" and "bf16 pairs avx512bf16" not in runs:
        pytest.skip(f"this CPU lacks AVX512-BF16 (dilated_cpu_kernels: {runs!r})")
    if path in ("avx512", "avx2") and runs != f"direct {path}":
        pytest.skip(f"this CPU lacks {path.upper()} (with {CPU_PATHS[path]}: {runs!r})")
    if path == "engine":
        assert runs.startswith("gather engine"), runs


def _pairs(path, dtype, channels):
    return path == "avx512-bf16pairs" and dtype == torch.bfloat16 and channels % 2 == 0


def expected_paths(path, case):
    """The counters a forward + full backward of `case` on `path` must advance."""
    if path == "engine" or case["dtype"] == torch.float64:
        return {"engine_forward_chunks", "engine_backward_chunks"}
    isa = "avx512" if path.startswith("avx512") else "avx2"
    cg, ocg = case["channels"] // case["groups"], case["out"] // case["groups"]
    keys = {"direct_forward:" + ("avx512bf16" if _pairs(path, case["dtype"], cg) else isa),
            "direct_weight_grad:" + isa}
    if tuple(case["stride"]) == (1, 1):
        keys.add("direct_input_grad:" + ("avx512bf16" if _pairs(path, case["dtype"], ocg)
                                         else isa))
    else:
        keys.add("engine_backward_chunks")  # strided input gradients take the engine
    return keys


def assert_ran(before, keys, case):
    after = _counts()
    ran = {k for k, v in after.items() if v > before.get(k, 0)}
    watched = {k for k in ran if k.startswith(("direct_forward", "direct_input_grad",
                                               "direct_weight_grad", "engine_"))}
    assert watched == keys, f"ran {sorted(watched)}, expected {sorted(keys)} for {case}"


def _path_cases(cases):
    out = []
    for i, case in enumerate(cases):
        for path in CPU_PATHS:
            if path != "engine" and case["dtype"] == torch.float64:
                continue
            if path == "avx512-bf16pairs" and case["dtype"] != torch.bfloat16:
                continue
            out.append(pytest.param(path, case, id=f"{path}-{i}-{case}"))
    return out


@pytest.mark.parametrize("path,case", _path_cases(_grid(100, seed=11)))
def test_matches_conv2d_cpu(path, case, monkeypatch):
    use_cpu_path(path, monkeypatch)
    before = _counts()
    _check(case, "cpu")
    assert_ran(before, expected_paths(path, case), case)


def _wide_grid(count, seed):
    # Channel counts that fill several 64-wide output blocks with a narrower last one, channel
    # blocks with tails, and rows that are not a multiple of the 6-pixel tile.
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        groups = rng.choice([1, 1, 2])
        dilation = (rng.randint(1, 6), rng.randint(1, 6))
        stride = rng.choice([(1, 1), (1, 1), (2, 1), (2, 2)])
        cases.append(dict(batch=rng.randint(1, 2), channels=groups * rng.choice([7, 13, 40]),
                          out=groups * rng.choice([16, 33, 70, 130]), groups=groups,
                          kernel=rng.choice([(3, 3), (1, 1), (2, 3)]), stride=stride,
                          padding=rng.choice([dilation, 0, (1, 4)]), dilation=dilation,
                          size=(rng.randint(13, 20), rng.randint(13, 27)),
                          bias=rng.random() < 0.5, channels_last=rng.random() < 0.4,
                          dtype=[torch.float32, torch.bfloat16, torch.float16][i % 3]))
    return cases


@pytest.mark.parametrize("path,case", _path_cases(_wide_grid(12, seed=14)))
def test_wide_channels_cpu(path, case, monkeypatch):
    use_cpu_path(path, monkeypatch)
    before = _counts()
    _check(case, "cpu")
    assert_ran(before, expected_paths(path, case), case)


def test_weight_grad_independent_of_thread_count():
    # The direct weight gradient splits tiles, never a reduction, across threads.
    x = torch.randn(2, 40, 21, 19)
    w = torch.randn(70, 40, 3, 3, requires_grad=True)
    prev = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = convops.dilated_conv2d(x, w, None, 1, 2, 2)
            grads.append(torch.autograd.grad(out, w, torch.ones_like(out))[0])
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def _check_gpu(case, gpu):
    check_gpu_against_cpu(_check, case, gpu, ["input", "weight", "bias"])


@pytest.mark.parametrize("case", _grid(50, seed=12) + _wide_grid(3, seed=16), ids=str)
def test_matches_conv2d_gpu(case, deterministic_mode, gpu):
    _check_gpu(case, gpu)


def chunks_per_image(case, budget):
    """Column chunks per image of the gather engine (CPU and CUDA) under CONVOPS_COLUMN_BUDGET:
    ceil(Ho*Wo / max(1, budget // (C*kh*kw)))."""
    (kh, kw), (sh, sw), (dh, dw) = case["kernel"], case["stride"], case["dilation"]
    H, W = case["size"]
    pad = case["padding"]
    if pad == "valid":
        pad = (0, 0)
    if pad == "same":
        return -(-H * W // max(1, int(budget) // (case["channels"] * kh * kw)))
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return -(-Ho * Wo // max(1, int(budget) // (case["channels"] * kh * kw)))


def force_chunks(case, budget, monkeypatch):
    """The column-chunked gather engine (CONVOPS_CPU_IMPL=engine on CPU, CONVOPS_CUDA_IMPL=plain
    on CUDA, whose implicit-GEMM engine has no columns) with a column budget of `budget`
    elements; returns the chunks per image it must run (>= 2)."""
    monkeypatch.setenv("CONVOPS_CPU_IMPL", "engine")
    monkeypatch.setenv("CONVOPS_CUDA_IMPL", "plain")
    monkeypatch.setenv("CONVOPS_COLUMN_BUDGET", str(budget))
    chunks = chunks_per_image(case, budget)
    assert chunks >= 2, f"budget {budget} gives one chunk for {case}"
    return chunks


def assert_cpu_chunks(before, case, chunks):
    after = _counts()
    for key in ("engine_forward_chunks", "engine_backward_chunks"):
        ran = after.get(key, 0) - before.get(key, 0)
        assert ran == case["batch"] * chunks, f"{key}: {ran} chunks, expected " \
                                              f"{case['batch']} x {chunks} for {case}"


def assert_gpu_chunks(before, case, chunks):
    # One gather_im2col launch per chunk in the forward and again for the weight gradient.
    from convops import emulator
    ran = emulator.launch_counts().get("gather_im2col", 0) - before
    assert ran >= case["batch"] * chunks, f"{ran} im2col launches for {case['batch']} x " \
                                          f"{chunks} chunks of {case}"


def _launches(name="gather_im2col"):
    from convops import emulator
    return emulator.launch_counts().get(name, 0)


def _chunked(cases, budgets):
    """(case, budget) pairs for which the budget splits every image into >= 2 chunks."""
    return [pytest.param(c, b, id=f"{b}-{c}") for c in cases for b in budgets
            if chunks_per_image(c, b) >= 2]


@pytest.mark.parametrize("case,budget", _chunked(_grid(4, seed=17), ["1", "97", "1000"]))
def test_small_column_chunks_gpu(case, budget, deterministic_mode, gpu, monkeypatch):
    # Several chunks per image in the CUDA engine, starting and ending mid-row.
    chunks = force_chunks(case, budget, monkeypatch)
    before = _launches() if gpu.emulated else 0
    _check_gpu(case, gpu)
    if gpu.emulated:
        assert_gpu_chunks(before, case, chunks)


@pytest.mark.parametrize("case,budget", _chunked(_grid(12, seed=13), ["1", "97", "1000"]))
def test_small_column_chunks(case, budget, monkeypatch):
    # Chunks of a few pixels start and end mid-row: every chunk boundary rule is exercised.
    chunks = force_chunks(case, budget, monkeypatch)
    before = _counts()
    _check(case, "cpu")
    assert_cpu_chunks(before, case, chunks)


# The case that once crashed: d=36 on a 65x65 map (CPU), and a reduced one for the emulated
# CUDA engine, with chunks that split rows.
ASPP_CASE = dict(batch=1, channels=64, out=8, groups=1, kernel=(3, 3), stride=(1, 1),
                 padding=(36, 36), dilation=(36, 36), size=(65, 65), bias=True,
                 channels_last=False, dtype=torch.float32)


def test_aspp_rates_with_chunking(monkeypatch):
    chunks = force_chunks(ASPP_CASE, 64 * 9 * 50, monkeypatch)
    before = _counts()
    _check(ASPP_CASE, "cpu")
    assert_cpu_chunks(before, ASPP_CASE, chunks)


def test_aspp_rates_with_chunking_gpu(gpu, monkeypatch):
    case = ASPP_CASE | dict(channels=8, out=4, size=(40, 39), padding=(18, 18),
                            dilation=(18, 18))
    chunks = force_chunks(case, 8 * 9 * 50, monkeypatch)
    before = _launches() if gpu.emulated else 0
    _check_gpu(case, gpu)
    if gpu.emulated:
        assert_gpu_chunks(before, case, chunks)


def test_gradcheck():
    x = torch.randn(1, 4, 9, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: convops.dilated_conv2d(x, w, b, (1, 2), (2, 1), (3, 2), 2), (x, w, b))


def test_opcheck():
    x = torch.randn(2, 4, 12, 11, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    xcl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    for args in [(x, w, b, [1, 1], [2, 2], [2, 2]), (xcl, w, None, [2, 1], [1, 0, 2, 1], [3, 1])]:
        torch.library.opcheck(torch.ops.convops.dilated_conv2d.default, args)
        out = torch.ops.convops.dilated_conv2d(*args)
        for mask in ([True] * 3, [False, True, False], [True, False, True]):
            torch.library.opcheck(torch.ops.convops.dilated_conv2d_backward.default,
                                  (torch.randn_like(out), args[0].detach(), w.detach(),
                                   *args[3:], mask))


def test_compile_and_export():
    torch._dynamo.reset()
    model = nn.Sequential(convops.DilatedConv2d(4, 8, 3, padding=2, dilation=2), nn.ReLU(),
                          convops.DilatedConv2d(8, 8, 3, padding="same", dilation=6, groups=2))
    x = torch.randn(2, 4, 20, 20, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x), model(x)
    assert_close(out, ref.double(), torch.float32, "compiled")
    (g,) = torch.autograd.grad(out.sum(), x)
    (rg,) = torch.autograd.grad(ref.sum(), x)
    assert_close(g, rg.double(), torch.float32, "compiled backward")
    exported = torch.export.export(model, (x.detach(),))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "convops.dilated_conv2d.default" in targets
    assert_close(exported.module()(x.detach()), ref.detach().double(), torch.float32, "export")


def test_state_dict_identical_to_conv2d():
    ours = convops.DilatedConv2d(6, 4, (3, 5), stride=2, padding=(2, 4), dilation=2, groups=2)
    theirs = nn.Conv2d(6, 4, (3, 5), stride=2, padding=(2, 4), dilation=2, groups=2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 17, 19)
    assert_close(ours(x), theirs(x).double(), torch.float32, "module")


def test_deterministic_backward_and_autocast():
    x = torch.randn(2, 8, 15, 15, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    runs = []
    for _ in range(2):
        out = convops.dilated_conv2d(x, w, None, 1, 4, 4)
        runs.append(torch.autograd.grad(out, (x, w), torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_native_and_matches_fp32(dtype):
    # The float64 convolution of the dtype-rounded operands, within the element-wise bound.
    x = torch.randn(2, 24, 15, 16).to(memory_format=torch.channels_last)
    w = torch.randn(20, 24, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = convops.dilated_conv2d(x, w, None, 1, 4, 4)
    assert out.dtype == dtype
    rx, rw = x.to(dtype).double(), w.detach().to(dtype).double()
    ref = F.conv2d(rx, rw, None, 1, 4, 4)
    abs_sum = F.conv2d(rx.abs(), rw.abs(), None, 1, 4, 4)
    assert_close(out, ref, dtype, "autocast", abs_sum, 24 * 9 + 1)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_empty_batch():
    x = torch.randn(0, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    out = convops.dilated_conv2d(x, w, None, 1, 2, 2)
    assert out.shape == (0, 4, 8, 8)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


# --- ASPP -------------------------------------------------------------------------------------

def test_aspp_shapes_modes_and_gradients():
    torch.manual_seed(0)
    m = convops.ASPP(16, out_channels=8, rates=(2, 4, 6))
    assert sum(isinstance(mod, convops.DilatedConv2d) for mod in m.modules()) == 3
    x = torch.randn(2, 16, 13, 13, requires_grad=True)
    out = m(x)
    assert out.shape == (2, 8, 13, 13)
    out.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0
    dilated = [mod for mod in m.modules() if isinstance(mod, convops.DilatedConv2d)]
    assert all(d.weight.grad.abs().sum() > 0 for d in dilated)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(1, 16, 9, 11)).shape == (1, 8, 9, 11)


def test_aspp_compiles():
    torch._dynamo.reset()
    m = convops.ASPP(8, out_channels=4, rates=(1, 2)).eval()
    x = torch.randn(1, 8, 10, 10)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), m(x).double(), torch.float32, "aspp compiled")


# --- errors -----------------------------------------------------------------------------------

def _ok():
    return dict(input=torch.randn(2, 4, 10, 10), weight=torch.randn(6, 2, 3, 3),
                bias=torch.randn(6), stride=1, padding=2, dilation=2, groups=2)


ERROR_CASES = [
    ("groups", ValueError, dict(groups=3, weight=torch.randn(6, 1, 3, 3))),
    ("groups", ValueError, dict(weight=torch.randn(5, 2, 3, 3), bias=None)),
    ("weight", ValueError, dict(weight=torch.randn(6, 4, 3, 3))),
    ("weight", ValueError, dict(weight=torch.randn(6, 2, 3))),
    ("bias", ValueError, dict(bias=torch.randn(4))),
    ("weight dtype", TypeError, dict(weight=torch.randn(6, 2, 3, 3).double())),
    ("stride", ValueError, dict(stride=0)),
    ("dilation", ValueError, dict(dilation=-1)),
    ("padding", ValueError, dict(padding=-2)),
    ("output size", ValueError, dict(dilation=6, padding=0)),
    ("groups", ValueError, dict(groups=0)),
]


@pytest.mark.parametrize("name,exc,change", ERROR_CASES,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(ERROR_CASES)])
def test_bad_arguments_raise_clear_errors(name, exc, change):
    a = _ok() | change
    with pytest.raises(exc, match=name.split()[0]):
        convops.dilated_conv2d(a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                               a["dilation"], a["groups"])


@requires_cuda
def test_device_mismatch_is_caught():
    a = _ok()
    with pytest.raises(ValueError, match="weight"):
        convops.dilated_conv2d(a["input"].cuda(), a["weight"], None, 1, 2, 2, 2)


def test_repeated_calls_with_changing_geometry():
    # The direct CPU path keeps its padded-image buffers, and which zero borders they hold,
    # across calls: alternate geometries, batch sizes and layouts must never read stale data.
    calls = [(1, 20, 6), (3, 20, 6), (2, 20, 2), (3, 20, 6), (1, 26, 6), (2, 20, 6)]
    for n, size, d in calls + calls[::-1]:
        _check(dict(batch=n, channels=24, out=32, groups=1, kernel=(3, 3), stride=(1, 1),
                    padding=(d, d), dilation=(d, d), size=(size, size), bias=False,
                    channels_last=n == 2, dtype=torch.float32), "cpu")


def test_reports_which_cpu_kernels_run(monkeypatch):
    # The report names the kernels that really run: checked against the path counters.
    x = torch.randn(2, 8, 12, 12)
    w = torch.randn(8, 8, 3, 3)
    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    runs = _C.dilated_cpu_kernels()
    expected = {"AVX512": "direct avx512", "AVX2": "direct avx2"}.get(
        cap, "gather engine (im2col + at::mm)")
    assert runs.split(",")[0] == expected, (runs, cap)
    before = _counts()
    convops.dilated_conv2d(x, w, None, 1, 2, 2)
    ran = {k for k, v in _counts().items() if v > before.get(k, 0)}
    assert ran == ({"direct_forward:" + runs.split(",")[0].split()[1]}
                   if runs.startswith("direct") else {"engine_forward_chunks"}), (runs, ran)
    monkeypatch.setenv("CONVOPS_CPU_IMPL", "engine")
    assert _C.dilated_cpu_kernels() == "gather engine (im2col + at::mm)"
    before = _counts()
    convops.dilated_conv2d(x, w, None, 1, 2, 2)
    assert {k for k, v in _counts().items() if v > before.get(k, 0)} == {"engine_forward_chunks"}
    monkeypatch.delenv("CONVOPS_CPU_IMPL")
    monkeypatch.setenv("CONVOPS_CPU_ISA", "avx2")
    if cap in ("AVX2", "AVX512"):
        assert _C.dilated_cpu_kernels() == "direct avx2"
