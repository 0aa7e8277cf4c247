"""The benchmark harness: byte/FLOP formulas, JSON schema, a tiny CPU run, the correctness gate."""
import json

import pytest

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
                    "flops", "median_s", "spread", "gbps", "tflops", "host_s",
                    "cudnn_allow_tf32", "matmul_allow_tf32"]:
            assert key in row, key
        assert row["status"] == "ok"
    ours = [r for r in data["rows"] if r["impl"] == "convops"]
    # the baseline is labelled by the backend PyTorch ran (oneDNN or aten's slow conv on CPU)
    labels = {r["impl"] for r in data["rows"] if r["impl"] != "convops"}
    assert len(labels) == 1 and labels <= {"onednn", "aten-slow"}
    assert all(f"speedup_vs_{next(iter(labels))}" in r for r in ours)
    assert "| tiny-dw |" in out_md.read_text()
    assert out_png.stat().st_size > 1000


# --- fair GPU numbers (issue #16 item 8): what can be checked without a GPU ------------------

DW = Case("tiny-dw", "depthwise", 1, 8, 12, 12, 8, (3, 3), 1, 1, 1, groups=8, tags=("quick",))
DCN = Case("tiny-dcn", "deform", 2, 4, 7, 7, 6, (3, 3), 1, 1, 1, tags=("quick",))


def _main_json(tmp_path, monkeypatch, cases, *args):
    monkeypatch.setattr(bench_main.cases_mod, "suites", lambda device: list(cases))
    out = tmp_path / "r.json"
    code = bench_main.main(["--device", "cpu", "--quick", "--json", str(out), *args])
    return code, json.loads(out.read_text())


def test_gate_uses_the_tests_tolerances():
    from conftest import TOLERANCES
    from bench.runner import GATE_TOL, gate_tolerance
    assert GATE_TOL == TOLERANCES
    # TF32 keeps fp16's mantissa: fp32 rows under TF32 get fp16's bound, never a looser one
    assert gate_tolerance(torch.float32, True) == TOLERANCES[torch.float16]
    assert gate_tolerance(torch.float32, False) == TOLERANCES[torch.float32]


def test_gate_fails_an_error_the_old_5_percent_gate_passed():
    from bench.impls import implementations
    impls = implementations(DW)
    wrong = dict(impls["convops"])
    wrong["fwd"] = lambda t, f=impls["convops"]["fwd"]: f(t) * 1.03  # within 5%, beyond 1.6%
    rows = run_case(DW, torch.bfloat16, "cpu", False, ["fwd"], SETTINGS,
                    implementations={"convops": wrong, "torch": impls["torch"]})
    assert rows[0]["status"] == "wrong", rows[0]


@pytest.mark.parametrize("policy", ["off", "on"])
def test_tf32_policy_is_applied_recorded_and_restored(tmp_path, monkeypatch, policy):
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    code, data = _main_json(tmp_path, monkeypatch, [DW], "--tf32", policy)
    assert code == 0
    on = policy == "on"
    assert data["meta"]["tf32_policy"] == policy
    assert data["meta"]["cudnn_allow_tf32"] is on and data["meta"]["matmul_allow_tf32"] is on
    for row in data["rows"]:  # every row, convops and baselines alike, under the same flags
        assert row["cudnn_allow_tf32"] is on and row["matmul_allow_tf32"] is on
        assert row["tf32_in_row"] is on  # fp32 rows
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_policy_is_printed(tmp_path, monkeypatch, capsys):
    _main_json(tmp_path, monkeypatch, [DW])
    assert "TF32 policy: off for fp32 rows" in capsys.readouterr().out


def test_once_skips_probes_and_gate(tmp_path, monkeypatch):
    from bench import runner, timing

    def boom(*a, **k):
        raise AssertionError("--once must not run this")
    for name in ("copy_bandwidth", "matmul_flops"):
        monkeypatch.setattr(timing, name, boom)
    monkeypatch.setattr(runner, "gate", boom)
    monkeypatch.setattr(runner, "time_interleaved", boom)
    code, data = _main_json(tmp_path, monkeypatch, [DW], "--once")
    assert code == 0
    assert data["meta"]["copy_bandwidth_Bps"] is None and data["meta"]["once"] is True
    assert {r["status"] for r in data["rows"]} == {"ran-once"}
    assert not any("median_s" in r for r in data["rows"])


def test_a_cuda_oom_is_reported_and_never_retried():
    from bench.impls import implementations
    impls = implementations(DW)
    calls = []

    def oom(t):
        calls.append(t["x"].dtype)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    baseline = dict(impls["torch"], fwd=oom)
    rows = run_case(DW, torch.bfloat16, "cpu", False, ["fwd"], SETTINGS,
                    implementations={"convops": impls["convops"], "torch": baseline})
    ours = rows[0]
    assert ours["status"] == "oom" and "out of memory" in ours["reason"]
    assert "median_s" not in ours
    # the gate's float64 reference, then the baseline's own bf16 call: never a float32 retry
    assert calls == [torch.float32, torch.bfloat16]  # CPU gate reference: float32
    # an OOM while timing a baseline (after it served as the gate's reference): that row says
    # oom, convops is still timed
    served = []

    def oom_after_gate(t):
        if not served:
            served.append(1)
            return impls["torch"]["fwd"](t)
        return oom(t)
    calls.clear()
    rows = run_case(DW, torch.float32, "cpu", False, ["fwd"], SETTINGS,
                    implementations={"convops": impls["convops"],
                                     "torch": dict(impls["torch"], fwd=oom_after_gate)})
    assert rows[0]["status"] == "ok" and rows[1]["status"] == "oom"
    assert calls == [torch.float32]  # one try in its own dtype, no retry


def test_ceilings_are_per_dtype_and_not_probed_on_h100(monkeypatch):
    from bench import timing

    def boom(*a, **k):
        raise AssertionError("an H100 uses the table")
    monkeypatch.setattr(timing, "matmul_flops", boom)
    dts = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    off = timing.ceilings("cuda", "NVIDIA H100 80GB HBM3", dts, tf32=False, probe=False)
    assert {k: v[0] for k, v in off["flops"].items()} == {
        "float16": 790e12, "bfloat16": 790e12, "float32": 67e12, "float64": 67e12}
    assert off["copy_Bps"] == 3.0e12
    on = timing.ceilings("cuda", "NVIDIA H100 80GB HBM3", dts, tf32=True, probe=False)
    assert on["flops"]["float32"][0] == 495e12 and on["flops"]["float16"][0] == 790e12
    # elsewhere each selected dtype gets its own measured matmul, not fp32's for all
    seen = []
    monkeypatch.setattr(timing, "matmul_flops", lambda dev, dt: seen.append(dt) or 1.0)
    monkeypatch.setattr(timing, "copy_bandwidth", lambda dev: 2.0)
    cpu = timing.ceilings("cpu", "some cpu", [torch.float32, torch.bfloat16], False, True)
    assert seen == [torch.float32, torch.bfloat16]
    assert set(cpu["flops"]) == {"float32", "bfloat16"}


def test_profiler_runs_are_never_saved_as_timings(tmp_path, monkeypatch):
    from bench.timing import time_interleaved
    with torch.profiler.profile():
        with pytest.raises(RuntimeError, match="never timings"):
            time_interleaved({"a": lambda i: None}, "cpu", 0, 1, 0.0)
    monkeypatch.setattr(bench_main.cases_mod, "suites", lambda device: [DW])
    with pytest.raises(SystemExit, match="never saved as timings"):
        bench_main.main(["--device", "cpu", "--quick", "--profile", str(tmp_path / "p"),
                         "--json", str(tmp_path / "r.json")])
    assert bench_main.main(["--device", "cpu", "--quick", "--profile",
                            str(tmp_path / "p")]) == 0
    assert any(p.suffix == ".json" for p in (tmp_path / "p").iterdir())
    assert not (tmp_path / "r.json").exists()


class FakeClock:
    """Stands in for the CUDA events: logs the order of flush, sleep, events and calls."""

    def __init__(self):
        self.log, self.t = [], 0.0

    flush_bytes = 1

    def flush(self):
        self.log.append("flush")

    def sleep(self, s):
        self.log.append("sleep")

    def record(self):
        self.log.append("event")
        self.t += 1.0
        return self.t

    def elapsed(self, a, b):
        return b - a

    def synchronize(self):
        pass


def test_cuda_timer_batches_calls_between_one_event_pair_after_a_flush():
    from bench.timing import time_interleaved
    clock = FakeClock()

    def fn(key):
        return lambda i: clock.log.append((key, i))
    res = time_interleaved({"a": fn("a"), "b": fn("b")}, "cuda", warmup=1, repeats=2,
                           min_seconds=0.0, clock=clock)
    log = clock.log
    starts = [i for i, e in enumerate(log) if e == "event"][::2]
    for s in starts:  # every event pair is preceded by an L2 flush (and maybe a sleep)
        assert log[s - 1] in ("flush", "sleep") and "flush" in log[s - 2:s]
    timed = [e for e in log[starts[-4]:] if isinstance(e, tuple)]  # the 2 rounds x 2 impls
    keys = [k for j, (k, _) in enumerate(timed) if j == 0 or timed[j - 1][0] != k]
    assert keys == ["a", "b", "a", "b"]  # whole batches, interleaved per round
    # within a batch the calls rotate through the input sets (consecutive indices)
    a_idx = [i for k, i in timed if k == "a"]
    assert len(a_idx) > 1 and len(set(a_idx)) == len(a_idx)
    for key in ("a", "b"):
        median, spread, samples, host = res[key]
        assert samples == 2 and median > 0 and host is not None and host >= 0


def test_backend_labels():
    from bench.impls import classify_kernels, label, select_backend
    t = {"x": torch.randn(1, 8, 12, 12), "w": torch.randn(8, 1, 3, 3)}
    backend = select_backend(DW, t["x"], t["w"])
    assert backend in ("Mkldnn", "Slow2d", "CudaDepthwise2d", "Cudnn"), backend
    assert label("torch", {"backend": "CudaDepthwise2d"}) == "pytorch-dw"
    assert label("torch", {"backend": "Cudnn"}) == "cudnn"
    assert label("torch", {"backend": "Mkldnn"}) == "onednn"
    assert classify_kernels(["void at::native::(anonymous namespace)::"
                             "conv_depthwise2d_forward_kernel<3, float, int>(...)"]) == \
        "CudaDepthwise2d"
    assert classify_kernels(["sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc"]) == \
        "Cudnn"
    rows = run_case(DW, torch.float32, "cpu", False, ["fwd"], SETTINGS)
    assert rows[1]["backend"] == backend and rows[1]["impl"] == label("torch",
                                                                      {"backend": backend})


def test_deform_backward_compares_like_with_like():
    rows = run_case(DCN, torch.float32, "cpu", False, ["bwd_input", "bwd_weight", "bwd"],
                    SETTINGS)
    by = {(r["pass_"], r["impl"]): r for r in rows}
    for p in ("bwd_input", "bwd_weight"):
        assert by[(p, "convops")]["status"] == "ok"  # gated against torchvision's values
        assert by[(p, "torchvision")]["status"] == "n/a"
        assert "every gradient" in by[(p, "torchvision")]["reason"]
        assert "speedup_vs_torchvision" not in by[(p, "convops")]
    assert by[("bwd", "torchvision")]["status"] == "ok"
    assert "speedup_vs_torchvision" in by[("bwd", "convops")]
