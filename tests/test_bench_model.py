"""The H100 bytes-and-FLOPs model (`python -m bench --model`): bounds, FLOPs, the CLI on CPU."""
import json
import math
import os
import subprocess
import sys

import pytest

from bench import model
from bench.cases import GPU_CASES, Case
from bench.metrics import pass_bytes, pass_flops
from bench.model_gemm import MODEL_PASSES as PASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTHWISE = [c for c in GPU_CASES if c.suite == "depthwise"]


@pytest.fixture(scope="module")
def rows():
    return model.model_rows(DEPTHWISE)


def test_every_case_dtype_layout_pass_is_modeled(rows):
    assert len(rows) == len(DEPTHWISE) * 3 * 2 * len(PASSES)


def test_design_moves_at_least_the_minimum_and_the_floor_is_positive(rows):
    for r in rows:
        what = f"{r['case']} {r['dtype']} {r['layout']} {r['pass_']}"
        assert r["design_bytes"] >= r["min_bytes"] > 0, what
        assert 0 < r["floor_s"] < 1 and 0 < r["baseline_s"] < 1, what
        assert r["floor_s"] >= r["design_bytes"] / model.DRAM_BPS * (1 - 1e-12), what


def test_minimum_bytes_and_flops_match_the_bench_metrics(rows):
    by_name = {c.name: c for c in DEPTHWISE}
    for r in rows:
        case = by_name[r["case"]]
        ho, wo = case.out_hw
        per_pass = 2 * case.N * case.OC * ho * wo * case.k[0] * case.k[1]
        assert r["flops"] == per_pass * (3 if r["pass_"] == "fwd_bwd" else 1)
        assert r["flops"] == pass_flops(case, r["pass_"])
        assert r["min_bytes"] == pass_bytes(case, r["pass_"], model.ELEM[r["dtype"]])


def test_design_parameters_by_hand():
    # 56x56 output: tile_w = 32, threads_y = clamp(next_pow2(7), 1, 256/32) = 8 -> 64 x 32
    g = model.Geometry.of(next(c for c in DEPTHWISE if c.name == "replknet-31x31-128@56"))
    assert model.nchw_tile(g) == (64, 32)
    # 14x14 output: tile_w = 16, threads_y = 2
    g14 = model.Geometry.of(next(c for c in DEPTHWISE if c.name == "mbv2-3x3-576@14"))
    assert model.nchw_tile(g14) == (16, 16)
    # weight-grad, k=31: a channel stages (34 * 62 | 1) + (4 * 32 | 1) + 31 * 31 = 3199 fp32,
    # so 2 channels fit 48 KiB: 64 channel blocks, G = ceil(528 / 64) = 9 groups of 128 * 31²
    assert model.wgrad_channel_block(g) == 2
    assert model.wgrad_partials(g, 4) == 9 * 128 * 31 * 31 * 4
    # one 3x3 plane, 4 rows, padding 1: the halo rows each tile stages (edges clipped)
    assert model._staged(8, 4, 1, 3, 1, 8) == 5 + 5


def test_stride1_input_grad_is_the_forward_over_grad_output():
    case = Case("t", "depthwise", 2, 16, 20, 20, 16, (5, 5), 1, 2, 1, groups=16)
    g = model.Geometry.of(case)
    for layout in ("nchw", "channels_last"):
        assert model.input_grad(g, layout, 2) == model.forward(g, layout, 2)


def test_cli_prints_the_model_on_cpu_without_timing(tmp_path):
    out_json = tmp_path / "m.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "bench", "--model", "--case", "mbv2-3x3-32@112",
                           "--json", str(out_json)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("mbv2-3x3-32@112")]
    assert len(lines) == 3 * 2 * len(PASSES)
    assert "cuDNN-est" in proc.stdout and "67 TFLOP/s" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["schema"] == "convops-model/1" and len(data["rows"]) == len(lines)


def test_model_does_not_import_the_extension():
    code = ("import sys; from bench.__main__ import main; "
            "assert main(['--model', '--dtype', 'bf16', '--layout', 'nchw']) == 0; "
            "assert 'convops' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- deformable and dilated: convops' implicit GEMM vs torchvision / cuDNN (issue #12) --------
from bench import model_gemm  # noqa: E402

DCN = Case("d", "deform", 2, 4, 6, 6, 8, (3, 3), 1, 1, 1, groups=1, offset_groups=1, mask=True)
# 128-wide rows: each 64-pixel tile lies in one output row, so padding rows are skipped per tile
DIL = Case("a", "dilated", 1, 2, 5, 128, 2, (3, 3), 1, 2, 2)


def _row(rows, dtype, layout, pass_):
    return next(r for r in rows if (r["dtype"], r["layout"], r["pass_"]) == (dtype, layout, pass_))


def test_deform_forward_by_hand():
    # Ho = Wo = 6, P = 72 pixels, X = 288, Y = 576, W = 8·4·9 = 288, offset+mask = 3·2·9·36 =
    # 1944, samples S = 4·9·72 = 2592, MACs = 8·72·36 = 20736; fp16 (2 bytes)
    r = _row(model_gemm.model_rows([DCN], ["fp16"], ["nchw"]), "fp16", "nchw", "fwd")
    ours, tv = r["convops"], r["base"]
    # convops: input, offsets/mask, output, weights once; no transpose (coalesced NCHW gathers)
    assert ours["dram"] == (288 + 1944 + 576 + 288) * 2
    assert ours["l2"] == 288 * 2  # the weights again for the second 64-pixel tile
    assert ours["flops"] == 2 * 20736 + 8 * 2592  # GEMM + bilinear sampling
    # torchvision, n_par = 2, one chunk: zeros(out, out_buf, columns), im2col (input, offsets,
    # columns written), addmm (columns, weights, out_buf read+write), transpose copy + bias
    assert tv["dram"] == (2 * 576 + 2592) * 2 + (288 + 1944 + 2592) * 2 + \
        (2592 + 288 + 2 * 576) * 2 + 4 * 576 * 2
    assert tv["flops"] == ours["flops"]
    # floor: the GEMM kernel bound by its DRAM bytes
    gemm = max((288 + 1944 + 576 + 288) * 2 / 3e12, 2 * 20736 / 790e12 + 8 * 2592 / 67e12)
    assert math.isclose(ours["floor_s"], gemm)
    assert r["ratio"] == tv["floor_s"] / ours["floor_s"] > 1


def test_deform_backward_by_hand():
    rows = model_gemm.model_rows([DCN], ["fp32"], ["channels_last"])
    bi = _row(rows, "fp32", "channels_last", "bwd_input")["convops"]
    # fp32 scatters into grad_input itself: zero it (X), then the fused kernel (grad_out, W,
    # X, offsets/mask read and their grads written); no buffer, no cast
    assert bi["dram"] == 4 * 288 + (576 + 288 + 288 + 2 * 1944) * 4
    # grad_out resident in shared memory; W again for the second 64-pixel tile (72 pixels),
    # four fp32 atomics per sample
    assert bi["l2"] == 288 * 4 + 4 * 2592 * 4
    bw = _row(rows, "fp32", "channels_last", "bwd_weight")["convops"]
    # one output tile (8 x 36 -> 1 x 1 tiles), split-K = min(64, 3 slices of 32 pixels) = 3
    assert bw["dram"] == (576 + 288 + 1944) * 4 + 3 * 288 * 4 + (3 * 288 * 4 + 288 * 4)
    total = _row(rows, "fp32", "channels_last", "fwd_bwd")
    assert math.isclose(total["convops"]["floor_s"], sum(
        _row(rows, "fp32", "channels_last", p)["convops"]["floor_s"]
        for p in ("fwd", "bwd_input", "bwd_weight")))


def test_dilated_by_hand():
    # Ho = 5, Wo = 128: ten tiles, two per row; live filter rows per output row 2, 2, 3, 2, 2 of 3
    assert model_gemm.valid_tap_fraction(DIL) == 11 / 15
    r = _row(model_gemm.model_rows([DIL], ["fp32"], ["channels_last"]), "fp32",
             "channels_last", "fwd")
    x = y = 2 * 5 * 128
    w = 2 * 2 * 9
    macs = 2 * 640 * 18
    assert r["base"]["dram"] == r["convops"]["dram"] == (x + w + y) * 4
    assert r["base"]["l2"] == w * 4 * 9  # weights re-read by the 9 further 64-pixel N-tiles
    assert r["base"]["flops"] == 2 * macs  # cuDNN: every tap
    assert r["convops"]["flops"] == 2 * macs * 11 / 15
    assert math.isfinite(r["ratio"]) and r["ratio"] >= 1


def test_issue_shapes_have_finite_ratios_except_torchvision_bf16():
    cases = [c for c in GPU_CASES if c.suite in ("deform", "dilated")]
    for r in model_gemm.model_rows(cases):
        if r["suite"] == "deform" and r["dtype"] == "bf16":
            assert r["ratio"] is None and r["base"] is None  # torchvision has no bf16
            continue
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert r["convops"]["dram"] > 0 and r["base"]["dram"] > 0


def test_cli_prints_gemm_predictions_and_every_assumption(tmp_path):
    out_json = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--model", "--case", "r50-dcn-256@64",
                           "--case", "aspp-2048-256-d36@65", "--dtype", "fp16", "--json",
                           str(out_json)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr
    for line in model_gemm.legend():
        assert line in proc.stdout
    assert "PREDICTIONS" in proc.stdout and "torchvision" in proc.stdout
    assert "cudnn" in proc.stdout and "pred. ratio" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["schema"] == "convops-model-gemm/1"
    assert len(data["rows"]) == 2 * 2 * len(PASSES)
