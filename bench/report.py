"""Tables (terminal and markdown), JSON and plots from benchmark rows."""
import json
import math
from typing import List


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table_rows(rows: List[dict], copy_bw: float):
    header = ["case", "pass", "dtype", "layout", "convops ms", "±%", "host us", "GB/s", "%BW",
              "TFLOP/s", "speedups", "peak MB", "status"]
    out = []
    for r in rows:
        if r["impl"] != "convops":
            continue
        speedups = ", ".join(f"{k[11:]} {v:.2f}x" for k, v in r.items()
                             if k.startswith("speedup_vs_"))
        ok = r.get("status") == "ok"
        out.append([
            r["case"], r["pass_"], r["dtype"], r["layout"],
            _fmt(r.get("median_s", 0) * 1e3, ".3f") if ok else "-",
            _fmt(100 * r.get("spread", 0), ".0f") if ok else "-",
            _fmt(r["host_s"] * 1e6 if r.get("host_s") is not None else None, ".1f"),
            _fmt(r.get("gbps"), ".1f"),
            _fmt(100 * r["gbps"] * 1e9 / copy_bw if ok and copy_bw else None, ".0f"),
            _fmt(r.get("tflops"), ".3f"),
            speedups or "-",
            _fmt(r["peak_extra_bytes"] / 2**20 if r.get("peak_extra_bytes") is not None
                 else None, ".1f"),
            r.get("status") + (f" ({r['reason']})" if r.get("reason") else ""),
        ])
    return header, out


def text_table(rows, copy_bw) -> str:
    header, body = table_rows(rows, copy_bw)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)] if body else \
        [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def summary_table(rows) -> str:
    """A compact markdown table: per case, convops time and speedup vs the main baseline for
    fwd and fwd+bwd, per dtype/layout column."""
    ours = [r for r in rows if r["impl"] == "convops"]
    combos = sorted({(r["dtype"], r["layout"]) for r in ours},
                    key=lambda c: (c[0] != "float32", c[1] != "nchw", c))
    main_key = {"depthwise": ["onednn", "cudnn", "pytorch-dw"],
                "dilated": ["onednn", "cudnn", "aten-slow-dilated"],
                "deform": ["torchvision"]}
    header = ["suite", "case", "pass"] + [f"{d} {l}" for d, l in combos]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cases = []
    for r in ours:
        if (r["suite"], r["case"]) not in cases:
            cases.append((r["suite"], r["case"]))
    for suite, case in cases:
        for pass_name in ("fwd", "fwd_bwd"):
            cells = []
            for dtype, layout in combos:
                match = [r for r in ours if r["case"] == case and r["pass_"] == pass_name and
                         r["dtype"] == dtype and r["layout"] == layout]
                if not match or match[0].get("status") != "ok":
                    cells.append(match[0].get("status", "-") if match else "-")
                    continue
                r = match[0]
                base = next((f"{r['speedup_vs_' + k]:.2f}x {k}" for k in main_key[suite]
                             if ("speedup_vs_" + k) in r), None)
                if base is None:  # the baseline could not run this dtype
                    missing = next((b["impl"] for b in rows if b["case"] == case and
                                    b["pass_"] == pass_name and b["dtype"] == dtype and
                                    b["layout"] == layout and b["impl"] in main_key[suite]),
                                   "baseline")
                    base = f"{missing}: no {dtype}"
                cells.append(f"{r['median_s'] * 1e3:.2f} ms ({base})")
            lines.append(f"| {suite} | {case} | {pass_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(rows, meta) -> str:
    header, body = table_rows(rows, meta.get("copy_bandwidth_Bps"))
    lines = [f"# convops benchmark — {meta['device_name']} ({meta['date']})", "",
             f"torch {meta['torch']}, CUDA {meta.get('cuda') or '-'}, cuDNN "
             f"{meta.get('cudnn') or '-'}, threads {meta.get('threads')}, commit "
             f"{meta.get('git_commit')}, copy bandwidth "
             + (f"{meta['copy_bandwidth_Bps'] / 1e9:.1f} GB/s" if meta.get("copy_bandwidth_Bps")
                else "not probed") + ".", "",
             f"TF32 policy: {meta.get('tf32_policy', '-')} for fp32 rows, applied to convops "
             f"and every baseline (cudnn.allow_tf32={meta.get('cudnn_allow_tf32')}, "
             f"cuda.matmul.allow_tf32={meta.get('matmul_allow_tf32')}).", "",
             f"Timing: {meta.get('timing', 'per call (perf_counter)')}.", "",
             "Speedup = baseline time / convops time (>1: convops faster). "
             "onednn/cudnn/pytorch-dw = F.conv2d(groups=...) labelled by the backend PyTorch "
             "ran (its selection rules, and on CUDA the kernel names); cudnn-direct = "
             "aten::cudnn_convolution where F.conv2d picks another backend. Deformable "
             "bwd_input/bwd_weight are not compared with torchvision, whose backward computes "
             "every gradient: see the bwd pass.", "",
             "## Summary (convops time and speedup over the main baseline)", "",
             summary_table(rows), "## All rows", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    notes = sorted({r["baseline_inaccurate"] for r in rows if r.get("baseline_inaccurate")})
    if notes:
        lines += ["", "Baseline rows that disagreed with their own float64 result (convops "
                  "matched float64):"] + [f"- {n}" for n in notes]
    geo = geomeans(rows)
    if geo:
        lines += ["", "Geometric-mean speedups (ok rows): " +
                  "; ".join(f"{k}: {v:.2f}x" for k, v in sorted(geo.items()))]
    return "\n".join(lines) + "\n"


def geomeans(rows) -> dict:
    acc = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("speedup_vs_") and v:
                key = f"{r['suite']} {r['pass_']} vs {k[11:]}"
                acc.setdefault(key, []).append(math.log(v))
    return {k: math.exp(sum(v) / len(v)) for k, v in acc.items()}


def write_json(path, rows, meta):
    with open(path, "w") as f:
        json.dump({"schema": "convops-bench/1", "meta": meta, "rows": rows}, f, indent=1,
                  default=str)


def plot(path, rows, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["impl"] == "convops" and r.get("status") == "ok"]
    suites = sorted({r["suite"] for r in ours}) or ["(none)"]
    fig, axes = plt.subplots(1, len(suites) + 1, figsize=(6 * (len(suites) + 1), 5))
    for ax, suite in zip(axes, suites):
        sel = [r for r in ours if r["suite"] == suite]
        keys = sorted({k for r in sel for k in r if k.startswith("speedup_vs_")})
        labels = [f"{r['case']}\n{r['pass_']} {r['dtype']} {r['layout'][:2]}" for r in sel]
        width = 0.8 / max(len(keys), 1)
        for j, k in enumerate(keys):
            ax.bar([i + j * width for i in range(len(sel))], [r.get(k) or 0 for r in sel],
                   width, label=k[11:])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(labels, rotation=90, fontsize=5)
        ax.set_ylabel("speedup (baseline / convops)")
        ax.set_title(f"{suite} — {meta['device_name']}")
        ax.legend(fontsize=7)
    ax = axes[-1]
    bw = meta.get("copy_bandwidth_Bps")
    for r in ours:
        intensity = r["flops"] / r["bytes"]
        ax.scatter(intensity, r["flops"] / r["median_s"], s=10,
                   label=r["suite"] if r is ours[0] else None)
    xs = [10 ** (i / 10) for i in range(-10, 41)]
    # one ceiling per dtype: a tensor-core or TF32 peak is not an fp32 matmul's
    for dtype, (peak, source) in sorted((meta.get("peak_flops") or {}).items()):
        if bw:
            ax.plot(xs, [min(x * bw, peak) for x in xs], "--", lw=0.8,
                    label=f"{dtype} ceiling ({source})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / minimum byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title("roofline")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None):
    """Re-render a saved run: python -m bench.report RESULT.json [--markdown M] [--plot P]."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m bench.report")
    p.add_argument("json")
    p.add_argument("--markdown")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(data["rows"], data["meta"]))
    if args.plot:
        plot(args.plot, data["rows"], data["meta"])
    if not (args.markdown or args.plot):
        print(text_table(data["rows"], data["meta"]["copy_bandwidth_Bps"]))


if __name__ == "__main__":
    main()
