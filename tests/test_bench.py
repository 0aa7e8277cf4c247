"""The benchmark harness: byte/FLOP formulas, JSON schema, a tiny CPU run, the correctness gate."""
import json

import torch

from bench import __main__ as bench_main
from bench.cases import Case
from bench.metrics import pass_bytes, pass_flops
from bench.runner import run_case

SETTINGS = {"warmup": 0, "repeats": 1, "min_seconds": 0.0}


def test_depthwise_formulas_by_hand():
    # N=2, C=3, 8x8, 3x3, stride 1, padding 1 -> 8x8 output; 3 filters of 9 taps.
    case = Case("t", "depthwise", 2, 3, 8, 8, 3, (3, 3), 1, 1, 1, groups=3)
    x = y = 2 * 3 * 8 * 8  # 384
    w = 3 * 9
    assert pass_bytes(case, "fwd", 4) == (x + w + y) * 4
    assert pass_bytes(case, "bwd_input", 2) == (y + w + x) * 2
    assert pass_bytes(case, "bwd_weight", 4) == (y + x + w) * 4
    assert pass_bytes(case, "fwd_bwd", 4) == 3 * (x + w + y) * 4
    assert pass_flops(case, "fwd") == 2 * 384 * 9
    assert pass_flops(case, "fwd_bwd") == 3 * 2 * 384 * 9


def test_strided_output_size():
    case = Case("t", "depthwise", 1, 4, 56, 56, 4, (3, 3), 2, 1, 1, groups=4)
    assert case.out_hw == (28, 28)
    assert pass_flops(case, "fwd") == 2 * 4 * 28 * 28 * 9


def test_correctness_gate_refuses_a_wrong_kernel():
    case = Case("t", "depthwise", 1, 4, 10, 10, 4, (3, 3), 1, 1, 1, groups=4)
    from bench.impls import implementations
    impls = implementations(case)
    wrong = dict(impls["convops"])
    wrong["fwd"] = lambda t, f=impls["convops"]["fwd"]: f(t) * 1.01  # 1% off
    rows = run_case(case, torch.float32, "cpu", False, ["fwd"], SETTINGS,
                    implementations={"convops": wrong, "torch": impls["torch"]})
    ours = rows[0]
    assert ours["impl"] == "convops" and ours["status"] == "wrong"
    assert "median_s" not in ours and "reason" in ours
    good = run_case(case, torch.float32, "cpu", False, ["fwd", "bwd_weight"], SETTINGS)
    assert all(r["status"] == "ok" for r in good)


def test_tiny_cpu_run_writes_json_markdown_and_plot(tmp_path, monkeypatch):
    tiny = Case("tiny-dw", "depthwise", 1, 8, 12, 12, 8, (3, 3), 1, 1, 1, groups=8,
                tags=("quick",))
    monkeypatch.setattr(bench_main.cases_mod, "suites", lambda device: [tiny])
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    code = bench_main.main(["--device", "cpu", "--quick", "--json", str(out_json),
                            "--markdown", str(out_md), "--plot", str(out_png), "--layout",
                            "channels_last", "--layout", "nchw", "--dtype", "bf16"])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert data["schema"] == "convops-bench/1"
    for key in ["device", "device_name", "torch", "cuda", "cudnn", "driver", "cpu", "threads",
                "git_commit", "date", "copy_bandwidth_Bps"]:
        assert key in data["meta"]
    assert len(data["rows"]) == 2 * 2 * 2  # 2 layouts x 2 passes x 2 implementations
    for row in data["rows"]:
        for key in ["case", "suite", "pass_", "dtype", "layout", "impl", "status", "bytes",
                    "flops", "median_s", "spread", "gbps", "tflops"]:
            assert key in row, key
        assert row["status"] == "ok"
    ours = [r for r in data["rows"] if r["impl"] == "convops"]
    assert all("speedup_vs_onednn" in r for r in ours)
    assert "| tiny-dw |" in out_md.read_text()
    assert out_png.stat().st_size > 1000
