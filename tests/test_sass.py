"""bench.sass (the compiler report): parsing of cuobjdump's output and the --check rules, on canned
text. The instruction lines and resource lines below are copied from cuobjdump 13.5 output on
sm_90 cubins (this project's FORCE_CUDA build, and small nvcc 13.0 test kernels); each function is
cut down to the lines that matter. No cuobjdump needed."""
import pytest

from bench import sass

WEIGHT_GRAD = ("_ZN7convops4cuda57_GLOBAL__N__c3315f4f_19_depthwise_conv2d_cu_81307274_455521"
               "depthwise_weight_gradIN3c108BFloat16ElEEvPKT_S7_PS5_NS1_6ParamsIT0_EE")
VEC_HALF = ("_ZN7convops4cuda57_GLOBAL__N__c3315f4f_19_depthwise_conv2d_cu_81307274_455526"
            "depthwise_forward_nhwc_vecIN3c104HalfEiEEvPKT_PS5_T0_")
VEC_BF16 = VEC_HALF.replace("3c104Half", "3c108BFloat16")
SPILL = "_Z5spillPKfPfi"
COL2IM = ("_ZN7convops4cuda20gather_col2im_atomicIfNS_13DeformSamplerIfN3c104HalfElEEEEvT0_"
          "NS_14DeformGeometryEllPKT_PS8_")
GEMM = "_ZN7convops4cuda10tiled_gemmIfEEvNS0_8GemmArgsIT_EE"


def _header(source, arch="sm_90"):
    return f"""
Fatbin elf code:
================
arch = {arch}
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /work/main/csrc/cuda/{source}
"""


def _res(name, reg, stack=0, shared=0, local=0):
    return (f" Function {name}:\n  REG:{reg} STACK:{stack} SHARED:{shared} LOCAL:{local} "
            f"CONSTANT[0]:888 TEXTURE:0 SURFACE:0 SAMPLER:0\n")


RESOURCE_USAGE = (
    _header("depthwise_conv2d.cu") + "\nResource usage:\n Common:\n  GLOBAL:28 CONSTANT[4]:224\n"
    + _res(WEIGHT_GRAD, 42, shared=1088) + _res(VEC_HALF, 14) + _res(VEC_BF16, 16)
    + _res(SPILL, 32, stack=656)
    + _header("deform_conv2d.cu") + "\nResource usage:\n Common:\n  GLOBAL:28 CONSTANT[4]:224\n"
    + _res(COL2IM, 32) + _res(GEMM, 32, shared=5120)
    + _header("dilated_conv2d.cu") + "\nResource usage:\n Common:\n  GLOBAL:28 CONSTANT[4]:224\n"
    + _res(GEMM, 30, shared=5120)
    # Another arch in the same fatbinary: read only when asked for.
    + _header("dilated_conv2d.cu", arch="sm_80") + "\nResource usage:\n Common:\n  GLOBAL:28\n"
    + _res(GEMM, 255, local=64))

PAD = " " * 60  # the encoding column, as cuobjdump aligns it


def _fn(name, *instructions):
    lines = [f"\n\t\tFunction : {name}",
             '\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"']
    for addr, ins in enumerate(instructions):
        lines.append(f"        /*{addr * 16:04x}*/{' ' * 19}{ins:<56}/* 0x00000a00ff017b82 */")
        lines.append(f"{PAD}                                /* 0x000fe20000000800 */")
    lines.append("\t\t..........\n")
    return "\n".join(lines) + "\n"


SASS = (
    _header("depthwise_conv2d.cu") + "\n\tcode for sm_90\n\t.target\tsm_90\n"
    + _fn(WEIGHT_GRAD,
          "LDC R1, c[0x0][0x28] ;",
          "@P0 EXIT ;",
          "LDG.E.U16.CONSTANT R2, desc[UR4][R2.64] ;",
          "REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R4.64], R7 ;",
          "REDG.E.ADD.STRONG.GPU desc[UR6][R4.64], R9 ;",  # integer: not a float atomic
          "EXIT ;", "BRA 0x160;", "NOP;")
    + _fn(VEC_HALF,
          "LDC R1, c[0x0][0x28] ;",
          "LDG.E.128.CONSTANT R8, desc[UR4][R4.64] ;",
          "@!P0 LDG.E.128 R12, desc[UR4][R2.64] ;",
          "STG.E.128 desc[UR4][R2.64], R8 ;",
          "EXIT ;")
    + _fn(VEC_BF16,
          "LDG.E.U16.CONSTANT R32, desc[UR14][R34.64] ;",
          "LDS.128 R12, [R18] ;",
          "HFMA2.MMA R13, -RZ, RZ, 1.984375, 0 ;",  # an FMA, not a tensor-core MMA
          "EXIT ;")
    + _fn(SPILL,
          "STL [R1+0x190], R24 ;",
          "STL.128 [R1+0x1b0], R4 ;",
          "LDL.LU R23, [R1+0x280] ;",
          "LDL R4, [R1+0x100] ;",
          "EXIT ;")
    + _header("deform_conv2d.cu") + "\n\tcode for sm_90\n\t.target\tsm_90\n"
    + _fn(COL2IM,
          "REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR8][R18.64], R9 ;",
          "REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR8][R2.64+0x4], R5 ;",
          "ATOM.E.ADD.F16x2.RN.STRONG.GPU P0, RZ, desc[UR6][R4.64], R7 ;",
          "ATOMS.CAST.SPIN R7, [R4], R6, R7 ;",
          "EXIT ;")
    + _fn(GEMM,
          "LDGSTS.E.BYPASS.128 [R7], desc[UR6][R2.64] ;",
          "HMMA.16816.F32.BF16 R16, R4.reuse, R12, RZ ;",
          "HMMA.16816.F32 R12, R4, R14, RZ ;",
          "EXIT ;")
    + _header("dilated_conv2d.cu") + "\n\tcode for sm_90\n\t.target\tsm_90\n"
    + _fn(GEMM,
          "LDGSTS.E.BYPASS.128 [R7], desc[UR6][R2.64] ;",
          "HMMA.16816.F32.BF16 R16, R4.reuse, R12, RZ ;",
          "EXIT ;")
    + _header("dilated_conv2d.cu", arch="sm_80") + "\n\tcode for sm_80\n\t.target\tsm_80\n"
    + _fn(GEMM, "STL [R1+0x190], R24 ;", "EXIT ;"))

DEMANGLED = {
    WEIGHT_GRAD: "void convops::cuda::(anonymous namespace)::depthwise_weight_grad<c10::BFloat16, "
                 "long>(c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16*, "
                 "convops::cuda::(anonymous namespace)::Params<long>)",
    VEC_HALF: "void convops::cuda::(anonymous namespace)::depthwise_forward_nhwc_vec<c10::Half, "
              "int>(c10::Half const*, c10::Half*, int)",
    VEC_BF16: "void convops::cuda::(anonymous namespace)::depthwise_forward_nhwc_vec<"
              "c10::BFloat16, int>(c10::BFloat16 const*, c10::BFloat16*, int)",
    SPILL: "spill(float const*, float*, int)",
    COL2IM: "void convops::cuda::gather_col2im_atomic<float, convops::DeformSampler<float, "
            "c10::Half, long> >(convops::DeformSampler<float, c10::Half, long>, "
            "convops::DeformGeometry, long, long, float const*, float*)",
    GEMM: "void convops::cuda::tiled_gemm<float>(convops::cuda::GemmArgs<float>)",
}


def test_resource_usage_parsed_per_module_and_arch():
    res = sass.parse_resource_usage(RESOURCE_USAGE, "sm_90")
    assert len(res) == 7  # the sm_80 copy of tiled_gemm is left out
    assert res[("/work/main/csrc/cuda/depthwise_conv2d.cu", WEIGHT_GRAD)] == {
        "REG": 42, "STACK": 0, "SHARED": 1088, "LOCAL": 0, "CONSTANT[0]": 888, "TEXTURE": 0,
        "SURFACE": 0, "SAMPLER": 0}
    assert res[("/work/main/csrc/cuda/depthwise_conv2d.cu", SPILL)]["STACK"] == 656
    assert res[("/work/main/csrc/cuda/dilated_conv2d.cu", GEMM)]["REG"] == 30
    assert sass.parse_resource_usage(RESOURCE_USAGE, "sm_80")[
        ("/work/main/csrc/cuda/dilated_conv2d.cu", GEMM)]["LOCAL"] == 64


def test_sass_instruction_counts():
    counts = sass.parse_sass(SASS, "sm_90")
    dw = "/work/main/csrc/cuda/depthwise_conv2d.cu"
    assert counts[(dw, WEIGHT_GRAD)] == {"instructions": 8, "hmma": 0, "ldg128": 0, "spill": 0,
                                         "float_atomic": 1, "cas": 0}
    assert counts[(dw, VEC_HALF)]["ldg128"] == 2  # a predicated one too
    assert counts[(dw, VEC_BF16)] == {"instructions": 4, "hmma": 0, "ldg128": 0, "spill": 0,
                                      "float_atomic": 0, "cas": 0}
    assert counts[(dw, SPILL)]["spill"] == 4
    col2im = counts[("/work/main/csrc/cuda/deform_conv2d.cu", COL2IM)]
    assert (col2im["float_atomic"], col2im["cas"]) == (3, 1)
    gemm = counts[("/work/main/csrc/cuda/deform_conv2d.cu", GEMM)]
    assert (gemm["hmma"], gemm["ldg128"], gemm["spill"]) == (2, 1, 0)
    assert len(counts) == 7  # the sm_80 function is left out


@pytest.mark.parametrize("opcode, classes", [
    ("HMMA.16816.F32", {"hmma"}), ("HMMA.16816.F32.BF16", {"hmma"}), ("HFMA2.MMA", set()),
    ("LDG.E.128", {"ldg128"}), ("LDG.E.128.CONSTANT", {"ldg128"}),
    ("LDGSTS.E.BYPASS.128", {"ldg128"}), ("LDG.E.64.CONSTANT", set()),
    ("LDG.E.U16.CONSTANT", set()), ("LDS.128", set()), ("STG.E.128", set()),
    ("LDGSTS.E.BYPASS.LTC128B", set()),
    ("STL", {"spill"}), ("STL.128", {"spill"}), ("LDL.LU", {"spill"}), ("LDL.LU.128", {"spill"}),
    ("LDL.64", {"spill"}), ("LDS", set()), ("LDC.64", set()),
    ("REDG.E.ADD.F32.FTZ.RN.STRONG.GPU", {"float_atomic"}),
    ("ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU", {"float_atomic"}),
    ("REDG.E.ADD.F64.RN.STRONG.GPU", {"float_atomic"}),
    ("ATOMG.E.ADD.F64.RN.STRONG.GPU", {"float_atomic"}),
    ("ATOM.E.ADD.F16x2.RN.STRONG.GPU", {"float_atomic"}),
    ("ATOM.E.ADD.BF16x2.RN.STRONG.GPU", {"float_atomic"}),
    ("REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU", {"float_atomic"}),
    ("RED.E.ADD.F32.FTZ.RN.STRONG.GPU", {"float_atomic"}),
    ("UBLKRED.G.S.ADD.F32.RN", {"float_atomic"}),
    ("REDG.E.ADD.STRONG.GPU", set()), ("ATOMG.E.ADD.STRONG.GPU", set()),
    ("REDG.E.MAX.S32.STRONG.GPU", set()), ("REDUX.SUM", set()),
    ("ATOM.E.CAS.STRONG.GPU", {"cas"}), ("ATOMS.CAST.SPIN", {"cas"}),
    ("ATOMS.CAST.SPIN.64", {"cas"}),
])
def test_opcode_classes(opcode, classes):
    assert {name for name, rx in sass.OPCODE_CLASSES.items() if rx.match(opcode)} == classes


def test_names_demangled_and_fallback():
    assert sass.split_demangled(DEMANGLED[COL2IM]) == (
        "gather_col2im_atomic", "float, convops::DeformSampler<float, c10::Half, long>")
    assert sass.split_demangled(DEMANGLED[WEIGHT_GRAD]) == ("depthwise_weight_grad",
                                                            "c10::BFloat16, long")
    assert sass.split_demangled(DEMANGLED[SPILL]) == ("spill", "")
    assert sass.split_mangled(WEIGHT_GRAD)[0] == "depthwise_weight_grad"
    assert sass.split_mangled(GEMM) == ("tiled_gemm", "fEEvNS0_8GemmArgsIT_EE")
    assert sass.split_mangled(SPILL) == ("spill", "")
    # fp16/bf16 anywhere in the arguments wins over an fp32 accumulator type in front.
    assert sass.dtype_of("float, convops::DeformSampler<float, c10::Half, long>") == "float16"
    assert sass.dtype_of("double, int") == "float64"
    assert sass.dtype_of(sass.split_mangled(COL2IM)[1], mangled=True) == "float16"
    assert sass.dtype_of(sass.split_mangled(VEC_BF16)[1], mangled=True) == "bfloat16"
    assert sass.dtype_of(sass.split_mangled(GEMM)[1], mangled=True) == "float32"


@pytest.mark.parametrize("demangled", [DEMANGLED, {}], ids=["c++filt", "regex-fallback"])
def test_report_groups_instantiations(demangled):
    kernels = {k.name: k for k in sass.build_report(RESOURCE_USAGE, SASS, "sm_90", demangled)}
    assert list(kernels) == ["depthwise_weight_grad", "depthwise_forward_nhwc_vec", "spill",
                             "gather_col2im_atomic", "tiled_gemm"]
    vec = kernels["depthwise_forward_nhwc_vec"]
    assert [i.dtype for i in vec.instantiations] == ["float16", "bfloat16"]
    assert (vec.max_res("REG"), vec.total("ldg128"), vec.with_("ldg128")) == (16, 2, 1)
    gemm = kernels["tiled_gemm"]  # one instantiation compiled into two modules: counted once
    assert len(gemm.instantiations) == 1 and len(gemm.instantiations[0].modules) == 2
    assert (gemm.max_res("REG"), gemm.total("hmma"), gemm.total("spill")) == (32, 2, 0)
    table = sass.markdown(list(kernels.values()), "_C.so", "sm_90", "13.5 (V13.5.37)")
    assert "| depthwise_forward_nhwc_vec | 2 | float16, bfloat16 | 16 |" in table
    assert "| spill | 1 | - | 32 | 0 | 0 | 656 | 0 | 0 | 4 (1/1) | 0 | 0 |" in table


def test_check_reports_every_violation(depthwise_rules):
    problems = sass.check(sass.build_report(RESOURCE_USAGE, SASS, "sm_90", DEMANGLED))
    assert problems == [
        "rule 1 (no spills): spill: LOCAL 0 bytes, STACK 656 bytes, 4 STL/LDL instructions",
        "rule 2 (16-byte loads): depthwise_forward_nhwc_vec<c10::BFloat16, int> has no 128-bit "
        "global load (LDG*.128)",
        "rule 3 (deterministic kernels): depthwise_weight_grad<c10::BFloat16, long>: "
        "1 float atomic, 0 CAS",
    ]


def _only(*names):
    """The fixtures restricted to the given functions (whole Function blocks)."""
    def keep(text, marker):
        out, drop = [], False
        for line in text.splitlines():
            if line.strip().startswith(marker):
                drop = not any(n in line for n in names)
            elif line.strip().startswith(("Fatbin", "Resource usage")):
                drop = False
            if not drop:
                out.append(line)
        return "\n".join(out)
    return keep(RESOURCE_USAGE, "Function"), keep(SASS, "Function")


@pytest.fixture
def depthwise_rules(monkeypatch):
    """The synthetic report holds depthwise and plain-engine kernels only: check it against
    the rules about those."""
    monkeypatch.setattr(sass, "REQUIRED_VECTOR_LOADS",
                        {"depthwise_forward_nhwc_vec": ("float16", "bfloat16")})
    monkeypatch.setattr(sass, "REQUIRED_MMA", {})


def test_check_tensor_core_rule(depthwise_rules, monkeypatch):
    kernels = sass.build_report(*_only(COL2IM, GEMM, VEC_HALF), "sm_90", DEMANGLED)
    monkeypatch.setattr(sass, "REQUIRED_MMA", {"tiled_gemm": ("float32",)})
    assert sass.check(kernels) == []
    monkeypatch.setattr(sass, "REQUIRED_MMA", {"depthwise_forward_nhwc_vec": ("float16",)})
    assert sass.check(kernels) == [
        "rule 5 (tensor cores): depthwise_forward_nhwc_vec<c10::Half, int> has no HMMA"]
    monkeypatch.setattr(sass, "REQUIRED_MMA", {"igemm_forward": ("float16",)})
    assert sass.check(kernels) == [
        "rule 5 (tensor cores): kernel igemm_forward has no float16 instantiation"]


def test_engine_rules_name_the_engine_kernels():
    assert set(sass.REQUIRED_MMA) == {"igemm_forward", "igemm_weight_grad",
                                      "igemm_data_grad_atomic", "igemm_data_grad_fixed"}
    assert "igemm_data_grad_fixed" in sass.DETERMINISTIC_PREFIXES
    assert "igemm_data_grad_atomic" in sass.FLOAT_ATOMIC_ALLOWED


def test_check_missing_required_kernel_and_clean_build(depthwise_rules):
    kernels = sass.build_report(*_only(COL2IM, GEMM), "sm_90", DEMANGLED)
    assert sass.check(kernels) == ["rule 2 (16-byte loads): kernel depthwise_forward_nhwc_vec "
                                   "not found"]
    kernels = sass.build_report(*_only(COL2IM, GEMM, VEC_HALF), "sm_90", DEMANGLED)
    assert sass.check(kernels) == []


def test_check_atomics_outside_allow_list(depthwise_rules, monkeypatch):
    kernels = sass.build_report(*_only(COL2IM, VEC_HALF), "sm_90", DEMANGLED)
    monkeypatch.setattr(sass, "FLOAT_ATOMIC_ALLOWED", ("tiled_gemm",))
    assert sass.check(kernels) == [
        "rule 4 (float atomics only in tiled_gemm): gather_col2im_atomic<float, "
        "convops::DeformSampler<float, c10::Half, long>>: 3 float atomic, 1 CAS"]
    monkeypatch.setattr(sass, "REQUIRED_VECTOR_LOADS", {"depthwise_forward_nhwc_vec":
                                                       ("bfloat16",)})
    assert sass.check(kernels)[0] == ("rule 2 (16-byte loads): kernel depthwise_forward_nhwc_vec "
                                      "has no bfloat16 instantiation")


def test_main_check(tmp_path, monkeypatch, capsys, depthwise_rules):
    so = tmp_path / "_C.so"
    so.write_bytes(b"")
    monkeypatch.setattr(sass, "demangle", lambda names: DEMANGLED)
    monkeypatch.setattr(sass, "run_cuobjdump",
                        lambda path, arch: (*_only(COL2IM, GEMM, VEC_HALF), "13.5 (V13.5.37)"))
    md, js = tmp_path / "sass.md", tmp_path / "sass.json"
    assert sass.main(["--so", str(so), "--check", "--markdown", str(md), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("sass check: OK (3 kernels)")
    assert md.read_text().startswith(f"# SASS report: `{so}`, sm_90, cuobjdump 13.5 (V13.5.37)")
    assert '"violations": []' in js.read_text()

    monkeypatch.setattr(sass, "run_cuobjdump", lambda path, arch: (RESOURCE_USAGE, SASS, "13.5"))
    assert sass.main(["--so", str(so), "--check"]) == 1
    assert "sass check: 3 violation(s)" in capsys.readouterr().out


def test_missing_cuobjdump_names_the_pip_packages(tmp_path, monkeypatch, capsys):
    so = tmp_path / "_C.so"
    so.write_bytes(b"")
    monkeypatch.setattr(sass, "find_tool", lambda name: None)
    assert sass.main(["--so", str(so)]) == 2
    assert "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm" in capsys.readouterr().err
