"""Mutation check: does the test suite catch small, plausible kernel bugs?

Each mutant is one textual edit of one source file (it must match exactly once). For every
mutant this copies the tree to a scratch folder (once), applies the edit, rebuilds the CPU
kernels and the CUDA emulator incrementally (FORCE_CPU=1, the emulator runs the .cu files), runs
the mutant's tests with -x, and restores the file. A mutant is killed when the build fails or a
test fails. Too slow for CI (about a minute per mutant on 2 cores); run it before resolving a
kernel issue and report the score, which must be 100%.

  python tools/mutate.py                 # every mutant
  python tools/mutate.py --only nhwc     # mutants whose name contains "nhwc"
  python tools/mutate.py --only a,b      # ... "a" or "b" (split a run over two scratch trees)
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
IG_CUH = "csrc/cuda/implicit_gemm.cuh"
IG_TESTS = ["tests/test_implicit_gemm.py"]
DW_TESTS = ["tests/test_depthwise.py", "-k",
            "tuned_kernels or misaligned or large_kernels_gpu or huge_stride"]
# CPU kernels: the op's CPU tests (emulated CUDA tests excluded) and the realistic grids.
DW_CPU, DW_NHWC = "csrc/cpu/depthwise_conv2d.cpp", "csrc/cpu/nhwc_kernels.h"
DIRECT, DIL_CPU = "csrc/cpu/direct_conv.h", "csrc/cpu/dilated_conv2d.cpp"
ENGINE, DEF_CPU = "csrc/cpu/gather_engine.h", "csrc/cpu/deform_conv2d.cpp"
DW_CPU_TESTS = ("tests/test_depthwise.py", "tests/test_realistic.py", "-k",
                "not gpu and not compile and not export and not onnx and (depthwise or "
                "matches or gradcheck or non_contiguous)")
DIL_CPU_TESTS = ("tests/test_dilated.py", "tests/test_realistic.py", "-k",
                 "not gpu and not compile and not export and not aspp_compiles and (dilated or "
                 "matches or chunk or wide or repeated or thread or gradcheck)")
DEF_CPU_TESTS = ("tests/test_deform.py", "tests/test_realistic.py", "-k",
                 "not gpu and not compile and not export and (deform or matches or chunk or "
                 "offsets or gradcheck)")


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
    # --- CUDA implicit-GEMM engine (deformable and dilated) -----------------------------------
    Mutant("igemm-fwd-weights-of-previous-tap", IG_CUH,
           "? w_row[tap * e.Cg + (c - c_begin)]",
           "? w_row[(tap > 0 ? tap - 1 : 0) * e.Cg + (c - c_begin)]", tuple(IG_TESTS)),
    Mutant("igemm-fwd-drops-channel-tail", IG_CUH,
           "for (int64_t c0 = c_begin; c0 < c_end; c0 += kBK) {",
           "for (int64_t c0 = c_begin; c0 + kBK <= c_end || c0 == c_begin; c0 += kBK) {",
           tuple(IG_TESTS)),
    Mutant("igemm-fwd-missing-barrier", IG_CUH,
           "      __syncthreads();  // the next slice overwrites the tiles\n", "",
           tuple(IG_TESTS)),
    Mutant("igemm-sample-of-first-offset-group", IG_CUH,
           "        ++og;\n        og_end += e.cpo;\n      }\n      if (og != og_cache) {",
           "        ++og;\n        og_end += e.cpo;\n      }\n      if (og_cache < 0) {",
           tuple(IG_TESTS)),
    Mutant("igemm-pixel-ignores-image-chunk", IG_CUH,
           "return {e.n0 + n, static_cast<int>(r)};",
           "return {n, static_cast<int>(r)};", tuple(IG_TESTS)),
    Mutant("igemm-pixel-cursor-no-correction-step", IG_CUH,
           "if (r >= e.HoWo) {", "if (false && r >= e.HoWo) {", tuple(IG_TESTS)),
    Mutant("igemm-fwd-bias-of-tile-row", IG_CUH,
           "v += static_cast<acc_t>(bias[oc]);", "v += static_cast<acc_t>(bias[m0 + mm]);",
           tuple(IG_TESTS)),
    Mutant("igemm-mma-store-wrong-column", IG_CUH,
           "acc[i][j], L::ldc);", "acc[i][j ^ 1], L::ldc);", tuple(IG_TESTS)),
    Mutant("igemm-ffma-wrong-column", IG_CUH,
           "b[j] = static_cast<acc_t>(Bs[(tn + 16 * j) * ldb + k]);",
           "b[j] = static_cast<acc_t>(Bs[(tn + 16 * (j & 1)) * ldb + k]);", tuple(IG_TESTS)),
    Mutant("igemm-wgrad-split-skips-a-slice", IG_CUH,
           "for (int64_t s = s_begin; s < s_end; ++s, slice = advance(slice, kBK, e)) {",
           "for (int64_t s = s_begin; s + (split > 0) < s_end; ++s, slice = advance(slice, kBK, e)) {",
           tuple(IG_TESTS)),
    Mutant("igemm-wgrad-reduce-drops-last-split", IG_CUH,
           "for (int64_t s = 0; s < splits; ++s) sum +=",
           "for (int64_t s = 0; s + 1 < splits; ++s) sum +=", tuple(IG_TESTS)),
    Mutant("igemm-dgrad-corner-weight-swapped", IG_CUH,
           "scatter_add<kFixedPoint>(t, scale, at + t.sx, v * smp.w01);",
           "scatter_add<kFixedPoint>(t, scale, at + t.sx, v * smp.w10);", tuple(IG_TESTS)),
    Mutant("igemm-dgrad-offset-pair-sign", IG_CUH,
           "gy += pair_sums[bp];", "gy -= pair_sums[bp];", tuple(IG_TESTS)),
    Mutant("igemm-dgrad-offset-group-never-ends", IG_CUH,
           "const bool og_ends = c1 == og_end;", "const bool og_ends = c1 == e.C;",
           tuple(IG_TESTS)),
    Mutant("igemm-dgrad-fixed-point-unscaled", IG_CUH,
           "llrint(static_cast<double>(v) * scale)", "llrint(static_cast<double>(v))",
           tuple(IG_TESTS)),
    Mutant("igemm-dgrad-one-out-channel", IG_CUH,
           "(c < c1 && oc < e.OCg) ? wrow[oc]", "(c < c1 && oc < e.OCg) ? wrow[oc0]",
           tuple(IG_TESTS)),
    Mutant("igemm-dgrad-resident-grad-out-wrong-group", IG_CUH,
           "math.step(As, Gs + grp * e.go_ocp + oc0,", "math.step(As, Gs + oc0,",
           tuple(IG_TESTS)),
    Mutant("igemm-dgrad-streamed-grad-out-wrong-group", IG_CUH,
           "? grad_out[pp.n * e.o_sn + (grp * e.OCg + oc) * e.o_sc + pp.oh * e.o_sy +\n                               pp.ow * e.o_sx]",
           "? grad_out[pp.n * e.o_sn + oc * e.o_sc + pp.oh * e.o_sy +\n                               pp.ow * e.o_sx]",
           tuple(IG_TESTS)),
    Mutant("igemm-depthwise-forward-wrong-input-channel", IG_CUH,
           "const int64_t c = oc / e.OCg, og = c / e.cpo;",
           "const int64_t c = oc % e.C, og = c / e.cpo;", tuple(IG_TESTS)),
    Mutant("igemm-dilated-skips-live-taps", IG_CUH,
           "if (pp.valid && s_img.sample_at(0, ky, kx, pp.oh, pp.ow, &m).inside) *flag = 1;",
           "if (pp.valid && pp.oh == 0 && s_img.sample_at(0, ky, kx, pp.oh, pp.ow, &m).inside) *flag = 1;",
           tuple(IG_TESTS)),
    Mutant("igemm-fwd-reduce-drops-last-split", IG_CUH,
           "for (int64_t s = 0; s < e.splits; ++s) sum += partial[s * e.OC * pixels + i];",
           "for (int64_t s = 0; s + 1 < e.splits; ++s) sum += partial[s * e.OC * pixels + i];",
           tuple(IG_TESTS)),
    Mutant("igemm-fwd-split-repeats-previous-taps", IG_CUH,
           "const int tap_begin = split * static_cast<int>(e.per_split);",
           "const int tap_begin = (split > 0 ? split - 1 : 0) * static_cast<int>(e.per_split);",
           tuple(IG_TESTS)),
    Mutant("igemm-dgrad-every-split-from-tap-0", IG_CUH,
           "const int tap_begin = static_cast<int>(blockIdx.y) * static_cast<int>(e.per_split);",
           "const int tap_begin = 0 * static_cast<int>(e.per_split);", tuple(IG_TESTS)),
    Mutant("igemm-wgrad-depthwise-tree-drops-a-half", IG_CUH,
           "if (tid < half) sums[tid] += sums[tid + half];",
           "if (tid < half && half != 8) sums[tid] += sums[tid + half];", tuple(IG_TESTS)),
    Mutant("igemm-wgrad-depthwise-ignores-mask", IG_CUH,
           "sum += go * m *", "sum += go *", tuple(IG_TESTS)),
    Mutant("igemm-dgrad-depthwise-first-multiplier-only", IG_CUH,
           "for (int64_t oc = c * e.OCg; oc < (c + 1) * e.OCg; ++oc)",
           "for (int64_t oc = c * e.OCg; oc < c * e.OCg + 1; ++oc)", tuple(IG_TESTS)),
    Mutant("igemm-dgrad-depthwise-offset-grad-unmasked", IG_CUH,
           "grad_offset[2 * base + (2 * at) * e.HoWo + pix] = static_cast<scalar_t>(gy * m);",
           "grad_offset[2 * base + (2 * at) * e.HoWo + pix] = static_cast<scalar_t>(gy);",
           tuple(IG_TESTS)),
    Mutant("igemm-dgrad-depthwise-scatters-wrong-image", IG_CUH,
           "scatter_corners<kFixedPoint>(gi, scale, (n - e.n0) * gi.sn + c * gi.sc, smp, d * m);",
           "scatter_corners<kFixedPoint>(gi, scale, n * gi.sn + c * gi.sc, smp, d * m);",
           tuple(IG_TESTS)),
    Mutant("igemm-flipped-sampler-wrong-stride", "csrc/common/dilated.h",
           "output_pos_reading<int>(static_cast<int>(iw), static_cast<int>(kx), Wo, sw,",
           "output_pos_reading<int>(static_cast<int>(iw), static_cast<int>(kx), Wo, sh,",
           tuple(IG_TESTS)),
    Mutant("igemm-flipped-weight-not-transposed", IG_CUH,
           "const at::Tensor w_t = weight.reshape({g.groups, ocg, cg, g.kh, g.kw})\n"
           "                             .transpose(1, 2)\n",
           "const at::Tensor w_t = weight.reshape({g.groups, ocg, cg, g.kh, g.kw})\n",
           tuple(IG_TESTS)),
    Mutant("igemm-flipped-geometry-keeps-output-size", IG_CUH,
           "t.Ho = g.H; t.Wo = g.W;", "t.Ho = g.Ho; t.Wo = g.Wo;", tuple(IG_TESTS)),
    Mutant("igemm-nchw-transpose-not-transposed", IG_CUH,
           "out[image + (p0 + i) * C + c0 + tx] = tile[tx * 33 + i];",
           "out[image + (p0 + i) * C + c0 + tx] = tile[i * 33 + tx];", tuple(IG_TESTS)),
    # === CPU kernels ==========================================================================
    # --- CPU depthwise NHWC (cpu/nhwc_kernels.h): register-blocked rows, weight gradient -----
    Mutant("cpu-nhwc-vectors-use-previous-weights", DW_NHWC,  # the mutation of issue #16
           "const acc_t* wrow = w_t + ky * kw * C + c;",
           "const acc_t* wrow = w_t + ky * kw * C + (c >= VW ? c - VW : 0);", DW_CPU_TESTS),
    Mutant("cpu-nhwc-pad-drops-right-column", DW_NHWC,
           "if (sx >= 0 && sx < W) {", "if (sx >= 0 && sx < W - 1) {", DW_CPU_TESTS),
    Mutant("cpu-nhwc-wgrad-last-pixel-off-by-one", DW_NHWC,
           "a3 += load_vec<acc_t>(gp + 3 * C) * load_vec<acc_t>(xp + 3 * step);",
           "a3 += load_vec<acc_t>(gp + 3 * C) * load_vec<acc_t>(xp + 2 * step);", DW_CPU_TESTS),
    Mutant("cpu-nhwc-wgrad-tap-ignores-dilation", DW_NHWC,
           "const acc_t* x = xrow + kx * dw * C;", "const acc_t* x = xrow + kx * C;",
           DW_CPU_TESTS),
    # --- CPU depthwise backward (cpu/depthwise_conv2d.cpp) -----------------------------------
    Mutant("cpu-nhwc-wgrad-skips-last-vector", DW_CPU,
           "at::parallel_for(0, L.channels / VW, 1,", "at::parallel_for(0, (L.channels - 1) / VW, 1,",
           DW_CPU_TESTS),
    Mutant("cpu-nhwc-igrad-stride1-padding-off-by-one", DW_CPU,
           "g.Wo, g.H, g.W, 1, 1, (g.kh - 1) * g.dh - g.ph,",
           "g.Wo, g.H, g.W, 1, 1, (g.kh - 1) * g.dh - g.ph + 1,", DW_CPU_TESTS),
    Mutant("cpu-nhwc-igrad-multiplier-wrong-channel", DW_CPU,
           "acc[oc / g.multiplier] +=", "acc[oc % g.C] +=", DW_CPU_TESTS),
    Mutant("cpu-nhwc-wgrad-multiplier-wrong-channel-block", DW_CPU,
           "gathered[i] = px[(oc0 + i) / g.multiplier];", "gathered[i] = px[i / g.multiplier];",
           DW_CPU_TESTS),
    Mutant("cpu-nchw-igrad-stride1-flip-padding", DW_CPU,
           "const int64_t top = flipped_tap_padding(g.kh, g.dh, g.ph);",
           "const int64_t top = flipped_tap_padding(g.kh, g.dh, g.ph) + 1;", DW_CPU_TESTS),
    Mutant("cpu-nchw-igrad-strided-drops-last-tap", DW_CPU,
           "for (int64_t kx = 0; kx < g.kw; ++kx) {\n              const auto r = cols[kx];",
           "for (int64_t kx = 0; kx + 1 < g.kw; ++kx) {\n              const auto r = cols[kx];",
           DW_CPU_TESTS),
    Mutant("cpu-nchw-igrad-strided-wrong-sign", DW_CPU,
           "g.sw, static_cast<acc_t>(filter[ky * g.kw + kx]), go_row",
           "g.sw, -static_cast<acc_t>(filter[ky * g.kw + kx]), go_row", DW_CPU_TESTS),
    Mutant("cpu-nchw-wgrad-multiplier-wrong-channel", DW_CPU,
           "const int64_t c = oc / g.multiplier;\n      for (int64_t n = 0; n < g.N; ++n) {",
           "const int64_t c = oc % g.C;\n      for (int64_t n = 0; n < g.N; ++n) {", DW_CPU_TESTS),
    Mutant("cpu-nchw-wgrad-skips-last-image", DW_CPU,
           "const int64_t c = oc / g.multiplier;\n      for (int64_t n = 0; n < g.N; ++n) {",
           "const int64_t c = oc / g.multiplier;\n      for (int64_t n = 0; n + 1 < g.N; ++n) {",
           DW_CPU_TESTS),
    # --- CPU dilated, direct path (cpu/direct_conv.h, cpu/dilated_conv2d.cpp) ----------------
    Mutant("cpu-direct-pack-drops-last-column", DIRECT,
           "x1 = std::min(p.W, Wp - p.pw);", "x1 = std::min(p.W - 1, Wp - p.pw);", DIL_CPU_TESTS),
    Mutant("cpu-direct-skips-right-border-tap", DIRECT,
           "first * stride + k * dilation - pad < size;",
           "first * stride + k * dilation - pad < size - 1;", DIL_CPU_TESTS),
    Mutant("cpu-direct-igrad-taps-not-flipped", DIRECT,
           "const int64_t st = for_input_grad ? K - 1 - t : t;", "const int64_t st = t;",
           DIL_CPU_TESTS),
    Mutant("cpu-direct-igrad-weights-not-transposed", DIRECT,
           "sc = for_input_grad ? p.OCg * K : K;", "sc = for_input_grad ? p.Cg * K : K;",
           DIL_CPU_TESTS),
    Mutant("cpu-direct-wgrad-wrong-channel-block", DIRECT,
           "g * p.Cg + c0;\n        a.x_row_step", "g * p.Cg + (c0 > 0 ? c0 - 1 : 0);\n        a.x_row_step",
           DIL_CPU_TESTS),
    Mutant("cpu-direct-grad-output-pack-wrong-group", DIRECT,
           "grad_out.const_data_ptr<scalar_t>() + g * p.OCg * grad_out.stride(0),",
           "grad_out.const_data_ptr<scalar_t>() + p.OCg * grad_out.stride(0) * (g > 0),",
           DIL_CPU_TESTS),
    Mutant("cpu-direct-shared-grad-output-pack-off-by-one", DIL_CPU,
           "(q.ph * Wq + q.pw) * Cs, Wq * Cs, Cs, p.OCg};",
           "(q.ph * Wq + q.pw + 1) * Cs, Wq * Cs, Cs, p.OCg};", DIL_CPU_TESTS),
    # --- CPU gather engine (cpu/gather_engine.h): dilated fallback and deformable -----------
    Mutant("cpu-engine-grid-col2im-ignores-stride", ENGINE,
           "for (int64_t i = 0; i < count; ++i) d[i * g.sw] += s[i];",
           "for (int64_t i = 0; i < count; ++i) d[i] += s[i];", DIL_CPU_TESTS),
    Mutant("cpu-engine-later-chunks-one-pixel-short", ENGINE,
           "const int64_t P = std::min(chunk, g.Ho * g.Wo - p0);\n      sample_chunk<acc_t, scalar_t>(sampler, g, p0, P, samples);\n      chunk_im2col",
           "const int64_t P = std::min(chunk, g.Ho * g.Wo - p0) - (p0 > 0 && chunk > 1);\n      sample_chunk<acc_t, scalar_t>(sampler, g, p0, P, samples);\n      chunk_im2col",
           DIL_CPU_TESTS),
    Mutant("cpu-engine-backward-chunk-reads-previous-pixel", ENGINE,
           "go_n.narrow(1, p0, P).to(acc_type);", "go_n.narrow(1, p0 > 0 ? p0 - 1 : 0, P).to(acc_type);",
           DEF_CPU_TESTS),
    Mutant("cpu-engine-col2im-drops-bottom-right-corner", ENGINE,
           "if (smp.w11 != acc_t(0)) q[g.W + 1] += v * smp.w11;", "", DEF_CPU_TESTS),
    Mutant("cpu-engine-col2im-ignores-mask", ENGINE,
           "const acc_t v = d[p] * s.mod(og, tap, K, p);", "const acc_t v = d[p];", DEF_CPU_TESTS),
    # --- CPU deformable offset/mask gradients (cpu/deform_conv2d.cpp) -------------------------
    Mutant("cpu-deform-offset-grad-ignores-mask", DEF_CPU,
           "static_cast<scalar_t>(gy * m);", "static_cast<scalar_t>(gy);", DEF_CPU_TESTS),
    Mutant("cpu-deform-offset-grad-skips-last-channel", DEF_CPU,
           "c < (og + 1) * cpo; ++c", "c + 1 < (og + 1) * cpo; ++c", DEF_CPU_TESTS),
    Mutant("cpu-deform-mask-grad-wrong-sign", DEF_CPU,
           "grad_mask[row * HWo + pix] = static_cast<scalar_t>(gm);",
           "grad_mask[row * HWo + pix] = static_cast<scalar_t>(-gm);", DEF_CPU_TESTS),
    # --- shared per-element math (common/), CPU and CUDA: checked through the CPU tests -----
    Mutant("common-bilinear-drops-right-border-column", "csrc/common/bilinear.h",
           "right = s.x0 + 1 >= 0 && s.x0 + 1 <= W - 1;\n  s.w00",
           "right = s.x0 + 1 >= 0 && s.x0 + 1 <= W - 2;\n  s.w00", DEF_CPU_TESTS),
    Mutant("common-deform-sampler-dx-reads-dy", "csrc/common/deform.h",
           "offset[(ch + 1) * off_sc + at]);", "offset[ch * off_sc + at]);", DEF_CPU_TESTS),
    Mutant("common-coordinate-grad-wrong-sign", "csrc/common/deform.h",
           "*gy += d * dy;", "*gy -= d * dy;", DEF_CPU_TESTS),
]

# --- CPU depthwise forward (csrc/cpu/depthwise_forward*.h): the AVX2 and baseline builds ------
# (the AVX-512 build runs its own tests only on a CPU that has it)
DWF = "csrc/cpu/depthwise_forward_kernels.h"
DWF_TESTS = ("tests/test_depthwise.py", "-k", "vectorized")
DWF_AVX512 = "csrc/cpu/depthwise_forward_avx512.cpp"
MUTANTS += [
    Mutant("dwf-interior-starts-one-column-early", "csrc/cpu/depthwise_forward.h",
           "const int64_t lo = std::clamp<int64_t>(j.inner_lo, 0, j.Wo);",
           "const int64_t lo = std::clamp<int64_t>(j.inner_lo - 1, 0, j.Wo);", DWF_TESTS),
    Mutant("dwf-pair-narrow-blocks-skip-a-pixel", DWF,
           "for (int64_t ow0 = 0; ow0 < j.Wo; ow0 += kNarrow)",
           "for (int64_t ow0 = 0; ow0 < j.Wo; ow0 += kNarrow + 1)", DWF_TESTS),
    Mutant("dwf-pair-second-vector-reads-first", DWF,
           "a = vload(p), b = vload(p + kLanes);", "a = vload(p), b = vload(p);", DWF_TESTS),
    Mutant("dwf-pair-sliding-weights-of-first-vector", DWF,
           "wv[h][kx] = vload(w + h * w_step + (ky * KW + kx) * kLanes);",
           "wv[h][kx] = vload(w + (ky * KW + kx) * kLanes);", DWF_TESTS),
    Mutant("dwf-border-pixel-drops-fourth-chain", DWF,
           "vfma(acc[h][2], one, acc[h][3])", "acc[h][2]", DWF_TESTS),
    Mutant("dwf-wide-head-skips-tap-zero", DWF,
           "if (r <= q) acc[r]", "if (r < q) acc[r]", DWF_TESTS),
    Mutant("dwf-wide-tail-drops-last-tap", DWF,
           "if (r > q - kw) acc[r]", "if (r > q - kw + 1) acc[r]", DWF_TESTS),
    Mutant("dwf-wide-window-one-column-short", DWF,
           "dw_columns_inside(j, ic0, dw, R + kw - 1)", "dw_columns_inside(j, ic0, dw, R + kw - 2)",
           DWF_TESTS),
    Mutant("dwf-border-pixel-drops-last-tap", DWF,
           "kx1 = taps.last;", "kx1 = std::min(taps.last, j.kw - 1);",
           DWF_TESTS),
    Mutant("dwf-border-pixel-skips-first-tap", DWF,
           "kx0 = taps.first,", "kx0 = taps.first + 1,", DWF_TESTS),
    Mutant("dwf-checked-block-reads-past-right-border", DWF,
           "if (ow0 + r >= j.lo[kx] && ow0 + r < j.hi[kx])",
           "if (ow0 + r >= j.lo[kx] && ow0 + r <= j.hi[kx])", DWF_TESTS),
    Mutant("dwf-3x3-held-weights-transposed", DWF,
           "acc[r] = vfma(wv[ky * 3 + kx],", "acc[r] = vfma(wv[kx * 3 + ky],", DWF_TESTS),
    Mutant("dwf-3x3-no-shifted-last-block", DWF,
           "for (int64_t next = lo; next < hi; next += kBlockW) {",
           "for (int64_t next = lo; next + kBlockW <= hi; next += kBlockW) {", DWF_TESTS),
    Mutant("dwf-channel-tail-dropped", DWF, "  if (nch_tail) {", "  if (false && nch_tail) {",
           DWF_TESTS),
    Mutant("dwf-bf16-store-swaps-channels-14-15", DWF_AVX512,
           "(31 << 16) | 29,", "(29 << 16) | 31,", DWF_TESTS),
    Mutant("dwf-bf16-even-odd-store-swaps-halves", DWF_AVX512,
           "_mm512_mask_blend_epi16(0xAAAAAAAAu,", "_mm512_mask_blend_epi16(0x55555555u,", DWF_TESTS),
    Mutant("dwf-bf16-even-odd-odd-vector-loads-even", DWF_AVX512,
           "odd = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(int(0xFFFF0000u))));",
           "odd = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));", DWF_TESTS),
    Mutant("dwf-bf16-native-store-flushes-denormals", DWF_AVX512,
           "kBf16ConvertUnexact = 0x01 | 0x20 | 0x80;", "kBf16ConvertUnexact = 0x01 | 0x80;",
           DWF_TESTS),
    Mutant("dwf-bf16-native-store-keeps-nan-payloads", DWF_AVX512,
           "kBf16ConvertUnexact = 0x01 | 0x20 | 0x80;", "kBf16ConvertUnexact = 0x20;", DWF_TESTS),
    Mutant("dwf-bf16-native-pair-store-swaps-halves", DWF_AVX512,
           "18, 2, 17, 1, 16, 0);", "2, 18, 1, 17, 0, 16);", DWF_TESTS),
    Mutant("dwf-avx512-tail-mask-drops-lane-0", DWF_AVX512,
           "static_cast<__mmask16>((1u << n) - 1);", "static_cast<__mmask16>((1u << n) - 2);",
           DWF_TESTS),
    Mutant("dwf-avx512-bf16-tail-store-one-lane-long", DWF_AVX512,
           "_mm256_mask_storeu_epi16(p, first_lanes(n),", "_mm256_mask_storeu_epi16(p, first_lanes(n + 1),",
           DWF_TESTS),
    Mutant("dwf-avx512-even-odd-rows-tail-loads-one-lane-short", DWF_AVX512,
           "{ return vload_part(static_cast<const c10::BFloat16*>(p), n); }",
           "{ return vload_part(static_cast<const c10::BFloat16*>(p), n - 1); }", DWF_TESTS),
    Mutant("dwf-fourteen-wide-rows-drop-last-block", DWF,
           "for (int64_t ow0 = 0; ow0 < j.Wo; ow0 += kFourteen)",
           "for (int64_t ow0 = 0; ow0 + kFourteen < j.Wo; ow0 += kFourteen)", DWF_TESTS),
    Mutant("dwf-avx2-tail-mask-one-lane-short", "csrc/cpu/depthwise_forward_avx2.cpp",
           "_mm256_cmpgt_epi32(_mm256_set1_epi32(n),", "_mm256_cmpgt_epi32(_mm256_set1_epi32(n - 1),",
           DWF_TESTS),
    Mutant("dwf-bf16-even-odd-weights-in-channel-order", "csrc/cpu/depthwise_conv2d.cpp",
           "(cb & ~int64_t(1)) * lanes + 2 * l + (cb & 1)", "cb * lanes + l", DWF_TESTS),
    Mutant("dwf-pair-border-pixel-second-vector-first-weights", DWF,
           "acc[1][u] = vfma(vload(wq + w_step + u * kLanes), b, acc[1][u]);",
           "acc[1][u] = vfma(vload(wq + u * kLanes), b, acc[1][u]);", DWF_TESTS),
    Mutant("dwf-pair-block-second-vector-first-weights", DWF,
           "w1 = vload(wk + w_step + kx * kLanes);", "w1 = vload(wk + kx * kLanes);", DWF_TESTS),
    Mutant("dwf-stride2-sliding-taps-of-stride1", DWF,
           "const int kx = q - r * S;  // the tap", "const int kx = q - r;  // the tap", DWF_TESTS),
    Mutant("dwf-stride2-sliding-window-at-stride1", DWF,
           "const int64_t ic0 = ow0 * S - j.pw;", "const int64_t ic0 = ow0 - j.pw;", DWF_TESTS),
    Mutant("dwf-pair-sliding-second-vector-reads-first", DWF,
           "v[h] = kFull ? vload(p + h * kLanes) : vload_part(p, nch);",
           "v[h] = kFull ? vload(p) : vload_part(p, nch);", DWF_TESTS),
    Mutant("dwf-bias-of-first-vector", DWF,
           "return j.bias ? vload(j.bias + cb * kLanes) : vset1(0.f);",
           "return j.bias ? vload(j.bias) : vset1(0.f);", DWF_TESTS),
    Mutant("dwf-nhwc-ring-key-ignores-image", DWF,
           "const int64_t key = n * j.H + ih;", "const int64_t key = ih;", DWF_TESTS),
    Mutant("dwf-nhwc-ring-tail-not-copied", DWF, "              if (tail)\n",
           "              if (false && tail)\n", DWF_TESTS),
    Mutant("dwf-nchw-narrow-mask-drops-last-lane", DWF_AVX512,
           "return static_cast<LaneMask>(((1u << hi) - 1) & ~((1u << lo) - 1));",
           "return static_cast<LaneMask>(((1u << hi) - 2) & ~((1u << lo) - 1));", DWF_TESTS),
    Mutant("dwf-nchw-narrow-taps-in-reverse-order", DWF,
           "acc[r] = vfma_lanes(wv[ky * K + kx], tap[kx], acc[r], inside[kx]);",
           "acc[r] = vfma_lanes(wv[ky * K + K - 1 - kx], tap[K - 1 - kx], acc[r], inside[K - 1 - kx]);",
           DWF_TESTS),
    Mutant("dwf-nchw-transpose-no-shifted-tail", DWF,
           "for (int64_t next = 0; next < W; next += 8) {",
           "for (int64_t next = 0; next + 8 <= W; next += 8) {", DWF_TESTS),
    Mutant("dwf-ring-slot-ignores-dilation", "csrc/cpu/depthwise_forward.h",
           "return (ih / j.dh) % j.kh;", "return ih % j.kh;", DWF_TESTS),
    Mutant("dwf-nhwc-staged-copy-drops-last-pixel", DWF,
           "for (int64_t iw = 0; iw < j.W; ++iw)\n        std::memcpy(dst",
           "for (int64_t iw = 0; iw + 1 < j.W; ++iw)\n        std::memcpy(dst", DWF_TESTS),
    Mutant("dwf-nhwc-staged-rows-kept-between-calls", DWF,
           "if (held) std::fill(held, held + j.kh, int64_t(-1));", "", DWF_TESTS),
    Mutant("dwf-nchw-ring-wrong-slot", DWF,
           "rows[ky] = ring + (ih % span) * ring_row;",
           "rows[ky] = ring + ((ih + 1) % span) * ring_row;", DWF_TESTS),
    Mutant("dwf-nchw-ring-skips-rows-between-taps", DWF,
           "std::max({next, ih - span + 1, int64_t(0)})", "std::max({next, ih, int64_t(0)})",
           DWF_TESTS),
    Mutant("dwf-bf16-store-wrong-half", "csrc/cpu/depthwise_forward_x86_8.h",
           "_mm256_packus_epi32(r, r), 0x08)", "_mm256_packus_epi32(r, r), 0x04)", DWF_TESTS),
    Mutant("dwf-baseline-fma-sign", "csrc/cpu/depthwise_forward_baseline.cpp",
           "return _mm_add_ps(_mm_mul_ps(a, b), c);", "return _mm_sub_ps(_mm_mul_ps(a, b), c);",
           DWF_TESTS),
    Mutant("dwf-isa-env-ignored", "csrc/cpu/depthwise_forward.h",
           "if (has_avx2 && !want_base) return &dw_avx2::kIsa;",
           "if (has_avx2) return &dw_avx2::kIsa;", DWF_TESTS),
    Mutant("dwf-sliding-wrong-tap", DWF, "const int kx = q - r * S;  // the tap", "const int kx = q - r * S + 1;  // the tap",
           DWF_TESTS),
    Mutant("dwf-sliding-drops-last-column", DWF, "for (int q = 0; q < Q; ++q, p += col_step) {",
           "for (int q = 0; q < Q - 1; ++q, p += col_step) {", DWF_TESTS),
    Mutant("dwf-sliding-border-reads-past-right-edge", DWF,
           "if (kChecked && (ic0 + q * dw < 0 || ic0 + q * dw >= j.W)) continue;",
           "if (kChecked && (ic0 + q * dw < 0 || ic0 + q * dw > j.W)) continue;", DWF_TESTS),
    Mutant("dwf-sliding-left-border-block-unchecked", DWF,
           "if (ow0 >= j.inner_lo && ow0 + (R - 1) * j.dw < j.inner_hi)",
           "if (ow0 + 1 >= j.inner_lo && ow0 + (R - 1) * j.dw < j.inner_hi)", DWF_TESTS),
    Mutant("dwf-sliding-tail-not-computed", DWF,
           "for (; ow < j.Wo; ow += kBlockW)\n    sliding_block_at",
           "for (; ow + kBlockW <= j.Wo; ow += kBlockW)\n    sliding_block_at", DWF_TESTS),
    Mutant("dwf-sliding-dilated-drops-last-phase", DWF,
           "phase < j.dw; ++phase)\n        sliding_block_at<in_t, out_t, kFull, KW, kBlockW, 1, 1, false>",
           "phase + 1 < j.dw; ++phase)\n        sliding_block_at<in_t, out_t, kFull, KW, kBlockW, 1, 1, false>",
           DWF_TESTS),
    Mutant("dwf-sliding-dilated-wide-run-drops-last-phase", DWF,
           "phase < j.dw; ++phase)\n        sliding_block_at<in_t, out_t, kFull, KW, kWide, 1, 1, false>",
           "phase + 1 < j.dw; ++phase)\n        sliding_block_at<in_t, out_t, kFull, KW, kWide, 1, 1, false>",
           DWF_TESTS),
    Mutant("dwf-sliding-dilated-check-ignores-dilation", DWF,
           "if (kChecked && (ic0 + q * dw < 0 || ic0 + q * dw >= j.W)) continue;",
           "if (kChecked && (ic0 + q < 0 || ic0 + q >= j.W)) continue;", DWF_TESTS),
    Mutant("dwf-wide-interior-last-block-not-shifted", DWF,
           "std::min(ow, hi - kBlockW), out,", "ow, out,", DWF_TESTS),
    Mutant("dwf-pair-rows-dilated-drops-last-phase", DWF,
           "phase < j.dw; ++phase)\n        each_pair(",
           "phase + 1 < j.dw; ++phase)\n        each_pair(", DWF_TESTS),
    Mutant("dwf-pair-rows-skip-last-pair", DWF,
           "for (int64_t cb = 0; cb < vectors; cb += 2)",
           "for (int64_t cb = 0; cb + 2 < vectors; cb += 2)", DWF_TESTS),
    Mutant("dwf-pair-rows-second-bias-of-first", DWF,
           "block_bias(j, cb), block_bias(j, cb + 1));",
           "block_bias(j, cb), block_bias(j, cb));", DWF_TESTS),
    Mutant("dwf-seven-wide-5x5-taps-of-3x3", DWF,
           "case 5: return sliding_block_at<in_t, out_t, kFull, 5, 7>",
           "case 5: return sliding_block_at<in_t, out_t, kFull, 3, 7>", DWF_TESTS),
    Mutant("dwf-seven-wide-rule-misses-3x3", "csrc/cpu/depthwise_forward.h",
           "j.Wo == 7 && (j.kw == 3 ||", "j.Wo == 7 && (j.kw == 4 ||", DWF_TESTS),
    Mutant("dwf-seven-wide-rows-not-paired", "csrc/cpu/depthwise_forward.h",
           "(j.dw == 1 && j.Wo == 7 && slide_w == 8)", "(false)", DWF_TESTS),
    Mutant("dwf-weights-packed-flipped", "csrc/cpu/depthwise_conv2d.cpp",
           "for (int64_t t = 0; t < taps; ++t) dst[t * lanes + l] = static_cast<float>(src[t]);",
           "for (int64_t t = 0; t < taps; ++t) dst[t * lanes + l] = static_cast<float>(src[taps - 1 - t]);",
           DWF_TESTS),
]


def _run(cmd, cwd, log):
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.call(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)


def _build(tree, log, debug=False):
    env = dict(os.environ, FORCE_CPU="1", FORCE_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    if debug:  # -O0: each mutant's rebuild is several times faster on a loaded 2-core machine
        env["DEBUG"] = "1"
    with open(log, "a") as f:
        return subprocess.call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                               env=env, stdout=f, stderr=subprocess.STDOUT)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run mutants whose name contains this (or any of a,b,...)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--debug-build", action="store_true",
                    help="build the scratch tree with DEBUG=1 (-O0): faster rebuilds, slower tests")
    # One scratch tree per worktree: two worktrees mutating one tree would mix their edits.
    ap.add_argument("--tree", default=f"/tmp/convops-mutate-{ROOT.name}",
                    help="scratch copy of the repo")
    args = ap.parse_args(argv)
    only = args.only.split(",") if args.only else []
    mutants = [m for m in MUTANTS if not only or any(o in m.name for o in only)]
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
    # The scratch tree gets today's sources, Python package and tests (a stale test file or
    # header made a mutant look alive); copytree keeps the build's incremental state.
    for sub in ("csrc", "convops", "tests"):
        shutil.copytree(ROOT / sub, tree / sub, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        for f in (tree / sub).rglob("*"):  # files deleted since (a stale source still compiles)
            if (f.is_file() and f.suffix != ".so" and "__pycache__" not in f.parts
                    and not (ROOT / sub / f.relative_to(tree / sub)).exists()):
                f.unlink()
    log = tree / "mutate.log"
    assert _build(tree, log, args.debug_build) == 0, f"the unmutated tree does not build: {log}"
    results = []
    for m in mutants:
        path = tree / m.path
        original = path.read_text()
        path.write_text(original.replace(m.old, m.new))
        start = time.time()
        try:
            if _build(tree, log, args.debug_build) != 0:
                verdict = "killed (build)"
            else:
                rc = _run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "2",
                           "-p", "no:cacheprovider", *m.tests], tree, log)
                verdict = "killed" if rc != 0 else "SURVIVED"
        finally:
            path.write_text(original)
        results.append((m.name, verdict))
        print(f"{m.name:42s} {verdict:15s} {time.time() - start:5.0f} s", flush=True)
    _build(tree, log, args.debug_build)
    killed = sum(v.startswith("killed") for _, v in results)
    print(f"mutation score: {killed}/{len(results)} killed")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
