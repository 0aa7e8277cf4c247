"""Kernel lab for the CPU depthwise forward's NHWC rows (AVX-512 build, or AVX2 with --isa avx2):
compile only the in-place rows (nhwc_rows) and the row ring (nhwc_ring_rows), float and bf16, of
csrc/cpu/depthwise_forward_kernels.h, from the working tree or a git revision, into a small
shared library (about 20-60 s on Zen 4, 2 minutes on Zen 3, against 7-11 minutes for the
extension's AVX-512 file), and time variants against oneDNN, interleaved.

  python tools/dwf_lab.py build NAME [--rev REV] [--isa avx2] [-- -DFLAG ...]  # -> /tmp/dwf_lab/NAME.so
  python tools/dwf_lab.py ab THREADS "N,C,H,k,s[,d];..." NAME,NAME [--bf16|--paired] [--ring]
                            [--rounds 5]

`ab` checks each variant against F.conv2d before timing it and prints, per case and variant,
the median time and the median ratio oneDNN / variant. The library skips the op's wrapper
(argument checks, weight packing, dispatch), so its ratios run a few percent above the
harness's (python -m bench): use it to compare kernel variants, the harness for results.
"""
import argparse
import ctypes
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAB = Path("/tmp/dwf_lab")

ENTRY = r'''
#define DWF_LAB_ENTRY(NAME, T, ROWS)                                                            \
  extern "C" void NAME(const T* x, T* y, const float* w, int64_t N, int64_t C, int64_t H,      \
                       int64_t k, int64_t s, int64_t p, int64_t d) {                            \
    DwForwardJob j{};                                                                           \
    j.x = x, j.y = y, j.w = w, j.bias = nullptr;                                                \
    j.N = N, j.C = C, j.H = H, j.W = H, j.OC = C, j.multiplier = 1;                             \
    j.Ho = j.Wo = (H + 2 * p - d * (k - 1) - 1) / s + 1;                                        \
    j.kh = j.kw = k, j.sh = j.sw = s, j.ph = j.pw = p, j.dh = j.dw = d;                         \
    j.inner_lo = 0, j.inner_hi = j.Wo;                                                          \
    for (int64_t kx = 0; kx < k; ++kx) {                                                        \
      const auto r = valid_output_range<int64_t>(kx, j.W, j.Wo, j.sw, j.pw, j.dw);              \
      j.lo[kx] = r.first, j.hi[kx] = r.last;                                                    \
      j.inner_lo = std::max(j.inner_lo, r.first), j.inner_hi = std::min(j.inner_hi, r.last);    \
    }                                                                                           \
    j.stage_pitch = dw_stage_pitch(j, sizeof(T), true);                                         \
    at::parallel_for(0, j.N * j.Ho, 1, [&](int64_t b, int64_t e) { ROWS<T>(j, b, e); });       \
  }
extern "C" int lab_lanes() { return kLanes; }
DWF_LAB_ENTRY(lab_f32, float, nhwc_rows)
DWF_LAB_ENTRY(lab_bf16, c10::BFloat16, nhwc_rows)
DWF_LAB_ENTRY(lab_ring_f32, float, nhwc_ring_rows)
DWF_LAB_ENTRY(lab_ring_bf16, c10::BFloat16, nhwc_ring_rows)
'''
# AVX-512's bf16 channel pairs in even / odd order (the op's default for bf16 channels_last)
PAIRED_ENTRY = "DWF_LAB_ENTRY(lab_pbf16, PairedBF16, nhwc_rows)\n"


def read(path, rev):
    if rev:
        return subprocess.check_output(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], text=True)
    return (ROOT / path).read_text()


def build(name, rev, flags, isa):
    import torch.utils.cpp_extension as ext
    LAB.mkdir(exist_ok=True)
    kernels = read("csrc/cpu/depthwise_forward_kernels.h", rev)
    (LAB / f"{name}_kernels.h").write_text(kernels[:kernels.index("const DwForwardIsa kIsa{")])
    src = read(f"csrc/cpu/depthwise_forward_{isa}.cpp", rev)
    src = src.replace('#include "cpu/depthwise_forward_kernels.h"', f'#include "{name}_kernels.h"')
    src = src.replace('#include "cpu/depthwise_forward.h"',
                      '#include "cpu/depthwise_forward.h"\n#include <ATen/Parallel.h>', 1)
    src = src.replace(f"}}  // namespace dw_{isa}", ENTRY + (PAIRED_ENTRY if isa == "avx512" else "") +
                      f"}}  // namespace dw_{isa}")
    (LAB / f"{name}.cpp").write_text(src)
    lib = Path(ext.include_paths()[0]).parents[0] / "lib"
    cmd = (["g++", "-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", f"-I{ROOT / 'csrc'}",
            f"-I{LAB}"] + [f"-I{p}" for p in ext.include_paths()] + flags +
           [str(LAB / f"{name}.cpp"), "-o", str(LAB / f"{name}.so"), f"-L{lib}", "-lc10",
            "-ltorch_cpu", f"-Wl,-rpath,{lib}"])
    subprocess.check_call(cmd)
    print(LAB / f"{name}.so")


def ab(threads, cases, names, bf16, ring, rounds, paired=False):
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(ROOT))
    from bench.timing import time_interleaved
    torch.set_num_threads(threads)
    dt = torch.bfloat16 if bf16 else torch.float32
    libs = {n: ctypes.CDLL(str(LAB / f"{n}.so")) for n in names}
    for case in cases.split(";"):
        N, C, H, k, s, d = (list(map(int, case.split(","))) + [1])[:6]
        p = d * (k // 2)
        x = torch.randn(N, C, H, H).to(dt).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(C, 1, k, k) * 0.1).to(dt)
        lanes = {lib.lab_lanes() for lib in libs.values()}
        assert len(lanes) == 1, "variants of one ISA only"
        lanes = lanes.pop()
        blocks = (C + lanes - 1) // lanes  # weights as the op packs them: [block][tap][lanes]
        wp = torch.zeros(blocks * lanes, k * k)
        wp[:C] = w.float().view(C, k * k)
        if paired:  # the pairs' blocks in even / odd channel order, as the op packs them
            pb = (C // lanes) // 2 * 2
            order = torch.arange(blocks * lanes)
            cb, l = order // lanes, order % lanes
            order = torch.where(cb < pb, (cb // 2 * 2) * lanes + 2 * l + cb % 2, order)
            wp = wp[order]
        wp = wp.view(blocks, lanes, k * k).transpose(1, 2).contiguous()
        ref = F.conv2d(x, w, None, s, p, d, C)
        Ho = (H + 2 * p - d * (k - 1) - 1) // s + 1

        def variant(lib):
            fn = getattr(lib, "lab_pbf16" if paired else
                         ("lab_ring_" if ring else "lab_") + ("bf16" if bf16 else "f32"))

            def run(_):
                y = torch.empty(N, C, Ho, Ho, dtype=dt, memory_format=torch.channels_last)
                fn(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()),
                   ctypes.c_void_p(wp.data_ptr()), *map(ctypes.c_int64, (N, C, H, k, s, p, d)))
                return y
            return run

        fns = {}
        for n, lib in libs.items():
            fns[n] = variant(lib)
            err = (fns[n](0).float() - ref.float()).abs().max().item()
            assert err < (5e-2 if bf16 else 1e-4), f"{n} is wrong on {case}: max error {err}"
            fns["onednn:" + n] = lambda _: F.conv2d(x, w, None, s, p, d, C)
        runs = [time_interleaved(fns, "cpu", 3, 10, 0.3) for _ in range(rounds)]
        print(f"{case:16s} " + "  ".join(
            f"[{n}] {statistics.median(r[n][0] for r in runs) * 1e3:.3f} ms "
            f"{statistics.median(r['onednn:' + n][0] / r[n][0] for r in runs):.2f}x"
            for n in names), flush=True)


def main():
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("name")
    b.add_argument("--rev")
    b.add_argument("--isa", choices=["avx512", "avx2"], default="avx512")
    a = sub.add_parser("ab")
    a.add_argument("threads", type=int)
    a.add_argument("cases")
    a.add_argument("names")
    a.add_argument("--bf16", action="store_true")
    a.add_argument("--ring", action="store_true", help="the row ring instead of the in-place rows")
    a.add_argument("--rounds", type=int, default=5)
    a.add_argument("--paired", action="store_true",
                   help="bf16 in place in even / odd channel pairs (AVX-512; implies --bf16); only "
                        "for rows the op runs in pairs (3x3, and strided rows up to 7x7): "
                        "elsewhere the channel-order rows read the pair-ordered weights and "
                        "the check against F.conv2d fails")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        build(args.name, args.rev, flags, args.isa)
    else:
        ab(args.threads, args.cases, args.names.split(","), args.bf16 or args.paired, args.ring,
           args.rounds, args.paired)


if __name__ == "__main__":
    main()
