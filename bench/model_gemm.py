"""`python -m bench --model` for the deformable and dilated cases: bytes and FLOPs of three
algorithms on an H100 SXM, per case, dtype, layout and pass. Predictions, not measurements:
nothing runs a kernel, and neither a GPU nor the extension is needed.

Algorithms (each pass is a list of kernels; a kernel's floor is
max(DRAM bytes / copy rate, L2 bytes / L2 rate, MMA FLOPs / dtype peak + sampling FLOPs / FFMA
peak), a pass's floor the sum over its kernels, since they run one after another):
- convops: the fused implicit GEMM of issue #12, no column buffer.
- torchvision (deform): im2col column buffer in the compute dtype, batched per chunk of
  n_parallel_imgs images, cuBLAS addmm per chunk and group (torchvision/csrc/ops/cuda).
- cuDNN (dilated): an implicit GEMM reading the input once, computing every tap (padding too).
The predicted ratio is baseline floor / convops floor (> 1: convops predicted faster).
"""
import json
import math
from dataclasses import dataclass
from typing import List

from .cases import Case
from .model import aligned_table

COPY_BPS = 3.0e12          # measured device-to-device copy on H100s here (GUIDE §3)
L2_BPS = 7.0e12            # L2 read bandwidth, approximate (as bench/model.py)
FFMA = 67e12               # FP32 non-tensor-core, data sheet
MMA_PEAK = {"fp16": 790e12, "bf16": 790e12,  # dense tensor-core MMA, measured here
            "fp32": FFMA, "tf32": 495e12}    # fp32: TF32 off (the bench's policy) -> FFMA
ELEM = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}
# The tiles of csrc/cuda/implicit_gemm.cuh (kBM, kBN, kBK, kWgTargetBlocks, kMaxWgSplits).
TILE_N = 64                # pixels per N-tile (GEMM N = batch·Ho·Wo)
TILE_M = 64                # out-channels per block before the B tile is re-sampled
TILE_K = 64                # K per weight-grad tile: 64 channels of one tap
SLICE_K = 32               # channels per K-slice of the fused input-gradient kernel
SPLITK_BLOCKS = 1056       # weight-grad split-K: about 8 blocks per SM of an H100
SPLITK_MAX = 64
SAMPLE_FLOPS_FWD = 8       # bilinear sample x mask: 4 products, 3 adds, 1 mask product
SAMPLE_FLOPS_BWD = 16      # bilinear weights again, 4-corner scatter, offset/mask terms
TV_MAX_PARALLEL_IMGS = 32  # torchvision kMaxParallelImgs
MODEL_PASSES = ("fwd", "bwd_input", "bwd_weight", "fwd_bwd")


@dataclass
class Kernel:
    name: str
    dram: float = 0.0      # bytes to/from DRAM
    l2: float = 0.0        # bytes re-read from L2 (tile re-reads, atomics)
    mma: float = 0.0       # FLOPs on tensor cores (or FFMA when the dtype has no MMA path)
    ffma: float = 0.0      # sampling FLOPs on CUDA cores

    def floor(self, dtype):
        return max(self.dram / COPY_BPS, self.l2 / L2_BPS,
                   self.mma / MMA_PEAK[dtype] + self.ffma / FFMA)


@dataclass(frozen=True)
class Shape:
    """Element counts of one case."""
    N: int
    C: int
    H: int
    W: int
    OC: int
    Ho: int
    Wo: int
    taps: int
    groups: int
    deform: bool
    offset_groups: int
    mask: bool

    @classmethod
    def of(cls, case: Case):
        ho, wo = case.out_hw
        return cls(case.N, case.C, case.H, case.W, case.OC, ho, wo, case.k[0] * case.k[1],
                   case.groups, case.suite == "deform", case.offset_groups, case.mask)

    @property
    def P(self):           # GEMM N: output pixels over the whole batch
        return self.N * self.Ho * self.Wo

    @property
    def X(self):
        return self.N * self.C * self.H * self.W

    @property
    def Y(self):
        return self.N * self.OC * self.Ho * self.Wo

    @property
    def Wt(self):
        return self.OC * (self.C // self.groups) * self.taps

    @property
    def Kg(self):          # GEMM K per group
        return self.taps * self.C // self.groups

    @property
    def OCg(self):
        return self.OC // self.groups

    @property
    def offmask(self):     # offset + mask elements
        if not self.deform:
            return 0
        t = self.N * self.offset_groups * self.taps * self.Ho * self.Wo
        return 2 * t + (t if self.mask else 0)

    @property
    def S(self):           # sampled values = column-buffer elements: C·taps·P
        return self.C * self.taps * self.P

    @property
    def macs(self):
        return self.OC * self.P * self.Kg

    @property
    def n_tiles(self):
        return math.ceil(self.P / TILE_N)

    @property
    def m_tiles(self):     # per group
        return math.ceil(self.OCg / TILE_M)


def valid_tap_fraction(case: Case) -> float:
    """Fraction of (pixel, tap) products a kernel that skips, per 64-pixel tile, the filter rows
    lying wholly in padding still computes. Only filter rows can be skipped: a tile spans whole
    output rows (Wo <= 64 here), so each filter column is in bounds for some pixel."""
    ho, wo = case.out_hw
    kh, kw = case.k
    per_image = ho * wo
    kept = 0
    for t0 in range(0, case.N * per_image, TILE_N):
        rows = {(p % per_image) // wo for p in range(t0, min(t0 + TILE_N, case.N * per_image))}
        live = sum(1 for i in range(kh) if any(
            0 <= y * case.stride - case.padding + i * case.dilation < case.H for y in rows))
        kept += live * min(TILE_N, case.N * per_image - t0)
    return kept / (kh * case.N * per_image)


ACCUM_BUDGET = 1 << 25     # elements: the engine's accumulation / transpose budget


def _nchw_transpose(layout, channels_per_group, elems, es) -> List[Kernel]:
    """gather_source: a contiguous NCHW tensor the engine gathers from is transposed once when
    its channel runs make 16-byte packs and it fits the budget (read + write)."""
    if layout != "nchw" or channels_per_group == 1 or (channels_per_group * es) % 16 \
            or elems > ACCUM_BUDGET:
        return []
    return [Kernel("NCHW -> NHWC transpose", dram=2 * elems * es)]


def convops(s: Shape, pass_name, layout, es, skip_fraction=1.0) -> List[Kernel]:
    """The fused implicit GEMM as built (csrc/cuda/implicit_gemm.cuh). Gathers read
    channels_last inputs in 16-byte channel packs; an NCHW input is transposed first when it
    fits the budget (else gathered plane by plane, coalesced along W). The deformable input
    gradient is one fused kernel: dcols on tensor cores per K-slice of 32 channels (grad_out of
    the tile resident in shared memory when it fits, else re-read per slice), scattered with
    fp32 atomics into an fp32 buffer (16-bit dtypes; fp32 scatters into grad_input itself);
    the dilated one is the forward kernel over grad_out with flipped taps."""
    mma = 2 * s.macs * skip_fraction
    slices = math.ceil(s.Kg / SLICE_K)
    ks = []
    if pass_name in ("fwd", "bwd_weight"):
        ks += _nchw_transpose(layout, s.C // s.groups, s.X, es)
    if pass_name == "fwd":
        ks.append(Kernel(
            "implicit GEMM", dram=(s.X + s.offmask + s.Y + s.Wt) * es,
            l2=s.Wt * es * (s.n_tiles - 1) + s.X * es * (s.m_tiles - 1),
            mma=mma, ffma=SAMPLE_FLOPS_FWD * s.S if s.deform else 0))
    elif pass_name == "bwd_input" and not s.deform and s.C // s.groups > 1:
        # dilated: the forward kernel over grad_out with flipped taps (M = C per group, N =
        # batch·H·W input pixels, K = taps·OC per group): a gather, no atomics, no buffer
        ks += _nchw_transpose(layout, s.OC // s.groups, s.Y, es)
        ks.append(Kernel(
            "implicit GEMM (dgrad, flipped taps)", dram=(s.Y + s.Wt + s.X) * es,
            l2=s.Wt * es * (math.ceil(s.N * s.H * s.W / TILE_N) - 1)
            + s.Y * es * (math.ceil(s.C // s.groups / TILE_M) - 1),
            mma=mma))
    elif pass_name == "bwd_input":
        buffer = es != 4  # fp16/bf16 accumulate in an fp32 copy of grad_input
        # grad_out of the tile stays in shared memory (227 KiB) unless too wide: then it is
        # re-read from L2 per K-slice
        resident = TILE_N * (s.groups * math.ceil(s.OCg / SLICE_K) * SLICE_K + 8) * es \
            + 24 * 1024 <= 227 * 1024
        ks.append(Kernel("zero grad_input accumulator", dram=4 * s.X if buffer else es * s.X))
        ks.append(Kernel(
            "fused dcols + scatter" + (" + offset/mask grad" if s.deform else ""),
            dram=(s.Y + s.Wt + s.X + (2 * s.offmask if s.deform else 0)) * es
            + (4 * s.X if buffer else 0),
            l2=(0 if resident else s.Y * es * (slices - 1)) + s.Wt * es * (s.n_tiles - 1)
            + (4 if s.deform else 1) * s.S * 4,  # fp32 atomics: 4 corners, or 1 grid point
            mma=mma, ffma=(SAMPLE_FLOPS_BWD if s.deform else 2) * s.S))
        if buffer:
            ks.append(Kernel("cast grad_input fp32 -> dtype", dram=4 * s.X + s.X * es))
    elif pass_name == "bwd_weight":
        tiles = s.groups * s.m_tiles * math.ceil(s.Kg / TILE_K)
        split = max(1, min(SPLITK_MAX, math.ceil(s.P / SLICE_K),
                           math.ceil(SPLITK_BLOCKS / tiles)))
        ks.append(Kernel(
            "implicit GEMM (wgrad, split-K)",
            dram=(s.Y + s.X + s.offmask) * es + split * s.Wt * 4,
            l2=s.Y * es * (math.ceil(s.Kg / TILE_K) - 1) + s.X * es * (s.m_tiles - 1),
            mma=mma, ffma=SAMPLE_FLOPS_FWD * s.S if s.deform else 0))
        ks.append(Kernel("reduce split-K partials", dram=split * s.Wt * 4 + s.Wt * es))
    return ks


def torchvision(s: Shape, pass_name, layout, es) -> List[Kernel]:
    """torchvision's deform_conv2d CUDA kernels (v0.2x): columns C·taps × n_par·Ho·Wo in the
    input dtype per chunk of n_par images; everything .contiguous() (NCHW) first."""
    n_par = max(d for d in range(1, min(s.N, TV_MAX_PARALLEL_IMGS) + 1) if s.N % d == 0)
    chunks = s.N // n_par
    cl = layout == "channels_last"
    gemm_l2 = s.Wt * es * (s.n_tiles - chunks)  # same tile rule as convops' GEMM
    mma = 2 * s.macs
    ks = []
    if pass_name == "fwd":
        if cl:
            ks.append(Kernel("input.contiguous()", dram=2 * s.X * es))
        ks.append(Kernel("zeros: out, out_buf, columns",
                         dram=(2 * s.Y + s.S // chunks) * es))
        ks.append(Kernel("deformable_im2col", dram=(s.X + s.offmask + s.S) * es,
                         ffma=SAMPLE_FLOPS_FWD * s.S))
        ks.append(Kernel("addmm (out_buf += W·columns)",
                         dram=(s.S + s.Wt * chunks + 2 * s.Y) * es, l2=gemm_l2, mma=mma))
        ks.append(Kernel("out.copy_(out_buf^T) + bias", dram=4 * s.Y * es))
    elif pass_name == "bwd_input":
        if cl:
            ks.append(Kernel("input, grad_out .contiguous()", dram=2 * (s.X + s.Y) * es))
        ks.append(Kernel("zeros: grad_input/offset/mask, columns per chunk",
                         dram=(s.X + s.offmask + s.S) * es))
        if n_par > 1:
            ks.append(Kernel("grad_out permute copy", dram=2 * s.Y * es))
        ks.append(Kernel("addmm (columns += W^T·grad_out)",
                         dram=(2 * s.S + s.Y + s.Wt * chunks) * es, l2=gemm_l2, mma=mma))
        # each column element is read by both offset directions
        ks.append(Kernel("deformable_col2im_coord",
                         dram=(2 * s.S + s.X + 2 * s.offmask) * es,
                         ffma=SAMPLE_FLOPS_BWD * s.S // 2))
        ks.append(Kernel("deformable_col2im (atomicAdd)",
                         dram=(s.S + s.offmask + s.X) * es, l2=4 * s.S * es,
                         ffma=SAMPLE_FLOPS_BWD * s.S // 2))
    elif pass_name == "bwd_weight":
        ks.append(Kernel("grad_out permute copy, grad_weight zeros",
                         dram=(2 * s.Y * (n_par > 1) + s.Wt) * es))
        ks.append(Kernel("deformable_im2col", dram=(s.X + s.offmask + s.S) * es,
                         ffma=SAMPLE_FLOPS_FWD * s.S))
        ks.append(Kernel("addmm (grad_weight += grad_out·columns^T)",
                         dram=(s.Y + s.S + 2 * s.Wt * chunks) * es,
                         l2=s.Y * es * (math.ceil(s.Kg / TILE_K) - 1) +
                         s.S * es * (s.m_tiles - 1), mma=mma))
        ks.append(Kernel("grad_bias = grad_out.sum", dram=s.Y * es))
    return ks


def cudnn(s: Shape, pass_name, layout, es) -> List[Kernel]:
    """cuDNN's implicit GEMM for dilated conv: input (or grad_out) read once, weights, output;
    every tap computed, padding included; no layout transform counted."""
    mma = 2 * s.macs
    if pass_name == "fwd":
        return [Kernel("implicit GEMM", dram=(s.X + s.Wt + s.Y) * es,
                       l2=s.Wt * es * (s.n_tiles - 1) + s.X * es * (s.m_tiles - 1), mma=mma)]
    if pass_name == "bwd_input":
        return [Kernel("implicit GEMM (dgrad)", dram=(s.Y + s.Wt + s.X) * es,
                       l2=s.Wt * es * (math.ceil(s.N * s.H * s.W / TILE_N) - 1), mma=mma)]
    tiles = s.groups * s.m_tiles * math.ceil(s.Kg / TILE_K)
    split = max(1, min(s.n_tiles, math.ceil(SPLITK_BLOCKS / tiles)))
    return [Kernel("implicit GEMM (wgrad, split-K)",
                   dram=(s.Y + s.X) * es + split * s.Wt * 4,
                   l2=s.Y * es * (math.ceil(s.Kg / TILE_K) - 1) + s.X * es * (s.m_tiles - 1),
                   mma=mma),
            Kernel("reduce split-K partials", dram=split * s.Wt * 4 + s.Wt * es)]


def _totals(kernels, dtype):
    return dict(dram=sum(k.dram for k in kernels), l2=sum(k.l2 for k in kernels),
                flops=sum(k.mma + k.ffma for k in kernels),
                floor_s=sum(k.floor(dtype) for k in kernels),
                kernels=[k.name for k in kernels])


def model_rows(cases, dtypes=("fp32", "fp16", "bf16"), layouts=("nchw", "channels_last"),
               passes=MODEL_PASSES):
    rows = []
    for case in cases:
        if case.suite not in ("deform", "dilated"):
            raise ValueError(f"{case.name}: model_gemm covers deform and dilated cases")
        s = Shape.of(case)
        skip = 1.0 if s.deform else valid_tap_fraction(case)
        base_name = "torchvision" if s.deform else "cudnn"
        for dtype in dtypes:
            es = ELEM[dtype]
            for layout in layouts:
                per = {}
                for p in ("fwd", "bwd_input", "bwd_weight"):
                    ours = _totals(convops(s, p, layout, es, skip), dtype)
                    if s.deform and dtype == "bf16":
                        base = None  # torchvision's CUDA kernels dispatch float/double/half
                    elif s.deform:
                        base = _totals(torchvision(s, p, layout, es), dtype)
                    else:
                        base = _totals(cudnn(s, p, layout, es), dtype)
                    per[p] = (ours, base)
                per["fwd_bwd"] = tuple(
                    None if any(per[p][i] is None for p in ("fwd", "bwd_input", "bwd_weight"))
                    else {key: sum(per[p][i][key] for p in ("fwd", "bwd_input", "bwd_weight"))
                          for key in ("dram", "l2", "flops", "floor_s")}
                    for i in (0, 1))
                for p in passes:
                    ours, base = per[p]
                    rows.append(dict(
                        case=case.name, suite=case.suite, dtype=dtype, layout=layout, pass_=p,
                        baseline=base_name, dense_flops=2 * s.macs * (
                            3 if p == "fwd_bwd" else 1), tap_fraction=skip,
                        convops=ours, base=base,
                        ratio=base["floor_s"] / ours["floor_s"] if base else None))
    return rows


HEADER = ["case", "dtype", "layout", "pass", "convops GFLOP", "DRAM MB", "L2 MB", "floor us",
          "baseline", "GFLOP", "DRAM MB", "L2 MB", "floor us", "pred. ratio"]


def _cells(r):
    o, b = r["convops"], r["base"]
    fmt = lambda d, key, scale, spec: format(d[key] / scale, spec) if d else "-"  # noqa: E731
    return [r["case"], r["dtype"], r["layout"], r["pass_"], fmt(o, "flops", 1e9, ".1f"),
            fmt(o, "dram", 1e6, ".0f"), fmt(o, "l2", 1e6, ".0f"), fmt(o, "floor_s", 1e-6, ".0f"),
            r["baseline"] + ("" if b else " (no bf16)"), fmt(b, "flops", 1e9, ".1f"),
            fmt(b, "dram", 1e6, ".0f"), fmt(b, "l2", 1e6, ".0f"), fmt(b, "floor_s", 1e-6, ".0f"),
            f"{r['ratio']:.2f}x" if r["ratio"] else "-"]


def legend():
    return [
        "PREDICTIONS from a bytes-and-FLOPs model (bench/model_gemm.py), not measurements.",
        f"H100 SXM: copy {COPY_BPS / 1e12:.1f} TB/s (measured), L2 ~{L2_BPS / 1e12:.0f} TB/s; "
        f"MMA peak bf16/fp16 {MMA_PEAK['bf16'] / 1e12:.0f} TFLOP/s (measured), TF32 "
        f"{MMA_PEAK['tf32'] / 1e12:.0f}, fp32 FFMA {FFMA / 1e12:.0f} (data sheet). fp32 rows "
        "assume TF32 off (the bench's default policy), so fp32 GEMMs run FFMA on both sides.",
        "floor per kernel = max(DRAM bytes / copy rate, L2 bytes / L2 rate, MMA FLOPs / dtype "
        "peak + sampling FLOPs / FFMA peak); a pass's floor sums its kernels (they are serial); "
        "fwd_bwd sums the three passes. pred. ratio = baseline floor / convops floor.",
        "FLOPs: GEMM 2·OC·N·Ho·Wo·taps·C/groups per pass; deformable sampling "
        f"{SAMPLE_FLOPS_FWD} FLOPs per sampled value (C·taps·N·Ho·Wo of them) forward and "
        f"weight grad, {SAMPLE_FLOPS_BWD} in the input/offset/mask grad, on CUDA cores, the "
        "same for both algorithms.",
        f"convops: implicit GEMM, M = out-channels, N = batch·Ho·Wo, K = taps·C/groups; N-tile "
        f"{TILE_N} pixels, M-tile {TILE_M} channels. The B tile is sampled while loading into "
        "shared memory (4 corner reads per sample hit L1/L2): input read once from DRAM; "
        "channels_last inputs are read in 16-byte channel packs; an NCHW input (grad_out for "
        "the dilated input gradient) is first transposed when it fits 2^25 elements (read + "
        "write counted, fwd and bwd_weight), else gathered plane by plane.",
        "convops: offsets and masks read once; weights read once from DRAM and once per "
        "further N-tile from L2; the B tile re-sampled per further M-tile (L2); output written "
        "once.",
        "convops bwd_input (deform): one fused kernel reads grad_out, weights, input, offsets, "
        "mask, writes grad_offset, grad_mask, and grad_input as fp32 atomics (4 per sample, "
        "counted as L2 bytes) into an fp32 buffer: zeroing, write-back and a cast pass "
        "(read fp32, write dtype) counted. dilated (groups < C): the forward kernel over "
        "grad_out with flipped taps (M = C/groups, N = batch·H·W, K = taps·OC/groups), the "
        "same tile re-read rule, no atomics.",
        f"convops bwd_weight: implicit GEMM reading grad_out (re-read per further K-tile of "
        f"{TILE_K} from L2) and re-sampling the input; split-K = min(N-tiles, ceil("
        f"{SPLITK_BLOCKS} / output tiles)) fp32 partials of grad_weight, written, read by a "
        "reduce, grad_weight written.",
        "convops dilated: filter rows lying wholly in padding for every pixel of a 128-pixel "
        "tile are skipped (tap fraction in the JSON); cuDNN is assumed to compute every tap. "
        "If it skips them too, the dilated ratios fall toward 1.0 on channels_last.",
        f"torchvision (deform): n_par = largest divisor of N <= {TV_MAX_PARALLEL_IMGS}; "
        "columns C·taps × n_par·Ho·Wo in the input dtype; fwd: zeros(out, out_buf, columns), "
        "im2col writes columns, addmm reads them + weights per chunk + out_buf (beta=1), "
        "transpose copy to out, + bias; channels_last inputs made contiguous first.",
        "torchvision bwd_input: columns zeroed per chunk, addmm W^T·grad_out into them "
        "(read + write), grad_out permute copy, col2im_coord reads the columns twice "
        "(both offset directions) + input + offsets, col2im reads them once and does 4 "
        "atomicAdds per sample in the dtype (L2). bwd_weight: im2col again, addmm into "
        "grad_weight per chunk (read + write), grad_bias = grad_out.sum. The GEMM tile rule "
        "is convops'. torchvision has no bf16 kernels.",
        "cuDNN (dilated): implicit GEMM, input (grad_out for dgrad) read once, weights, "
        "output; same tile re-read rule and split-K as convops; no NCHW<->NHWC transform "
        "counted (cuDNN may add one: NCHW ratios then favour convops more).",
    ]


def text_table(rows) -> str:
    return aligned_table(HEADER, [_cells(r) for r in rows])


def markdown(rows) -> str:
    lines = ["# convops deformable/dilated on an H100 SXM: bytes-and-FLOPs model "
             "(PREDICTIONS)", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines + ["", "Assumptions:", ""] + [f"- {s}" for s in legend()]) + "\n"


def to_json(rows):
    return {"schema": "convops-model-gemm/1", "assumptions": legend(), "rows": rows}
