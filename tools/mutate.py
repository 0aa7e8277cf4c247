"""Mutation check: does the test suite catch small, plausible kernel bugs?

Each mutant is one textual edit of one source file (it must match exactly once). For every
mutant this copies the tree to a scratch folder (once), applies the edit, rebuilds the CPU
kernels and the CUDA emulator incrementally (FORCE_CPU=1, the emulator runs the .cu files), runs
the mutant's tests with -x, and restores the file. A mutant is killed when the build fails or a
test fails. Too slow for CI (about a minute per mutant on 2 cores); run it before resolving a
kernel issue and report the score, which must be 100%.

  python tools/mutate.py                 # every mutant
  python tools/mutate.py --only nhwc     # mutants whose name contains "nhwc"
  python tools/mutate.py --list
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DW_CU = "csrc/cuda/depthwise_conv2d.cu"
DW_TESTS = ["tests/test_depthwise.py", "-k",
            "tuned_kernels or misaligned or large_kernels_gpu or huge_stride"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple = tuple(DW_TESTS)


MUTANTS = [
    # --- CUDA depthwise, NHWC 16-byte pack forward --------------------------------------------
    Mutant("nhwc-pack-wrong-channel-block", DW_CU,
           "const index_t ow0 = strip * kStrip, c0 = pack * L;",
           "const index_t ow0 = strip * kStrip, c0 = (pack > 0 ? pack - 1 : 0) * L;"),
    Mutant("nhwc-window-slides-wrong-column", DW_CU,
           "const index_t iw = conv_input_pos<index_t>(ow0 + kStrip - 1, kx, p.sw, p.pw, p.dw);",
           "const index_t iw = conv_input_pos<index_t>(ow0 + kStrip - 2, kx, p.sw, p.pw, p.dw);"),
    Mutant("nhwc-drops-right-border-tap", DW_CU,
           "window[s] = (iw >= 0 && iw < p.W) ? load_pack(row + iw * p.C) : zero_pack<scalar_t>();",
           "window[s] = (iw >= 0 && iw < p.W - 1) ? load_pack(row + iw * p.C) "
           ": zero_pack<scalar_t>();"),
    Mutant("nhwc-weights-of-previous-pack", DW_CU,
           "const Pack w = load_pack(weight_hwc + (ky * p.kw + kx) * p.C + c0);",
           "const Pack w = load_pack(weight_hwc + (ky * p.kw + kx) * p.C + (c0 >= L ? c0 - L : 0));"),
    Mutant("nhwc-last-strip-output-dropped", DW_CU,
           "if (ow0 + s >= p.Wo) break;", "if (ow0 + s >= p.Wo - 1) break;"),
    # --- CUDA depthwise, NCHW tile forward ----------------------------------------------------
    Mutant("nchw-window-slides-wrong-row", DW_CU,
           "window[kRows - 1] = s_in[(row0 + kRows - 1 + ky) * smem_w + col];",
           "window[kRows - 1] = s_in[(row0 + kRows - 2 + ky) * smem_w + col];"),
    Mutant("nchw-missing-barrier-after-staging", DW_CU,
           "      smem[i] = v;\n    }\n    __syncthreads();\n",
           "      smem[i] = v;\n    }\n"),
    Mutant("nchw-missing-barrier-before-next-tile", DW_CU,
           "    __syncthreads();  // the next tile overwrites the shared tile\n", ""),
    Mutant("nchw-plane-ignores-multiplier", DW_CU,
           "plane_info[2 * tid] = (n * p.C + oc / p.M) * p.H * p.W;",
           "plane_info[2 * tid] = (n * p.C + oc % p.C) * p.H * p.W;"),
    Mutant("nchw-bias-of-wrong-channel", DW_CU,
           "const index_t oc = plane_info[2 * threadIdx.z + 1];",
           "const index_t oc = plane_info[2 * threadIdx.z + 1] / p.M;"),
    Mutant("nchw-last-row-of-strip-dropped", DW_CU,
           "if (oy < p.Ho) out[oy * p.Wo]", "if (oy + 1 < p.Ho) out[oy * p.Wo]"),
    # --- CUDA depthwise, input gradient -------------------------------------------------------
    Mutant("igrad-flip-padding-off-by-one", DW_CU,
           "f.ph = flipped_tap_padding(g.kh, g.dh, g.ph);",
           "f.ph = flipped_tap_padding(g.kh, g.dh, g.ph) + 1;"),
    Mutant("igrad-unflipped-filter", DW_CU,
           "const at::Tensor flipped = w.flip({2, 3}).contiguous();",
           "const at::Tensor flipped = w.flip({2}).contiguous();"),
    # --- CUDA depthwise, weight gradient ------------------------------------------------------
    Mutant("wgrad-window-slides-wrong-column", DW_CU,
           "window[kWgTaps - 1] = x_at(base + col + kWgTaps - 1);",
           "window[kWgTaps - 1] = x_at(base + col + kWgTaps - 2);"),
    Mutant("wgrad-sums-not-zeroed", DW_CU,
           "for (int i = tid; i < CB * taps; i += kThreads) s_sum[i] = 0;",
           "for (int i = tid; i < CB * taps; i += kThreads) s_sum[i] = (b == blockIdx.x) ? 0 : s_sum[i];"),
    Mutant("wgrad-skips-last-tile-row", DW_CU,
           "for (int r = 0; r < kWgRows; ++r) {\n          const int base",
           "for (int r = 0; r + 1 < kWgRows; ++r) {\n          const int base"),
    Mutant("wgrad-grad-output-wrong-channel", DW_CU,
           "? grad_out[((n * p.Ho + oy) * p.Wo + ox) * p.OC + oc]",
           "? grad_out[((n * p.Ho + oy) * p.Wo + ox) * p.OC + oc / p.M]"),
    Mutant("wgrad-reduce-drops-last-group", DW_CU,
           "for (int64_t g = 0; g < groups; ++g) acc += partials[g * count + i];",
           "for (int64_t g = 0; g + 1 < groups; ++g) acc += partials[g * count + i];"),
    Mutant("wgrad-tiles-skip-last-group", DW_CU,
           "for (int64_t t = group; t < tiles; t += groups) {",
           "for (int64_t t = group; t < tiles - 1; t += groups) {"),
    # --- CUDA depthwise, launch geometry ------------------------------------------------------
    Mutant("grid-loop-missing", DW_CU,
           "for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {",
           "for (int64_t b = blockIdx.x; b < blocks; b += blocks) {"),
    Mutant("int32-ignores-geometry", DW_CU,
           "geometry_fits && fits_int32(tensors)", "fits_int32(tensors)"),
    Mutant("nhwc-weight-alignment-unchecked", DW_CU,
           "{&x, &w_hwc, &out})) return false;", "{&x, &out})) return false;"),
    Mutant("nchw-tile-plan-too-short", DW_CU,
           "t.tiles_h = (g.Ho + t.tile_h - 1) / t.tile_h;", "t.tiles_h = g.Ho / t.tile_h + (g.Ho < t.tile_h);"),
]

# --- CPU depthwise forward (csrc/cpu/depthwise_forward*.h): the AVX2 and baseline builds ------
# (the AVX-512 build runs its own tests only on a CPU that has it)
DWF = "csrc/cpu/depthwise_forward_kernels.h"
DWF_TESTS = ("tests/test_depthwise.py", "-k", "vectorized")
MUTANTS += [
    Mutant("dwf-interior-starts-one-column-early", DWF,
           "const int64_t lo = std::clamp(j.inner_lo, ow_begin, ow_end);",
           "const int64_t lo = std::clamp(j.inner_lo - 1, ow_begin, ow_end);", DWF_TESTS),
    Mutant("dwf-border-pixel-drops-last-tap", DWF,
           "floor_div<int64_t>(j.W - 1 - iw0, j.dw) + 1)", "floor_div<int64_t>(j.W - 1 - iw0, j.dw))",
           DWF_TESTS),
    Mutant("dwf-border-pixel-skips-first-tap", DWF,
           "std::max<int64_t>(0, ceil_div<int64_t>(-iw0, j.dw))",
           "std::max<int64_t>(0, ceil_div<int64_t>(-iw0, j.dw) + 1)", DWF_TESTS),
    Mutant("dwf-checked-block-reads-past-right-border", DWF,
           "if (ow0 + r >= j.lo[kx] && ow0 + r < j.hi[kx])",
           "if (ow0 + r >= j.lo[kx] && ow0 + r <= j.hi[kx])", DWF_TESTS),
    Mutant("dwf-3x3-held-weights-transposed", DWF,
           "acc[r] = vfma(wv[ky * 3 + kx],", "acc[r] = vfma(wv[kx * 3 + ky],", DWF_TESTS),
    Mutant("dwf-3x3-no-shifted-last-block", DWF,
           "for (int64_t next = lo; next < hi; next += kBlockW) {",
           "for (int64_t next = lo; next + kBlockW <= hi; next += kBlockW) {", DWF_TESTS),
    Mutant("dwf-channel-tail-dropped", DWF, "    if (nch_tail) {", "    if (false && nch_tail) {",
           DWF_TESTS),
    Mutant("dwf-bias-of-first-vector", DWF,
           "const V b = j.bias ? vload(j.bias + cb * kLanes) : vset1(0.f);",
           "const V b = j.bias ? vload(j.bias) : vset1(0.f);", DWF_TESTS),
    Mutant("dwf-nchw-transpose-no-shifted-tail", DWF,
           "for (int64_t next = 0; next < W; next += 8) {",
           "for (int64_t next = 0; next + 8 <= W; next += 8) {", DWF_TESTS),
    Mutant("dwf-nchw-ring-wrong-slot", DWF,
           "rows[ky] = ring + (ih % span) * ring_row;",
           "rows[ky] = ring + ((ih + 1) % span) * ring_row;", DWF_TESTS),
    Mutant("dwf-nchw-ring-skips-rows-between-taps", DWF,
           "std::max({next, ih - span + 1, int64_t(0)})", "std::max({next, ih, int64_t(0)})",
           DWF_TESTS),
    Mutant("dwf-bf16-store-wrong-half", "csrc/cpu/depthwise_forward_x86_8.h",
           "_mm256_packus_epi32(r, r), 0x08)", "_mm256_packus_epi32(r, r), 0x04)", DWF_TESTS),
    Mutant("dwf-baseline-fma-sign", "csrc/cpu/depthwise_forward.h",
           "return _mm_add_ps(_mm_mul_ps(a, b), c);", "return _mm_sub_ps(_mm_mul_ps(a, b), c);",
           DWF_TESTS),
    Mutant("dwf-isa-env-ignored", "csrc/cpu/depthwise_forward.h",
           "if (has_avx2 && !want_base) return &dw_avx2::kIsa;",
           "if (has_avx2) return &dw_avx2::kIsa;", DWF_TESTS),
    Mutant("dwf-weights-packed-flipped", "csrc/cpu/depthwise_conv2d.cpp",
           "wp[((oc / lanes) * taps + t) * lanes + oc % lanes]",
           "wp[((oc / lanes) * taps + (taps - 1 - t)) * lanes + oc % lanes]", DWF_TESTS),
]


def _run(cmd, cwd, log):
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.call(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)


def _build(tree, log):
    env = dict(os.environ, FORCE_CPU="1", FORCE_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    with open(log, "a") as f:
        return subprocess.call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                               env=env, stdout=f, stderr=subprocess.STDOUT)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run mutants whose name contains this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--tree", default="/tmp/convops-mutate", help="scratch copy of the repo")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or args.only in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.name:42s} {m.path}")
        return 0
    for m in mutants:  # every edit must apply to today's source
        text = (ROOT / m.path).read_text()
        assert text.count(m.old) == 1, f"mutant {m.name}: text found {text.count(m.old)} times"
    tree = Path(args.tree)
    if not tree.exists():
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    for m in MUTANTS:  # the scratch tree gets today's sources and tests
        shutil.copy(ROOT / m.path, tree / m.path)
    shutil.copytree(ROOT / "tests", tree / "tests", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    log = tree / "mutate.log"
    assert _build(tree, log) == 0, f"the unmutated tree does not build: {log}"
    results = []
    for m in mutants:
        path = tree / m.path
        original = path.read_text()
        path.write_text(original.replace(m.old, m.new))
        start = time.time()
        try:
            if _build(tree, log) != 0:
                verdict = "killed (build)"
            else:
                rc = _run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "2",
                           "-p", "no:cacheprovider", *m.tests], tree, log)
                verdict = "killed" if rc != 0 else "SURVIVED"
        finally:
            path.write_text(original)
        results.append((m.name, verdict))
        print(f"{m.name:42s} {verdict:15s} {time.time() - start:5.0f} s", flush=True)
    _build(tree, log)
    killed = sum(v.startswith("killed") for _, v in results)
    print(f"mutation score: {killed}/{len(results)} killed")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
