"""`python -m bench`: time convops against cuDNN/oneDNN (F.conv2d) and torchvision.

Examples:
  python -m bench --quick                       # a minute on a laptop CPU
  python -m bench --device cuda --json r.json --markdown r.md --plot r.png
  ncu --nvtx --nvtx-include "regex:.*/fwd/convops/" --target-processes all \
      python -m bench --device cuda --case replknet-31x31-128@56 --ops fwd --once
  python -m bench --model --dtype fp16         # H100 bytes/FLOPs model, no GPU, no timing
"""
import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import sys

import torch

from . import cases as cases_mod
from . import report
from .metrics import PASSES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quick", action="store_true", help="few cases, fp32, NCHW, short timing")
    p.add_argument("--suite", action="append", help="depthwise, dilated, deform (repeatable)")
    p.add_argument("--case", action="append", help="run only these case names")
    p.add_argument("--ops", "--pass", dest="passes", action="append", choices=PASSES,
                   help="passes to time (default: all four)")
    p.add_argument("--dtype", action="append", choices=list(DTYPES))
    p.add_argument("--layout", action="append", choices=["nchw", "channels_last"])
    p.add_argument("--batch", type=int, help="override every case's N (memory scaling runs)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--tf32", choices=["off", "on"], default="off",
                   help="TF32 policy for fp32 rows, applied to convops and every baseline alike "
                        "(sets cudnn.allow_tf32 and cuda.matmul.allow_tf32; default off)")
    p.add_argument("--once", action="store_true",
                   help="run each selected call once in an NVTX range (ncu): no probes, no "
                        "correctness gate, no timing")
    p.add_argument("--profile", metavar="DIR",
                   help="write a torch.profiler trace per case instead of timing (calls run "
                        "once; nothing is saved as a timing)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--plot", metavar="PATH.png")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--model", action="store_true",
                   help="print the H100 bytes/FLOPs model of the CUDA kernels for the selected "
                        "GPU cases and exit (predictions: nothing is timed, no GPU needed; "
                        "default: the depthwise suite; --suite deform/dilated for the implicit "
                        "GEMM vs torchvision / cuDNN)")
    return p.parse_args(argv)


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=os.path.dirname(__file__),
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def metadata(device: str, quick: bool):
    cuda = device == "cuda"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "driver": None,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "quick": quick,
    }
    if cuda:
        try:
            meta["driver"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                stderr=subprocess.DEVNULL).decode().strip()
        except Exception:
            pass
    return meta


def select_cases(args, cases):
    """The cases that --suite, --case, --quick and --batch select."""
    if args.suite:
        cases = [c for c in cases if c.suite in args.suite]
    if args.case:
        unknown = set(args.case) - {c.name for c in cases}
        if unknown:
            sys.exit(f"unknown case(s): {', '.join(sorted(unknown))}; see --list")
        cases = [c for c in cases if c.name in args.case]
    elif args.quick:
        cases = [c for c in cases if "quick" in c.tags]
    if args.batch:
        cases = [dataclasses.replace(c, N=args.batch) for c in cases]
    return cases


def run_model(args):
    import json
    from . import model, model_gemm
    cases = cases_mod.GPU_CASES  # the model is of the GPU kernels: always the GPU shapes
    if not (args.suite or args.case):
        cases = [c for c in cases if c.suite == "depthwise"]
    cases = select_cases(args, cases)
    if not cases:
        sys.exit("--model: no case selected")
    dtypes = args.dtype or list(DTYPES)
    layouts = args.layout or ["nchw", "channels_last"]
    passes = [p for p in (args.passes or PASSES) if p in model_gemm.MODEL_PASSES]
    if not passes:
        sys.exit(f"--model models the passes {', '.join(model_gemm.MODEL_PASSES)}")
    out, md = {}, []
    depthwise = [c for c in cases if c.suite == "depthwise"]
    if depthwise:
        rows = model.model_rows(depthwise, dtypes, layouts, passes)
        print(model.text_table(rows))
        print("\n".join(model.legend()))
        out["depthwise"] = {"schema": "convops-model/1", "assumptions": model.legend(),
                            "rows": rows}
        md.append(model.markdown(rows))
    gemm = [c for c in cases if c.suite != "depthwise"]
    if gemm:
        rows = model_gemm.model_rows(gemm, dtypes, layouts, passes)
        if depthwise:
            print()
        print(model_gemm.text_table(rows))
        print("\n".join(model_gemm.legend()))
        out["gemm"] = model_gemm.to_json(rows)
        md.append(model_gemm.markdown(rows))
    if args.json:
        # one family keeps its own schema at the top level; both: one object per family
        data = next(iter(out.values())) if len(out) == 1 else {"schema": "convops-model/2",
                                                               **out}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(md))
    return 0


def apply_tf32_policy(policy: str) -> dict:
    """Set both TF32 flags to the policy; returns the previous flags (for restore)."""
    before = {"cudnn": torch.backends.cudnn.allow_tf32,
              "matmul": torch.backends.cuda.matmul.allow_tf32}
    torch.backends.cudnn.allow_tf32 = policy == "on"
    torch.backends.cuda.matmul.allow_tf32 = policy == "on"
    return before


def policy_line(policy: str) -> str:
    return (f"TF32 policy: {policy} for fp32 rows (torch.backends.cudnn.allow_tf32="
            f"{torch.backends.cudnn.allow_tf32}, torch.backends.cuda.matmul.allow_tf32="
            f"{torch.backends.cuda.matmul.allow_tf32}), the same for convops (follows the cuDNN "
            "flag) and every baseline")


def main(argv=None):
    args = parse_args(argv)
    if args.model:
        return run_model(args)
    if args.profile and (args.json or args.markdown or args.plot):
        sys.exit("--profile writes traces only: profiler runs are never saved as timings "
                 "(drop --json/--markdown/--plot)")
    before = apply_tf32_policy(args.tf32)
    try:
        return _run(args)
    finally:
        torch.backends.cudnn.allow_tf32 = before["cudnn"]
        torch.backends.cuda.matmul.allow_tf32 = before["matmul"]


def _run(args):
    from .runner import measure_deferred_memory, run_case  # imports convops
    from .timing import ceilings
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True

    selected = select_cases(args, cases_mod.suites(device))
    if args.list:
        for c in selected:
            print(f"{c.suite:10s} {c.name:32s} N={c.N} C={c.C}->{c.OC} {c.H}x{c.W} k={c.k}")
        return 0

    default_dtypes = ["fp32"] if args.quick else (
        ["fp32", "bf16"] if device == "cpu" else ["fp32", "fp16", "bf16"])
    dtypes = [DTYPES[d] for d in (args.dtype or default_dtypes)]
    layouts = args.layout or (["nchw"] if args.quick else ["nchw", "channels_last"])
    passes = args.passes or (["fwd", "fwd_bwd"] if args.quick else list(PASSES))
    settings = ({"warmup": 1, "repeats": 3, "min_seconds": 0.05} if args.quick else
                {"warmup": 3, "repeats": 10 if device == "cuda" else 5,
                 "min_seconds": 0.3 if device == "cuda" else 0.2})
    once = args.once or bool(args.profile)

    meta = metadata(device, args.quick)
    meta.update(tf32_policy=args.tf32, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, once=once)
    # --once / --profile: no bandwidth or matmul probes (they would flood an ncu run)
    ceil = ceilings(device, meta["device_name"], dtypes, args.tf32 == "on", probe=not once)
    meta["copy_bandwidth_Bps"] = ceil["copy_Bps"]
    meta["copy_bandwidth_source"] = ceil["copy_source"]
    meta["peak_flops"] = ceil["flops"]
    if device == "cuda" and not once:
        from .timing import MAX_BATCH, TARGET_BATCH_S
        meta["timing"] = (f"CUDA events around up to {MAX_BATCH} back-to-back calls (a batch of "
                          f"~{TARGET_BATCH_S * 1e3:.0f} ms) behind a sleep kernel, L2 flushed "
                          "(2x L2 written) before every batch, input sets rotated; host_s = "
                          "host enqueue time per call, reported separately")
    bw = meta["copy_bandwidth_Bps"]
    print(f"convops bench on {meta['device_name']} ({device}), torch {meta['torch']}, "
          f"threads {meta['threads']}, copy bandwidth "
          f"{f'{bw / 1e9:.1f} GB/s' if bw else 'not probed'}", flush=True)
    print(policy_line(args.tf32), flush=True)

    jobs = [(c, dt, lay) for c in selected for dt in dtypes for lay in layouts]
    try:
        from tqdm import tqdm
        progress = tqdm(jobs, desc="bench", unit="case", file=sys.stderr)
    except ImportError:  # tqdm is optional
        progress = jobs
    rows = []
    # CPU peak memory needs a pinned malloc threshold that would skew timings: measured after.
    deferred = [] if device == "cpu" and not once else None
    for case, dtype, layout in progress:
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(f"{case.name} {str(dtype)[6:]} {layout}")
        run = lambda: run_case(case, dtype, device, layout == "channels_last",  # noqa: E731
                               passes, settings, once=once, deferred_memory=deferred)
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            with torch.profiler.profile() as prof:
                rows += run()
            prof.export_chrome_trace(os.path.join(
                args.profile, f"{case.name}-{str(dtype)[6:]}-{layout}.json"))
        else:
            rows += run()
    if deferred:
        measure_deferred_memory(deferred)

    print(report.text_table(rows, meta["copy_bandwidth_Bps"]))
    for key, value in sorted(report.geomeans(rows).items()):
        print(f"geomean {key}: {value:.2f}x")
    print(policy_line(args.tf32))
    if args.json:
        report.write_json(args.json, rows, meta)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown_table(rows, meta))
    if args.plot:
        report.plot(args.plot, rows, meta)
    wrong = [r for r in rows if r.get("status") in ("wrong", "error") and r["impl"] == "convops"]
    if wrong:
        print(f"{len(wrong)} row(s) failed the correctness gate or errored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
