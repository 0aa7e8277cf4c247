"""The fused implicit-GEMM engine of CUDA deformable and dilated convolution
(csrc/cuda/implicit_gemm.cuh), on the GPU when there is one and always in the emulator:
realistic shapes that span several tiles (64 out-channels x 64 pixels, K-slices of 32
channels) with tails everywhere, every dtype and layout, both scatter modes (fp32 atomics and
fixed-point), TF32, the image-chunked input gradient, skipped padding taps, and the kernels
asserted to have run. Every shape here has fewer output tiles than two per SM, so the forward
and the input gradient split their taps over blocks unless CONVOPS_CUDA_TAP_SPLITS=1 (both are
tested)."""
import os

import pytest
import torch

import convops
import test_deform
import test_dilated
from conftest import TF32_TOLERANCE, DTYPES, requires_cuda, stable_seed
from convops import emulator

ENGINE_KERNELS = {"igemm_forward", "igemm_weight_grad", "igemm_weight_grad_reduce"}


def _deform_cases():
    base = dict(batch=2, og=2, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                size=(9, 10), mask=True, bias=True, offset_scale=2.0)
    cases = []
    for i, dtype in enumerate(DTYPES):
        # 40 channels: one full K-slice of 32 plus a tail; 70 out-channels: a 64-row tile plus
        # a tail; 2 x 90 pixels: three 64-pixel tiles, one of them across the image boundary.
        cases.append(dict(base, channels=40, out_per_group=70, groups=1, channels_last=i % 2 == 0,
                          dtype=dtype))
    # groups and offset groups that cut K-slices (Cg = 12, 6 channels per offset group), a
    # non-square strided dilated kernel, no mask.
    cases.append(dict(base, channels=24, out_per_group=5, groups=2, og=4, kernel=(2, 3),
                      stride=(2, 1), padding=(1, 2), dilation=(2, 1), size=(13, 11), mask=False,
                      channels_last=True, dtype=torch.float32))
    cases.append(dict(base, channels=17, out_per_group=33, groups=1, og=1, size=(16, 13),
                      mask=True, offset_scale=8.0, channels_last=False, dtype=torch.bfloat16))
    return cases


def _depthwise_deform_cases():
    # groups == C: the direct kernels; multiplier 2, offset groups 1 and C.
    base = dict(batch=2, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                size=(9, 10), mask=True, bias=True, offset_scale=2.0)
    return [dict(base, channels=24, out_per_group=1, groups=24, og=1, channels_last=True,
                 dtype=torch.float16),
            dict(base, channels=17, out_per_group=2, groups=17, og=17, channels_last=False,
                 dtype=torch.float32, kernel=(2, 3), stride=(2, 1), mask=False)]


def _dilated_cases():
    base = dict(batch=2, groups=1, kernel=(3, 3), stride=(1, 1), bias=True)
    cases = []
    for i, dtype in enumerate(DTYPES):
        cases.append(dict(base, channels=40, out=70, padding=(2, 2), dilation=(2, 2),
                          size=(10, 9), channels_last=i % 2 == 1, dtype=dtype))
    # ASPP-like: dilation 12 on a 14 x 14 map, most taps of most tiles land in the padding.
    cases.append(dict(base, channels=33, out=16, padding=(12, 12), dilation=(12, 12),
                      size=(14, 14), channels_last=True, dtype=torch.float16))
    cases.append(dict(base, channels=18, out=12, groups=3, padding=(1, 3), dilation=(1, 3),
                      stride=(2, 1), size=(11, 12), channels_last=False, dtype=torch.float32))
    return cases


def _engine_ran(before):
    after = emulator.launch_counts()
    return {k for k, v in after.items() if v > before.get(k, 0)}


def _run(check, case, gpu, scatter=True):
    # scatter: the input gradient is the fused scatter kernel (deformable; dilated with
    # CONVOPS_CUDA_DILATED_DGRAD=scatter), else the forward kernel with flipped taps (dilated)
    before = emulator.launch_counts()
    check(case, gpu.device)
    if gpu.emulated:
        ran = _engine_ran(before)
        scatter_kernel = "igemm_data_grad_fixed" if torch.are_deterministic_algorithms_enabled() \
            else "igemm_data_grad_atomic"
        wanted = ENGINE_KERNELS | ({scatter_kernel} if scatter else set())
        assert wanted <= ran, f"engine kernels not run: {wanted - ran}"
        if not scatter:
            assert emulator.launch_counts()["igemm_forward"] - before.get("igemm_forward", 0) \
                == 2, "the flipped-tap input gradient did not run"
            assert not {"igemm_data_grad_atomic", "igemm_data_grad_fixed"} & ran, ran
        assert not {"gather_im2col", "gather_col2im_atomic", "gather_col2im_ordered"} & ran
        split = os.environ.get("CONVOPS_CUDA_TAP_SPLITS", "auto") != "1"
        assert ("igemm_forward_reduce" in ran) == split, ran


@pytest.mark.parametrize("case", _deform_cases(), ids=str)
def test_deform_engine(case, deterministic_mode, gpu):
    _run(lambda c, d: test_deform._check(c, d, test_deform.reference), case, gpu)


DEPTHWISE_KERNELS = {"igemm_forward_depthwise", "igemm_weight_grad_depthwise",
                     "igemm_weight_grad_reduce"}


def _assert_depthwise_kernels_ran(before):
    ran = _engine_ran(before)
    scatter = "fixed" if torch.are_deterministic_algorithms_enabled() else "atomic"
    wanted = DEPTHWISE_KERNELS | {f"igemm_data_grad_depthwise_{scatter}"}
    assert wanted <= ran, f"direct depthwise kernels not run: {wanted - ran}"
    assert not {"igemm_forward", "igemm_weight_grad", "igemm_data_grad_atomic",
                "igemm_data_grad_fixed"} & ran, ran


@pytest.mark.parametrize("case", _depthwise_deform_cases(), ids=str)
def test_depthwise_deform_direct_kernels(case, deterministic_mode, gpu):
    before = emulator.launch_counts()
    test_deform._check(case, gpu.device, test_deform.reference)
    if gpu.emulated:
        _assert_depthwise_kernels_ran(before)


def test_depthwise_dilated_direct_kernels(deterministic_mode, gpu):
    # groups == C with multiplier 2, dilation 2 and stride 2, channels_last bf16
    case = dict(batch=2, groups=20, channels=20, out=40, kernel=(3, 3), stride=(2, 2),
                padding=(2, 2), dilation=(2, 2), size=(13, 12), bias=True, channels_last=True,
                dtype=torch.bfloat16)
    before = emulator.launch_counts()
    test_dilated._check(case, gpu.device)
    if gpu.emulated:
        _assert_depthwise_kernels_ran(before)


@pytest.mark.parametrize("splits", ["1", "4"])
@pytest.mark.parametrize("op", ["deform", "dilated"])
def test_tap_splits(op, splits, deterministic_mode, gpu, monkeypatch):
    # 1: no split (one block per tile); 4: three splits of three (or two) taps (auto gives one
    # tap each). A plain case and a grouped one (the bias and weights of a later group).
    monkeypatch.setenv("CONVOPS_CUDA_TAP_SPLITS", splits)
    if op == "deform":
        for case in (_deform_cases()[0], _deform_cases()[4]):
            _run(lambda c, d: test_deform._check(c, d, test_deform.reference), case, gpu)
    else:
        for case in (_dilated_cases()[0], _dilated_cases()[5]):
            _run(test_dilated._check, case, gpu, scatter=False)


@pytest.mark.parametrize("case", _dilated_cases(), ids=str)
def test_dilated_engine(case, deterministic_mode, gpu):
    _run(test_dilated._check, case, gpu, scatter=False)


@pytest.mark.parametrize("case", [_dilated_cases()[i] for i in (0, 4, 5)], ids=str)
def test_dilated_input_gradient_scatter(case, deterministic_mode, gpu, monkeypatch):
    # The fused scatter kernel with the integer sampler: the fallback of the flipped-tap GEMM
    # beyond its 32-bit limits, forced here.
    monkeypatch.setenv("CONVOPS_CUDA_DILATED_DGRAD", "scatter")
    _run(test_dilated._check, case, gpu)


@pytest.mark.parametrize("op", ["deform", "dilated"])
def test_input_gradient_in_image_chunks(op, deterministic_mode, gpu, monkeypatch):
    # A budget of one image per launch: the accumulation buffer is reused image by image.
    case = _deform_cases()[2] if op == "deform" else _dilated_cases()[2]  # float16
    per_image = case["channels"] * case["size"][0] * case["size"][1]
    monkeypatch.setenv("CONVOPS_CUDA_ACCUM_BUDGET", str(per_image))
    monkeypatch.setenv("CONVOPS_CUDA_DILATED_DGRAD", "scatter")
    check = (lambda c, d: test_deform._check(c, d, test_deform.reference)) if op == "deform" \
        else test_dilated._check
    _run(check, dict(case, batch=3), gpu)


def test_depthwise_input_gradient_in_image_chunks(deterministic_mode, gpu, monkeypatch):
    # The direct depthwise scatter with a budget of one image per launch (float16: an fp32
    # accumulation buffer, reused image by image).
    case = dict(_depthwise_deform_cases()[0], batch=3)
    per_image = case["channels"] * case["size"][0] * case["size"][1]
    monkeypatch.setenv("CONVOPS_CUDA_ACCUM_BUDGET", str(per_image))
    before = emulator.launch_counts()
    test_deform._check(case, gpu.device, test_deform.reference)
    if gpu.emulated:
        _assert_depthwise_kernels_ran(before)


@pytest.mark.parametrize("op", ["deform", "dilated"])
def test_input_gradient_with_grad_output_streamed(op, deterministic_mode, gpu, monkeypatch):
    # grad_out too large for shared memory is staged again per K-slice instead of once per
    # block; force that path (groups: the group offset into grad_out is exercised too).
    monkeypatch.setenv("CONVOPS_CUDA_RESIDENT_GRAD_OUT", "0")
    monkeypatch.setenv("CONVOPS_CUDA_DILATED_DGRAD", "scatter")
    case = _deform_cases()[4] if op == "deform" else _dilated_cases()[5]
    check = (lambda c, d: test_deform._check(c, d, test_deform.reference)) if op == "deform" \
        else test_dilated._check
    _run(check, case, gpu)


def test_tf32_follows_cudnn_allow_tf32(gpu):
    # fp32 runs on TF32 tensor cores exactly when torch.backends.cudnn.allow_tf32 says so, as
    # F.conv2d does: within TF32's tolerance then, and at fp32 precision otherwise.
    g = torch.Generator().manual_seed(stable_seed("tf32"))
    x = torch.randn(2, 64, 12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(32, 64, 3, 3, generator=g, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(x, w, None, 1, 2, 2)
    errors = {}
    for allow in (False, True):
        torch.backends.cudnn.allow_tf32 = allow
        out = convops.dilated_conv2d(x.float().to(gpu.device), w.float().to(gpu.device), None,
                                     1, 2, 2)
        errors[allow] = (out.double().cpu() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert errors[False] <= 1e-6 + 1e-5 * scale, errors
    assert errors[True] <= TF32_TOLERANCE[0] + TF32_TOLERANCE[1] * scale, errors
    assert errors[True] > 10 * errors[False], errors  # TF32 did run


@requires_cuda
@pytest.mark.parametrize("op", ["deform", "dilated"])
def test_peak_extra_memory_does_not_grow_with_batch(op, monkeypatch):
    # Beyond inputs and outputs, the engine allocates O(tiles) plus a bounded accumulation
    # buffer: with a small budget, batch 4 and batch 16 stay under the bound of
    # test_extra_memory_in_the_emulator (plus 1 MiB for the caching allocator's rounding).
    monkeypatch.setenv("CONVOPS_CUDA_ACCUM_BUDGET", str(1 << 16))
    extras = []
    for n in (4, 16):
        g = torch.Generator(device="cuda").manual_seed(n)
        x = torch.randn(n, 32, 24, 24, device="cuda", dtype=torch.float16, generator=g,
                        requires_grad=True)
        w = torch.randn(32, 32, 3, 3, device="cuda", dtype=torch.float16, generator=g,
                        requires_grad=True)
        off = torch.randn(n, 18, 24, 24, device="cuda", dtype=torch.float16, generator=g,
                          requires_grad=True)
        call = (lambda: convops.deform_conv2d(x, off, w, padding=1)) if op == "deform" \
            else (lambda: convops.dilated_conv2d(x, w, None, 1, 2, 2))
        out = call()
        go = torch.randn_like(out)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = torch.autograd.grad(out, [x, w] + ([off] if op == "deform" else []), go)
        torch.cuda.synchronize()
        outputs = sum(t.numel() * t.element_size() for t in grads)
        extras.append(torch.cuda.max_memory_allocated() - base - outputs)
    w_bytes = 32 * 32 * 9 * 2
    bound = 2 * TAP_SPLIT_TARGET_BLOCKS * 64 * 64 * 4 + 64 * 2 * w_bytes + 2 * w_bytes \
        + 2 * (1 << 16) * 8
    assert all(v <= bound + (1 << 20) for v in extras), (extras, bound)


TAP_SPLIT_TARGET_BLOCKS = 264  # kTapSplitTargetBlocks in csrc/cuda/implicit_gemm.cuh


@pytest.mark.parametrize("op", ["deform", "dilated"])
def test_extra_memory_in_the_emulator(op, monkeypatch):
    # The same property in the emulator, from the CPU allocator: every byte the engine allocates
    # in a pass (the profiler's self memory of each op, frees ignored: an upper bound on the
    # peak) beyond the pass's outputs stays under a bound that does not depend on the batch:
    # tap-split partials (O(tiles), below 2 * 264 tiles of 64 x 64 fp32; the forward, and the
    # dilated input gradient, which is the forward over grad_output), weight-gradient split-K
    # partials (at most 64 fp32 copies of the weight), reordered weight copies, the
    # accumulation buffer and the NCHW transpose copy (each at most budget elements of 8 bytes). The deformable backward, which has no
    # tap-split partials, is identical for batch 4 and 16.
    from torch.profiler import ProfilerActivity, profile
    monkeypatch.setenv("CONVOPS_CUDA_ACCUM_BUDGET", str(1 << 16))

    def extras(n):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 32, 24, 24, dtype=torch.float16, generator=g, requires_grad=True)
        w = torch.randn(32, 32, 3, 3, dtype=torch.float16, generator=g, requires_grad=True)
        off = torch.randn(n, 18, 24, 24, dtype=torch.float16, generator=g, requires_grad=True)
        call = (lambda: convops.deform_conv2d(x, off, w, padding=1)) if op == "deform" \
            else (lambda: convops.dilated_conv2d(x, w, None, 1, 2, 2))
        with emulator.emulated_cuda():
            before = emulator.launch_counts()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as forward:
                out = call()
            go = torch.randn(out.shape, generator=g, dtype=out.dtype)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as backward:
                grads = torch.autograd.grad(out, [x, w] + ([off] if op == "deform" else []), go)
            assert "igemm_forward_reduce" in _engine_ran(before)  # the partials were allocated
        result = []
        for prof, outputs in ((forward, [out]), (backward, grads)):
            allocated = sum(e.self_cpu_memory_usage for e in prof.events()
                            if e.self_cpu_memory_usage > 0)
            result.append(allocated - sum(t.numel() * t.element_size() for t in outputs))
        return result, w.numel() * w.element_size()

    (fwd4, bwd4), w_bytes = extras(4)
    (fwd16, bwd16), _ = extras(16)
    if op == "deform":
        assert bwd16 == bwd4, (bwd4, bwd16)
    bound = 2 * TAP_SPLIT_TARGET_BLOCKS * 64 * 64 * 4 + 64 * 2 * w_bytes + 2 * w_bytes \
        + 2 * (1 << 16) * 8
    assert all(0 < v <= bound for v in (fwd4, fwd16, bwd4, bwd16)), \
        (fwd4, fwd16, bwd4, bwd16, bound)


@pytest.mark.parametrize("transpose", ["auto", "0"])
@pytest.mark.parametrize("op", ["deform", "dilated"])
def test_nchw_input_transposed_or_gathered_by_plane(op, transpose, deterministic_mode, gpu,
                                                    monkeypatch):
    # A contiguous NCHW input with 16-byte channel runs is transposed by nchw_to_nhwc (40
    # channels and 90 pixels: tails of its 32 x 32 tiles both ways), unless turned off: then
    # the kernels gather plane by plane.
    if transpose == "0":
        monkeypatch.setenv("CONVOPS_CUDA_NCHW_TRANSPOSE", "0")
    case = _deform_cases()[3] if op == "deform" else _dilated_cases()[2]
    assert not case["channels_last"] and case["dtype"] in (torch.bfloat16, torch.float16)
    before = emulator.launch_counts()
    if op == "deform":
        _run(lambda c, d: test_deform._check(c, d, test_deform.reference), case, gpu)
    else:
        _run(test_dilated._check, case, gpu, scatter=False)
    if gpu.emulated:
        assert ("nchw_to_nhwc" in _engine_ran(before)) == (transpose == "auto")


def test_dilated_backward_of_an_empty_input_map(gpu):
    # H = 0 with padding gives a 2-row output: the input gradient is empty (the flipped-tap
    # GEMM's map has no pixels), the weight gradient zero. Once a division by zero on the host.
    x = torch.randn(1, 4, 0, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    out = convops.dilated_conv2d(x.to(gpu.device), w.to(gpu.device), None, 1, 1, 1, 2)
    assert out.shape == (1, 4, 2, 7)
    grad_x, grad_w = torch.autograd.grad(out.sum(), [x, w])
    assert grad_x.shape == x.shape and torch.equal(grad_w, torch.zeros_like(w))


@pytest.mark.parametrize("groups", [1, 8], ids=["gemm", "depthwise"])
def test_offset_and_mask_gradients_without_input_gradient(groups, deterministic_mode, gpu):
    # A first DCN layer on images: only offset and mask want gradients. The deterministic
    # kernels then have no fixed-point scale (once a null dereference).
    g = torch.Generator().manual_seed(stable_seed("offset-only", groups))
    x = torch.randn(2, 8, 7, 6, generator=g, dtype=torch.float64)
    w = torch.randn(8, 8 // groups, 3, 3, generator=g, dtype=torch.float64)
    off = torch.randn(2, 18, 7, 6, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(2, 9, 7, 6, generator=g, dtype=torch.float64)
    go = torch.randn(2, 8, 7, 6, generator=g, dtype=torch.float64)

    def grads(device):
        leaves = [t.to(device).requires_grad_() for t in (off, mask)]
        out = convops.deform_conv2d(x.to(device), leaves[0], w.to(device), padding=1,
                                    mask=leaves[1])
        return [t.cpu() for t in torch.autograd.grad(out, leaves, go.to(device))]

    # the CPU op is checked against the reference elsewhere
    for got, ref in zip(grads(gpu.device), grads("cpu")):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
