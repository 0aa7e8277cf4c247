"""`python -m bench.sass`: the compiler's report on the CUDA build of convops._C.

No GPU needed. Runs `cuobjdump --dump-resource-usage` and `cuobjdump -sass` on the extension's
fatbinary and prints, per kernel (all template instantiations together), registers, static
shared / local / stack bytes and counts of the SASS instructions that matter here: tensor-core
MMAs, 16-byte global loads, spill traffic and float atomics. `--check` asserts the rules below
and exits 1 listing every violation.

Examples:
  python -m bench.sass                                # the _C*.so next to convops/__init__.py
  python -m bench.sass --so build/lib/convops/_C.cpython-311-x86_64-linux-gnu.so --check
  python -m bench.sass --markdown sass.md --json sass.json

Tools: cuobjdump and nvdisasm, from PATH, $CUDA_HOME/bin or the pip wheels
(`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`).
"""
import argparse
import dataclasses
import glob
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

# ---- rules of --check (one place, so a new kernel or exception is a one-line change) --------
# CI builds TORCH_CUDA_ARCH_LIST=9.0, so that is the cubin the rules are about.
DEFAULT_ARCH = "sm_90"
# Rule 2: kernel -> dtypes whose every instantiation must issue a 16-byte global load; these
# fp16/bf16 kernels are memory-bound and only reach bandwidth with 128-bit vector loads.
# The implicit-GEMM engine's gathers read channels_last inputs in 16-byte channel packs.
REQUIRED_VECTOR_LOADS = {"depthwise_forward_nhwc_vec": ("float16", "bfloat16"),
                         "igemm_forward": ("float16", "bfloat16"),
                         "igemm_weight_grad": ("float16", "bfloat16")}
# Rule 3: kernels that must be bit-reproducible (deterministic mode, GUIDE §2): no float atomics.
DETERMINISTIC_PREFIXES = ("depthwise_weight_grad", "igemm_weight_grad", "igemm_data_grad_fixed",
                          "igemm_data_grad_depthwise_fixed", "igemm_forward")
# Rule 4: the only kernels allowed float atomics (the non-deterministic fast scatter paths).
FLOAT_ATOMIC_ALLOWED = ("gather_col2im_atomic", "igemm_data_grad_atomic",
                        "igemm_data_grad_depthwise_atomic")
# Rule 5: kernel -> dtypes whose every instantiation must issue tensor-core MMAs (HMMA).
REQUIRED_MMA = {name: ("float16", "bfloat16") for name in
                ("igemm_forward", "igemm_weight_grad", "igemm_data_grad_atomic",
                 "igemm_data_grad_fixed")}
# Rules 3-4 also count CAS atomics: on sm_90 atomicAdd on a half or bfloat16 scalar, and a float
# atomicAdd on shared memory, compile to CAS loops, not to typed float atomics (checked, nvcc 13).
CAS_COUNTS_AS_FLOAT_ATOMIC = True

# ---- SASS instruction classes, matched against the opcode (first token, modifiers included) --
INSTRUCTION_RE = re.compile(
    r"^\s*/\*[0-9a-f]{4,}\*/\s+"      # /*0a30*/ address
    r"(?:@!?U?P(?:T|\d+)\s+)?"        # optional predicate: @P0, @!P1, @UP0, @!PT
    r"([A-Z][A-Za-z0-9_.]*)")         # opcode with modifiers, e.g. LDG.E.128.CONSTANT, NOP;
OPCODE_CLASSES = {
    # Tensor-core MMA: HMMA (mma.sync / wmma), HGMMA (sm_90 wgmma). Not HFMA2.MMA, an FMA.
    "hmma": re.compile(r"^HG?MMA(?:\.|$)"),
    # 16-byte global loads: LDG.E.128, LDG.E.128.CONSTANT (__ldg), LDGSTS.E.BYPASS.128 (cp.async).
    "ldg128": re.compile(r"^LDG(?:STS)?(?:\.\w+)*\.128(?:\.|$)"),
    # Local-memory traffic (spills, indexed local arrays): STL, STL.128, LDL, LDL.LU, LDL.LU.64.
    "spill": re.compile(r"^(?:STL|LDL)(?:\.|$)"),
    # Typed float atomics/reductions: REDG.E.ADD.F32.FTZ.RN.STRONG.GPU,
    # ATOMG.E.ADD.F32.FTZ.RN..., REDG.E.ADD.F64.RN..., ATOM.E.ADD.F16x2.RN...,
    # ATOM.E.ADD.BF16x2.RN..., REDG.E.ADD.F32x4.FTZ.RN..., UBLKRED.G.S.ADD.F32.RN (bulk).
    # Integer ones carry no float type (REDG.E.ADD.STRONG.GPU, REDG.E.MAX.S32...): not counted.
    "float_atomic": re.compile(
        r"^(?:ATOM[GS]?|RED[GS]?|UBLKRED)(?:\.\w+)*?\.(?:B?F16|F32|F64)(?:x[248])?(?:\.|$)"),
    # Compare-and-swap atomics: ATOM.E.CAS.STRONG.GPU, ATOMG.E.CAS.64..., ATOMS.CAST.SPIN.
    "cas": re.compile(r"^ATOM[GS]?(?:\.\w+)*?\.CAST?(?:\.|$)"),
}

# Scalar types recognised in template arguments, as torch names them.
DTYPE_PATTERNS = [  # (label, demangled pattern, mangled pattern)
    ("float16", r"\bc10::Half\b|\b__half\b", r"3c104HalfE|6__half"),
    ("bfloat16", r"\bc10::BFloat16\b|\b__nv_bfloat16\b", r"3c108BFloat16E|13__nv_bfloat16"),
]
PIP_TOOLS = "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm"


class ToolError(RuntimeError):
    """A missing tool, input or arch; main() prints it and exits 2."""


# ---- parsing cuobjdump output ----------------------------------------------------------------

def _sections(text: str):
    """Yield (arch, module identifier, line) for each line, tracking 'Fatbin elf code' headers."""
    arch, module = None, ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Fatbin "):
            arch, module = None, ""
        elif s.startswith("arch = "):
            arch = s[len("arch = "):]
        elif s.startswith("identifier = "):
            module = s[len("identifier = "):]
        yield arch, module, line


def parse_resource_usage(text: str, arch: Optional[str] = None) -> Dict[Tuple[str, str], dict]:
    """`cuobjdump --dump-resource-usage` -> {(module, mangled): {"REG": 40, "SHARED": 0, ...}}."""
    out, current = {}, None
    for sec_arch, module, line in _sections(text):
        m = re.match(r"^\s*Function\s+(\S+?):\s*$", line)
        if m:
            current = None if arch and sec_arch not in (None, arch) else (module, m.group(1))
            continue
        if current and re.match(r"^\s*REG:\d+", line):
            out[current] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            current = None
    return out


def parse_sass(text: str, arch: Optional[str] = None) -> Dict[Tuple[str, str], dict]:
    """`cuobjdump -sass` -> {(module, mangled): {"instructions": n, "hmma": n, ...}}."""
    out, current = {}, None
    for sec_arch, module, line in _sections(text):
        m = re.match(r"^\s*Function\s*:\s*(\S+)", line)
        if m:
            if arch and sec_arch not in (None, arch):
                current = None
            else:
                current = out.setdefault((module, m.group(1)),
                                         dict.fromkeys(["instructions", *OPCODE_CLASSES], 0))
            continue
        if current is None:
            continue
        m = INSTRUCTION_RE.match(line)
        if m:
            opcode = m.group(1)
            current["instructions"] += 1
            for name, rx in OPCODE_CLASSES.items():
                if rx.match(opcode):
                    current[name] += 1
    return out


# ---- names ------------------------------------------------------------------------------------

def _anon(s: str) -> str:
    return s.replace("(anonymous namespace)", "{anonymous}")


def split_demangled(name: str) -> Tuple[str, str]:
    """'void ns::(anonymous namespace)::k<float, int>(float const*, ...)' -> ('k', 'float, int')."""
    s, depth, end = _anon(name), 0, None
    for i, c in enumerate(s):  # the parameter list starts at the first '(' outside template args
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0:
            end = i
            break
    qualified = s[:end].strip() if end is not None else s.strip()
    args = ""
    if qualified.endswith(">"):  # peel the outermost template argument list
        depth = 0
        for i in range(len(qualified) - 1, -1, -1):
            depth += {">": 1, "<": -1}.get(qualified[i], 0)
            if depth == 0:
                args, qualified = qualified[i + 1:-1].strip(), qualified[:i]
                break
    base = re.split(r"::|\s", qualified.strip())[-1]  # drops namespaces and a return type
    return base, args


def split_mangled(name: str) -> Tuple[str, str]:
    """Fallback without c++filt: '_ZN7convops4cuda...23depthwise_forward_plainIfiEEv...' ->
    ('depthwise_forward_plain', 'fiEEv...'): the base name, and the raw mangled rest after it."""
    m = re.match(r"_Z(N?)", name)
    if not m:
        return name, ""
    pos, base = m.end(), None
    while pos < len(name):
        if name[pos] in "KVr" and m.group(1):  # cv-qualifiers of a nested name
            pos += 1
            continue
        digits = re.match(r"\d+", name[pos:])
        if not digits:
            break
        start = pos + len(digits.group())
        base, pos = name[start:start + int(digits.group())], start + int(digits.group())
        if not m.group(1):
            break
    if base is None:
        return name, ""
    rest = name[pos:]
    return base, rest[1:] if rest.startswith("I") else ""


def demangle(names: List[str]) -> Dict[str, str]:
    """Mangled -> demangled through c++filt; {} when c++filt is absent or fails."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {}
    try:
        res = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True,
                             text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = res.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {}


def dtype_of(args: str, mangled: bool = False) -> str:
    """The storage dtype an instantiation is for: fp16/bf16 if named anywhere in its template
    arguments (an fp32 accumulator type comes first in some kernels), else the first of
    float/double."""
    for label, dem, man in DTYPE_PATTERNS:
        if re.search(man if mangled else dem, args):
            return label
    if mangled:  # the first template argument, when it is a builtin float type
        return {"f": "float32", "d": "float64"}.get(args[:1], "-")
    m = re.search(r"\b(float|double)\b", args)
    return {"float": "float32", "double": "float64"}[m.group(1)] if m else "-"


# ---- the report -------------------------------------------------------------------------------

@dataclasses.dataclass
class Instantiation:
    mangled: str
    demangled: str
    template_args: str
    dtype: str
    modules: List[str]
    resources: dict           # max over the copies in several modules (same kernel in two .cu)
    counts: dict              # SASS instruction counts, max over the copies


@dataclasses.dataclass
class Kernel:
    name: str
    instantiations: List[Instantiation]

    def max_res(self, key):
        vals = [i.resources.get(key) for i in self.instantiations if key in i.resources]
        return max(vals) if vals else None

    def total(self, key):
        return sum(i.counts.get(key, 0) for i in self.instantiations)

    def with_(self, key):
        return sum(1 for i in self.instantiations if i.counts.get(key, 0))


def build_report(resource_text: str, sass_text: str, arch: Optional[str] = DEFAULT_ARCH,
                 demangled: Optional[Dict[str, str]] = None) -> List[Kernel]:
    resources = parse_resource_usage(resource_text, arch)
    sass = parse_sass(sass_text, arch)
    keys = list(dict.fromkeys([*resources, *sass]))  # resource-usage order, then any extra
    names = list(dict.fromkeys(m for _, m in keys))
    if demangled is None:
        demangled = demangle(names)
    by_mangled: Dict[str, Instantiation] = {}
    kernels: Dict[str, Kernel] = {}
    for module, mangled in keys:
        res, counts = resources.get((module, mangled), {}), sass.get((module, mangled), {})
        inst = by_mangled.get(mangled)
        if inst is None:
            if mangled in demangled:
                base, args = split_demangled(demangled[mangled])
                dtype = dtype_of(args)
            else:
                base, args = split_mangled(mangled)
                dtype = dtype_of(args, mangled=True)
            inst = Instantiation(mangled, demangled.get(mangled, mangled), args, dtype, [], {}, {})
            by_mangled[mangled] = inst
            kernels.setdefault(base, Kernel(base, [])).instantiations.append(inst)
        inst.modules.append(module)
        for src, dst in ((res, inst.resources), (counts, inst.counts)):
            for k, v in src.items():
                dst[k] = max(v, dst.get(k, v))
    return list(kernels.values())


def check(kernels: List[Kernel]) -> List[str]:
    """The --check rules (constants at the top); returns one line per violation."""
    problems = []
    by_name = {k.name: k for k in kernels}

    def label(k, i):
        return f"{k.name}<{i.template_args}>" if i.template_args else k.name

    def float_atomics(i):
        return i.counts.get("float_atomic", 0) + (i.counts.get("cas", 0)
                                                  if CAS_COUNTS_AS_FLOAT_ATOMIC else 0)

    def atomic_detail(i):
        return f"{i.counts.get('float_atomic', 0)} float atomic, {i.counts.get('cas', 0)} CAS"

    for k in kernels:  # rule 1
        for i in k.instantiations:
            # LOCAL stays 0 when nvcc 13 spills (they land in STACK): the STL/LDL count decides.
            local, spills = i.resources.get("LOCAL", 0), i.counts.get("spill", 0)
            if local or spills:
                problems.append(f"rule 1 (no spills): {label(k, i)}: LOCAL {local} bytes, "
                                f"STACK {i.resources.get('STACK', 0)} bytes, "
                                f"{spills} STL/LDL instructions")
    for name, dtypes in REQUIRED_VECTOR_LOADS.items():  # rule 2
        k = by_name.get(name)
        if k is None:
            problems.append(f"rule 2 (16-byte loads): kernel {name} not found")
            continue
        wanted = [i for i in k.instantiations if i.dtype in dtypes]
        if not wanted:
            problems.append(f"rule 2 (16-byte loads): kernel {name} has no "
                            f"{'/'.join(dtypes)} instantiation")
        for i in wanted:
            if not i.counts.get("ldg128", 0):
                problems.append(f"rule 2 (16-byte loads): {label(k, i)} has no 128-bit "
                                f"global load (LDG*.128)")
    for name, dtypes in REQUIRED_MMA.items():  # rule 5
        k = by_name.get(name)
        wanted = [i for i in k.instantiations if i.dtype in dtypes] if k is not None else []
        if not wanted:
            problems.append(f"rule 5 (tensor cores): kernel {name} has no "
                            f"{'/'.join(dtypes)} instantiation")
        for i in wanted:
            if not i.counts.get("hmma", 0):
                problems.append(f"rule 5 (tensor cores): {label(k, i)} has no HMMA")
    for k in kernels:  # rules 3 and 4
        deterministic = k.name.startswith(DETERMINISTIC_PREFIXES)
        for i in k.instantiations:
            if not float_atomics(i):
                continue
            if deterministic:
                problems.append(f"rule 3 (deterministic kernels): {label(k, i)}: "
                                f"{atomic_detail(i)}")
            elif k.name not in FLOAT_ATOMIC_ALLOWED:
                problems.append(f"rule 4 (float atomics only in {', '.join(FLOAT_ATOMIC_ALLOWED)}"
                                f"): {label(k, i)}: {atomic_detail(i)}")
    return problems


COLUMNS = ["kernel", "inst", "dtypes", "max REG", "max SHARED", "max LOCAL", "max STACK",
           "HMMA", "LDG.128", "STL/LDL", "float atomics", "CAS"]


def markdown(kernels: List[Kernel], so: str, arch: str, tool_version: str) -> str:
    def count(k, key):  # total over the instantiations (how many of them have any)
        total = k.total(key)
        return f"{total} ({k.with_(key)}/{len(k.instantiations)})" if total else "0"

    def res(k, key):
        v = k.max_res(key)
        return "-" if v is None else str(v)

    lines = [f"# SASS report: `{so}`, {arch}, cuobjdump {tool_version}", "",
             "Per kernel over its template instantiations (inst; copies compiled into several "
             ".cu files are counted once): max registers, static shared, local (spill) and "
             "stack bytes; SASS instruction totals (in how many instantiations). HMMA = "
             "HMMA/HGMMA tensor-core MMA, LDG.128 = 16-byte global loads, float atomics = "
             "RED/ATOM with an F16/BF16/F32/F64 type, CAS = compare-and-swap atomics.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for k in kernels:
        dtypes = sorted({i.dtype for i in k.instantiations},
                        key=["float32", "float64", "float16", "bfloat16", "-"].index)
        lines.append("| " + " | ".join([
            k.name, str(len(k.instantiations)), ", ".join(dtypes),
            res(k, "REG"), res(k, "SHARED"), res(k, "LOCAL"), res(k, "STACK"),
            count(k, "hmma"), count(k, "ldg128"), count(k, "spill"),
            count(k, "float_atomic"), count(k, "cas")]) + " |")
    return "\n".join(lines) + "\n"


def to_json(kernels: List[Kernel], so: str, arch: str, tool_version: str,
            violations: Optional[List[str]]) -> dict:
    return {"so": so, "arch": arch, "cuobjdump": tool_version,
            "regexes": {"instruction": INSTRUCTION_RE.pattern,
                        **{k: v.pattern for k, v in OPCODE_CLASSES.items()}},
            "kernels": [{"name": k.name, "instantiations": [dataclasses.asdict(i)
                                                            for i in k.instantiations]}
                        for k in kernels],
            "violations": violations}


# ---- tools and input --------------------------------------------------------------------------

def find_tool(name: str) -> Optional[str]:
    """PATH, then $CUDA_HOME/bin, then the pip wheels (site-packages/nvidia/<cuXX>/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidate = os.path.join(os.environ[var], "bin", name)
            if os.access(candidate, os.X_OK):
                return candidate
    try:
        import nvidia  # namespace package of NVIDIA's pip wheels
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for candidate in sorted(glob.glob(os.path.join(base, "*", "bin", name)), reverse=True):
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def default_so() -> str:
    """The _C extension next to convops/__init__.py, found without importing convops (or torch)."""
    spec = importlib.util.find_spec("convops")
    if spec is None or not spec.submodule_search_locations:
        raise ToolError("convops is not importable from here; pass --so PATH")
    for where in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:  # the order import tries them
            path = os.path.join(where, "_C" + suffix)
            if os.path.exists(path):
                return path
    raise ToolError(f"no _C*.so in {list(spec.submodule_search_locations)}: build convops "
                    f"first, or pass --so PATH")


def run_cuobjdump(so: str, arch: str) -> Tuple[str, str, str]:
    """(resource-usage text, SASS text, tool version) for `arch` in `so`."""
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise ToolError("cuobjdump not found (looked in PATH, $CUDA_HOME/bin and "
                        f"site-packages/nvidia/*/bin): {PIP_TOOLS}")
    nvdisasm = find_tool("nvdisasm")
    if nvdisasm is None:  # cuobjdump -sass runs nvdisasm from PATH
        raise ToolError(f"nvdisasm not found (cuobjdump -sass needs it): {PIP_TOOLS}")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(nvdisasm), os.path.dirname(cuobjdump),
                                   env.get("PATH", "")])

    def run(*args):
        res = subprocess.run([cuobjdump, *args], capture_output=True, text=True, env=env)
        if "does not contain device code" in res.stdout + res.stderr:
            raise ToolError(f"{so} has no CUDA device code (a CPU-only build? rebuild with "
                            f"FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0)")
        if res.returncode != 0:
            raise ToolError(f"{' '.join([cuobjdump, *args])} failed ({res.returncode}): "
                            f"{res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    version_lines = [ln for ln in run("--version").splitlines() if "release" in ln]
    m = re.search(r"release ([\d.]+), (V[\d.]+)", version_lines[0]) if version_lines else None
    version = f"{m.group(1)} ({m.group(2)})" if m else "(version unknown)"
    return (run("--dump-resource-usage", "-arch", arch, so), run("-sass", "-arch", arch, so),
            version)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--so", metavar="PATH", help="extension to read (default: convops' _C*.so)")
    p.add_argument("--arch", default=DEFAULT_ARCH, help=f"cubin to read (default {DEFAULT_ARCH})")
    p.add_argument("--markdown", metavar="PATH", help="also write the table here")
    p.add_argument("--json", metavar="PATH", help="per-instantiation details as JSON")
    p.add_argument("--check", action="store_true",
                   help="assert the rules at the top of bench/sass.py; exit 1 on a violation")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        so = args.so or default_so()
        if not os.path.exists(so):
            raise ToolError(f"{so}: no such file")
        resource_text, sass_text, version = run_cuobjdump(so, args.arch)
        kernels = build_report(resource_text, sass_text, args.arch)
        if not kernels:
            raise ToolError(f"no {args.arch} device code in {so} (a CPU-only build? build with "
                            f"FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0)")
    except ToolError as e:
        print(f"bench.sass: {e}", file=sys.stderr)
        return 2
    table = markdown(kernels, so, args.arch, version)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    violations = check(kernels) if args.check else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(kernels, so, args.arch, version, violations), f, indent=1)
    if violations:
        print(f"sass check: {len(violations)} violation(s)")
        for v in violations:
            print(f"  {v}")
        return 1
    if args.check:
        print(f"sass check: OK ({len(kernels)} kernels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
