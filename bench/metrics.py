"""Minimum bytes moved and FLOPs per pass: the floors every timing is compared with.

Bytes count each tensor a pass must read or write once (no re-reads); FLOPs count a
multiply-add as 2 and ignore padding (the dense count, as cuDNN and the literature quote it).
"""
from .cases import Case

# bwd: every gradient in one backward call (what torchvision's single backward op computes)
PASSES = ("fwd", "bwd_input", "bwd_weight", "bwd", "fwd_bwd")


def _sizes(case: Case):
    ho, wo = case.out_hw
    kh, kw = case.k
    cin_per_group = case.C // case.groups
    x = case.N * case.C * case.H * case.W
    y = case.N * case.OC * ho * wo
    w = case.OC * cin_per_group * kh * kw
    extra = 0
    if case.suite == "deform":
        taps = case.offset_groups * kh * kw * ho * wo * case.N
        extra = 2 * taps + (taps if case.mask else 0)  # offset (+ mask)
    return x, y, w, extra


def pass_bytes(case: Case, pass_name: str, elem_size: int) -> int:
    x, y, w, extra = _sizes(case)
    per_pass = {
        # forward reads input, weight (+offset/mask), writes output
        "fwd": x + w + extra + y,
        # input grad reads grad_out, weight (+offset/mask and the input for deform's
        # offset/mask grads), writes grad_input (+grad_offset/mask)
        "bwd_input": y + w + x + (2 * extra + x if case.suite == "deform" else 0),
        # weight grad reads grad_out and input (+offset/mask), writes grad_weight
        "bwd_weight": y + x + extra + w,
    }
    # one call reads grad_out, input, weight (+offset/mask) once, writes every gradient
    per_pass["bwd"] = y + x + w + extra + x + w + (extra if case.suite == "deform" else 0)
    if pass_name == "fwd_bwd":
        total = per_pass["fwd"] + per_pass["bwd_input"] + per_pass["bwd_weight"]
    else:
        total = per_pass[pass_name]
    return total * elem_size


def pass_flops(case: Case, pass_name: str) -> int:
    ho, wo = case.out_hw
    kh, kw = case.k
    macs = case.N * case.OC * ho * wo * (case.C // case.groups) * kh * kw
    if case.suite == "deform":
        # bilinear sampling: 4 loads + ~7 FLOPs per sampled value, counted once per (c, tap, px)
        macs += case.N * case.C * kh * kw * ho * wo * 4
    per = {"fwd": 2 * macs, "bwd_input": 2 * macs, "bwd_weight": 2 * macs, "bwd": 4 * macs}
    if pass_name == "fwd_bwd":
        return 6 * macs
    return per[pass_name]
