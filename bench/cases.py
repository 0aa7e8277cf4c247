"""Named benchmark cases, grouped in suites. GPU suites use the shapes the issues name; the CPU
variants shrink the batch so a suite finishes on two cores."""
from dataclasses import dataclass, field, replace
from typing import List, Tuple


@dataclass(frozen=True)
class Case:
    name: str
    suite: str          # "depthwise" | "dilated" | "deform"
    N: int
    C: int
    H: int
    W: int
    OC: int
    k: Tuple[int, int]
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1     # depthwise: always C
    offset_groups: int = 1
    mask: bool = True
    tags: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def out_hw(self) -> Tuple[int, int]:
        def size(n, k):
            return (n + 2 * self.padding - self.dilation * (k - 1) - 1) // self.stride + 1
        return size(self.H, self.k[0]), size(self.W, self.k[1])


def _dw(name, N, C, H, k, stride=1, dilation=1, tags=()):
    return Case(name, "depthwise", N, C, H, H, C, (k, k), stride, dilation * (k // 2), dilation,
                groups=C, tags=tags)


GPU_CASES: List[Case] = [
    _dw("mbv2-3x3-32@112", 64, 32, 112, 3, tags=("quick",)),
    _dw("mbv2-3x3-144@56", 64, 144, 56, 3),
    _dw("mbv2-3x3-576@14", 64, 576, 14, 3),
    _dw("effnet-5x5-240@28", 64, 240, 28, 5),
    _dw("convnext-7x7-96@56", 64, 96, 56, 7, tags=("quick",)),
    _dw("convnext-7x7-384@14", 64, 384, 14, 7),
    _dw("replknet-31x31-128@56", 64, 128, 56, 31, tags=("quick",)),
    _dw("replknet-27x27-512@14", 64, 512, 14, 27),
    _dw("mbv2-3x3-s2-144@56", 64, 144, 56, 3, stride=2),
    _dw("dilated-dw-3x3-d4-256@64", 64, 256, 64, 3, dilation=4),
]


def _dcn(name, N, C, H, groups=1, tags=()):
    return Case(name, "deform", N, C, H, H, C, (3, 3), 1, 1, 1, groups=groups, offset_groups=1,
                mask=True, tags=tags)


GPU_CASES += [
    _dcn("r50-dcn-256@64", 8, 256, 64, tags=("quick",)),
    _dcn("r50-dcn-512@32", 8, 512, 32),
    _dcn("dw-dcn-256@64", 8, 256, 64, groups=256),
]


def _aspp(name, N, C, OC, H, d, tags=()):
    return Case(name, "dilated", N, C, H, H, OC, (3, 3), 1, d, d, groups=1, tags=tags)


GPU_CASES += [
    _aspp("aspp-2048-256-d12@65", 8, 2048, 256, 65, 12),
    _aspp("aspp-2048-256-d24@65", 8, 2048, 256, 65, 24),
    _aspp("aspp-2048-256-d36@65", 8, 2048, 256, 65, 36),
    # the CPU targets of the dilated-conv issue (N=2 / N=1 on CPU as given there)
    _aspp("aspp-256-64-d6@33", 8, 256, 64, 33, 6),
    _aspp("aspp-256-64-d12@33", 8, 256, 64, 33, 12, tags=("quick",)),
    _aspp("dil-128-128-d2@48", 8, 128, 128, 48, 2),
]

# CPU batch sizes: small enough for 2 cores, large enough that threading is exercised.
_CPU_BATCH = {"depthwise": 4, "dilated": 1, "deform": 1}
_CPU_BATCH_BY_NAME = {"aspp-256-64-d6@33": 2, "aspp-256-64-d12@33": 2, "r50-dcn-256@64": 1}


def cpu_case(case: Case) -> Case:
    n = _CPU_BATCH_BY_NAME.get(case.name, _CPU_BATCH[case.suite])
    if case.suite == "depthwise" and case.k[0] >= 27:
        n = 2
    return replace(case, N=min(case.N, n))


def suites(device: str) -> List[Case]:
    cases = GPU_CASES
    if device == "cpu":
        cases = [cpu_case(c) for c in cases]
    return cases
