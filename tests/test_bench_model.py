"""The H100 bytes-and-FLOPs model (`python -m bench --model`): bounds, FLOPs, the CLI on CPU."""
import json
import os
import subprocess
import sys

import pytest

from bench import model
from bench.cases import GPU_CASES, Case
from bench.metrics import PASSES, pass_bytes, pass_flops

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
