"""`python -m bench --model`: a bytes-and-FLOPs model of convops' CUDA depthwise kernels on an
H100 SXM, next to an estimate of cuDNN / PyTorch's native kernels. Predictions, not
measurements: nothing here runs a kernel, and it needs neither a GPU nor the CUDA build.

Per case, dtype, layout and pass (fwd, bwd_input, bwd_weight, fwd_bwd = their sum):
- minimum bytes: each tensor a pass must read or write, once (no bias: the bench passes none).
- design bytes: DRAM traffic of the kernels as designed (constants below), plus the L2 bytes of
  the NCHW tiles and the shared/L1 loads the tile and vector kernels issue.
- floor: max(DRAM bytes / (0.90 x 3.35 TB/s), FLOPs / 67 TFLOP/s, shared/L1 loads /
  (132 SMs x 32 loads/clk x 1.755 GHz), L2 bytes / 7 TB/s); fwd_bwd sums the three passes.
  FLOPs = 2·N·OC·Ho·Wo·k² per pass. fp16/bf16 accumulate in fp32 (FFMA), so 67 TFLOP/s for
  every dtype.
- cuDNN / native estimate (an assumption, not a measurement): k <= 5: a bandwidth kernel at 70%
  of 0.90 x 3.35 TB/s on the minimum bytes. k >= 7: PyTorch's native depthwise kernels: forward
  and input grad one thread per output, one L1 load per multiply-add (k² per output) at the L1
  rate above; weight grad one block per (channel, tap) re-reading input and grad_output k²
  times from L2 at 7 TB/s. Never faster than the 70%-bandwidth kernel.
- predicted ratio = cuDNN-estimate time / this design's floor (> 1: convops predicted faster).
"""
import json
import math
from dataclasses import dataclass

from .cases import Case
from .metrics import PASSES as _BENCH_PASSES

PASSES = tuple(p for p in _BENCH_PASSES if p != "bwd")  # the modelled passes

# --- H100 SXM5 (data sheet) ----------------------------------------------------------------
HBM_BPS = 3.35e12                 # HBM3 peak
DRAM_EFF = 0.90                   # reachable fraction (copy ~3.0 TB/s measured, GUIDE §3)
DRAM_BPS = DRAM_EFF * HBM_BPS
FMA_FLOPS = 67e12                 # FP32 non-tensor: 132 SMs x 128 FFMA x 2 x 1.98 GHz
SMS, LOADS_PER_CLK, CLOCK_HZ = 132, 32, 1.755e9  # shared/L1: 32 x 4-byte lanes (128 B)/clk/SM
L1_LOADS_PER_S = SMS * LOADS_PER_CLK * CLOCK_HZ
L2_BPS = 7e12                     # L2 read bandwidth, approximate
BASELINE_BW_EFF = 0.70            # cuDNN's depthwise kernels for k <= 5, fraction of DRAM_BPS

# --- kernel design (what the convops kernels are being written to) --------------------------
VEC_BYTES = 16                    # NHWC: a thread owns one 16-byte vector of channels ...
STRIP = 4                         # ... and a strip of 4 output columns
HALO_K, HALO_FACTOR = 7, 1.05     # NHWC input re-read when the tap extent (k-1)·d+1 exceeds 7
ROWS_PER_THREAD = 8               # NCHW tile: R outputs down a column per thread (sliding window)
TILE_W_MIN, TILE_W_MAX, TILE_THREADS = 8, 32, 256  # NCHW tile width range, threads per block
GATHER_LOADS_PER_FMA = 2          # strided / multiplier input grad: grad_output + weight per tap
WGRAD_TILE_H, WGRAD_TILE_W = 4, 32  # weight grad: output tile staged in shared memory for a
WGRAD_MAX_CHANNELS = 32           # block of <= 32 channels (halved until it fits 48 KiB) ...
WGRAD_TAPS = 8                    # ... a thread owns a run of <= 8 taps of one filter row
WGRAD_BLOCKS = 528                # resident blocks (132 SMs x 4): fp32 partial groups x blocks
SMEM_BYTES = 48 * 1024

ELEM = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Geometry:
    """A depthwise convolution as one kernel sees it: (N, C, H, W) -> (N, OC, Ho, Wo)."""
    N: int
    C: int
    H: int
    W: int
    OC: int
    Ho: int
    Wo: int
    k: int
    s: int
    p: int
    d: int

    @classmethod
    def of(cls, case: Case):
        assert case.suite == "depthwise" and case.k[0] == case.k[1], case
        ho, wo = case.out_hw
        return cls(case.N, case.C, case.H, case.W, case.OC, ho, wo, case.k[0], case.stride,
                   case.padding, case.dilation)

    def transposed(self):
        """The input grad of a stride-1, multiplier-1 conv as a conv over grad_output."""
        return Geometry(self.N, self.OC, self.Ho, self.Wo, self.C, self.H, self.W, self.k, 1,
                        (self.k - 1) * self.d - self.p, self.d)

    @property
    def x(self):
        return self.N * self.C * self.H * self.W

    @property
    def y(self):
        return self.N * self.OC * self.Ho * self.Wo

    @property
    def w(self):
        return self.OC * self.k * self.k

    @property
    def fmas(self):
        return self.y * self.k * self.k

    @property
    def extent(self):
        return (self.k - 1) * self.d + 1


def _next_pow2(n):
    return 1 << max(0, math.ceil(math.log2(n)))


def _staged(n_out, tile, s, extent, p, n_in):
    """Input rows (or columns) that tiles of `tile` outputs load, halo included, summed over
    the tiles along one axis; padding is not loaded."""
    total = 0
    for t0 in range(0, n_out, tile):
        lo = t0 * s - p
        hi = (min(t0 + tile, n_out) - 1) * s - p + extent - 1
        total += max(0, min(hi, n_in - 1) - max(lo, 0) + 1)
    return total


def nchw_tile(g: Geometry):
    tile_w = min(max(_next_pow2(g.Wo), TILE_W_MIN), TILE_W_MAX)
    threads_y = min(max(_next_pow2(math.ceil(g.Ho / ROWS_PER_THREAD)), 1), TILE_THREADS // tile_w)
    return ROWS_PER_THREAD * threads_y, tile_w


def _direct(g: Geometry, layout, es):
    """The forward kernels (and the stride-1 input grad): DRAM, L2 bytes and L1 loads."""
    if layout == "channels_last":
        halo = 1.0 if g.extent <= HALO_K else HALO_FACTOR
        # per thread: k rows x the distinct input columns of its strip, and its k² weights,
        # each a 16-byte vector (VEC_BYTES / 4 lane-loads); STRIP·k²·vec multiply-adds
        cols = len({o * g.s + t * g.d for o in range(STRIP) for t in range(g.k)})
        vec = VEC_BYTES // es
        per_fma = (VEC_BYTES // 4) * (g.k * cols + g.k ** 2) / (STRIP * g.k ** 2 * vec)
        return {"dram": (g.x * halo + g.y + g.w) * es, "l2": 0.0, "l1": g.fmas * per_fma}
    tile_h, tile_w = nchw_tile(g)
    rows = _staged(g.Ho, tile_h, g.s, g.extent, g.p, g.H)
    cols = _staged(g.Wo, tile_w, g.s, g.extent, g.p, g.W)
    r = ROWS_PER_THREAD
    window = (r + g.k - 1) / (r * g.k) if g.s == 1 and g.d == 1 else 1.0
    # + 1/R: a thread fetches each of its k² weights once for its R·k² multiply-adds
    return {"dram": (g.x + g.y + g.w) * es, "l2": g.N * g.OC * rows * cols * es,
            "l1": g.fmas * (window + 1 / r)}


def forward(g: Geometry, layout, es):
    return _direct(g, layout, es)


def input_grad(g: Geometry, layout, es):
    if g.s == 1 and g.OC == g.C:  # the forward kernels with flipped taps, over grad_output
        return _direct(g.transposed(), layout, es)
    # gather: one thread per input element, grad_output read once from DRAM
    return {"dram": (g.y + g.w + g.x) * es, "l2": 0.0, "l1": g.fmas * GATHER_LOADS_PER_FMA}


def wgrad_channel_block(g: Geometry):
    """Channels per weight-grad block: <= 32, halved until the staged tiles fit 48 KiB (fp32)."""
    in_h = (WGRAD_TILE_H - 1) * g.s + (g.k - 1) * g.d + 1
    in_w = (WGRAD_TILE_W - 1) * g.s + (g.k - 1) * g.d + 1
    per_channel = ((in_h * in_w) | 1) + ((WGRAD_TILE_H * WGRAD_TILE_W) | 1) + g.k * g.k
    cb = WGRAD_MAX_CHANNELS
    while cb > 1 and (cb * per_channel * 4 > SMEM_BYTES or cb // 2 >= g.OC):
        cb //= 2
    return cb


def wgrad_partials(g: Geometry, es):
    """Bytes of the fp32 partial sums the weight-grad pass writes (and its reduce reads)."""
    tiles = g.N * math.ceil(g.Ho / WGRAD_TILE_H) * math.ceil(g.Wo / WGRAD_TILE_W)
    channel_blocks = math.ceil(g.OC / wgrad_channel_block(g))
    groups = min(tiles, math.ceil(WGRAD_BLOCKS / channel_blocks))
    return groups * g.OC * g.k * g.k * 4


def weight_grad(g: Geometry, layout, es):
    # each 4x32 tile stages its input with halo (counted as DRAM traffic) and its grad_output
    staged_x = g.N * g.C * _staged(g.Ho, WGRAD_TILE_H, g.s, g.extent, g.p, g.H) * \
        _staged(g.Wo, WGRAD_TILE_W, g.s, g.extent, g.p, g.W)
    dram = (staged_x + g.y + g.w) * es + 2 * wgrad_partials(g, es)
    # shared loads: per output pixel and (channel, filter row, run of <= 8 taps): one grad_output
    # value and one input value (sliding window; every tap's input when strided or dilated)
    runs = math.ceil(g.k / WGRAD_TAPS)
    per_pixel = g.k * runs * (1 + (1 if g.s == 1 and g.d == 1 else min(g.k, WGRAD_TAPS)))
    return {"dram": dram, "l2": 0.0, "l1": g.N * g.OC * g.Ho * g.Wo * per_pixel}


DESIGN = {"fwd": forward, "bwd_input": input_grad, "bwd_weight": weight_grad}


def minimum_bytes(g: Geometry, pass_name, es):
    return {"fwd": g.x + g.y + g.w, "bwd_input": g.y + g.w + g.x,
            "bwd_weight": g.x + g.y + g.w}[pass_name] * es


def floor_terms(design, flops):
    return {"dram": design["dram"] / DRAM_BPS, "fma": flops / FMA_FLOPS,
            "l1": design["l1"] / L1_LOADS_PER_S, "l2": design["l2"] / L2_BPS}


def baseline(g: Geometry, pass_name, es):
    """(seconds, basis) of the cuDNN / PyTorch-native estimate."""
    bandwidth = minimum_bytes(g, pass_name, es) / (BASELINE_BW_EFF * DRAM_BPS)
    if g.k <= 5:
        return bandwidth, "bw70"
    if pass_name == "bwd_weight":
        return max(g.k ** 2 * (g.x + g.y) * es / L2_BPS, bandwidth), "L2"
    return max(g.fmas / L1_LOADS_PER_S, bandwidth), "L1"


def model_rows(cases, dtypes=("fp32", "fp16", "bf16"), layouts=("nchw", "channels_last"),
               passes=PASSES):
    rows = []
    for case in cases:
        g = Geometry.of(case)
        for dtype in dtypes:
            es = ELEM[dtype]
            for layout in layouts:
                per = {}
                for p in ("fwd", "bwd_input", "bwd_weight"):
                    design = DESIGN[p](g, layout, es)
                    terms = floor_terms(design, 2 * g.fmas)
                    base_s, basis = baseline(g, p, es)
                    per[p] = dict(min_bytes=minimum_bytes(g, p, es), design_bytes=design["dram"],
                                  l2_bytes=design["l2"], l1_loads=design["l1"],
                                  flops=2 * g.fmas, floor_s=max(terms.values()),
                                  bound=max(terms, key=terms.get), baseline_s=base_s,
                                  baseline_basis=basis)
                total = {key: sum(v[key] for v in per.values()) for key in
                         ("min_bytes", "design_bytes", "l2_bytes", "l1_loads", "flops",
                          "floor_s", "baseline_s")}
                per["fwd_bwd"] = dict(total, bound="sum", baseline_basis="sum")
                for p in passes:
                    r = dict(case=case.name, dtype=dtype, layout=layout, pass_=p, **per[p])
                    r["ratio"] = r["baseline_s"] / r["floor_s"]
                    rows.append(r)
    return rows


HEADER = ["case", "dtype", "layout", "pass", "GFLOP", "min MB", "design MB", "floor us",
          "bound", "cuDNN-est us", "basis", "pred. ratio"]


def _cells(r):
    return [r["case"], r["dtype"], r["layout"], r["pass_"], f"{r['flops'] / 1e9:.2f}",
            f"{r['min_bytes'] / 1e6:.1f}", f"{r['design_bytes'] / 1e6:.1f}",
            f"{r['floor_s'] * 1e6:.1f}", r["bound"], f"{r['baseline_s'] * 1e6:.1f}",
            r["baseline_basis"], f"{r['ratio']:.2f}x"]


def legend():
    return [
        "Predictions from a bytes-and-FLOPs model (bench/model.py), not measurements.",
        f"H100 SXM5 data sheet: HBM3 {HBM_BPS / 1e12:.2f} TB/s, used at {DRAM_EFF:.0%} = "
        f"{DRAM_BPS / 1e12:.2f} TB/s (copy ~3.0 TB/s measured on H100s here); {SMS} SMs; FP32 "
        f"FFMA {FMA_FLOPS / 1e12:.0f} TFLOP/s (non-tensor-core; fp16/bf16 accumulate in fp32, "
        "so the same peak).",
        f"shared/L1: {LOADS_PER_CLK} 4-byte loads/clk/SM at {CLOCK_HZ / 1e9:.3f} GHz = "
        f"{L1_LOADS_PER_S / 1e12:.2f} T loads/s (1.755 GHz is the H100 PCIe boost, taken as a "
        "sustained clock; the SXM5 boost the 67 TFLOP/s assumes is 1.98 GHz, so L1-bound times "
        f"on both sides are ~13% conservative); L2 ~{L2_BPS / 1e12:.0f} TB/s.",
        "floor = max(design DRAM bytes / DRAM rate, FLOPs / FFMA peak, shared/L1 loads / L1 rate,"
        " L2 bytes / L2 rate); 'bound' names the largest term; fwd_bwd sums the three passes.",
        "min MB: input + output + weight (fwd), grad_output + weight + grad_input (bwd_input), "
        "input + grad_output + grad_weight (bwd_weight); no bias. FLOPs 2·N·OC·Ho·Wo·k² per "
        "pass.",
        f"design, NHWC fwd: a thread owns {VEC_BYTES} B of channels x a strip of {STRIP} output "
        f"columns, taps through L1; DRAM input x1.0 (x{HALO_FACTOR} when (k-1)·d+1 > {HALO_K}) + "
        "output + weight; L1: k rows of the strip's distinct input columns + k² weights, 16-byte "
        "vectors.",
        f"design, NCHW fwd: shared-memory tile, tile_w = clamp(next_pow2(Wo), {TILE_W_MIN}, "
        f"{TILE_W_MAX}), tile_h = {ROWS_PER_THREAD}·clamp(next_pow2(ceil(Ho/"
        f"{ROWS_PER_THREAD})), 1, {TILE_THREADS}/tile_w); DRAM input + output + weight once; L2: "
        "the halo'd tiles (clipped to the image); shared loads per FMA (R+k-1)/(R·k) + 1/R "
        f"(weights), R = {ROWS_PER_THREAD}, stride 1 dilation 1; 1 + 1/R when strided/dilated.",
        "design, bwd_input: stride 1 and multiplier 1: the forward kernels over grad_output "
        "(flipped taps); otherwise a gather, one thread per input element, DRAM grad_output + "
        f"weight + grad_input, {GATHER_LOADS_PER_FMA} L1 loads per FMA.",
        f"design, bwd_weight: {WGRAD_TILE_H}x{WGRAD_TILE_W} output tiles x a block of <= "
        f"{WGRAD_MAX_CHANNELS} channels (fitting 48 KiB) staged once each, input with its halo "
        "(clipped; counted as DRAM); fp32 partials per tile group G = min(tiles, "
        f"ceil({WGRAD_BLOCKS}/channel blocks)), G·OC·k²·4 B, written and read back by a "
        f"reduce; shared loads per pixel and (channel, filter row, run of <= {WGRAD_TAPS} "
        "taps): 1 grad_output + 1 input (sliding window), or + 1 per tap when strided/dilated.",
        "cuDNN-est (assumption): k <= 5: a bandwidth kernel at "
        f"{BASELINE_BW_EFF:.0%} of {DRAM_BPS / 1e12:.2f} TB/s on the minimum bytes (basis bw70); "
        "k >= 7: PyTorch's native depthwise, fwd/bwd_input one thread per output, k² L1 loads "
        "per output at the L1 rate (basis L1); bwd_weight one block per (channel, tap) reading "
        "input + grad_output k² times from L2 (basis L2); never below the bw70 time.",
        "pred. ratio = cuDNN-est / floor (> 1: convops predicted faster).",
    ]


def aligned_table(header, body) -> str:
    """Plain-text columns (shared by the depthwise and the GEMM-engine models)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def text_table(rows) -> str:
    return aligned_table(HEADER, [_cells(r) for r in rows])


def markdown(rows) -> str:
    lines = ["# convops depthwise on an H100 SXM: bytes-and-FLOPs model (predictions)", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines + ["", "Assumptions:", ""] + [f"- {s}" for s in legend()]) + "\n"


def write_json(path, rows):
    with open(path, "w") as f:
        json.dump({"schema": "convops-model/1", "assumptions": legend(), "rows": rows}, f,
                  indent=1)
