#!/usr/bin/env bash
# The whole GPU pass, on a GPU machine with no network (torch, pytest, torchvision, hypothesis,
# matplotlib and compute-sanitizer already there):
#   bash bench/gpu_check.sh OUTDIR [build] [tests] [sanitizer] [bench]
# With no step named, runs all four. Steps:
#   build      the extension with the CUDA sources for this GPU's arch (editable install)
#   tests      the full test suite, CUDA tests included (emulator tests run too)
#   sanitizer  compute-sanitizer memcheck, racecheck and initcheck over a focused subset
#   bench      the full GPU benchmark (JSON, Markdown, plot)
# Each step's log goes to OUTDIR (8 files at most); a failed step does not stop the others, and
# the exit status says whether any failed.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTDIR [build] [tests] [sanitizer] [bench]}
shift
steps=${*:-build tests sanitizer bench}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
failed=0

run_step() {  # run_step NAME COMMAND...: log to OUTDIR/NAME.log, print its last lines
  local name=$1
  shift
  echo "== $name: $*"
  if "$@" > "$out/$name.log" 2>&1; then echo "-- $name ok"; else echo "-- $name FAILED"; failed=1; fi
  tail -n 5 "$out/$name.log"
}

sanitize() {  # the CUDA edge-geometry tests and a slice of the grids under each tool
  local tool status=0
  for tool in memcheck racecheck initcheck; do
    echo "### compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 97 --target-processes all \
      python -m pytest -q -p no:cacheprovider tests/test_edge_geometry.py -k cuda \
      tests/test_depthwise.py::test_large_kernels_gpu || status=1
  done
  return $status
}

for step in $steps; do
  case $step in
    build)
      arch=$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
      run_step build env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
        pip install --no-build-isolation --no-deps -e .
      python -m convops.info > "$out/info.txt" 2>&1 || failed=1
      grep -Eq '^cuda_compiled +True' "$out/info.txt" || { echo "CUDA kernels not built"; failed=1; }
      ;;
    tests) run_step tests python -m pytest -q -p no:cacheprovider -rs tests ;;
    sanitizer) run_step sanitizer sanitize ;;
    bench)
      # fp32 rows with TF32 off on every side (the bench default, stated in its output)
      run_step bench python -m bench --device cuda --tf32 off --json "$out/bench.json" \
        --markdown "$out/bench.md" --plot "$out/bench.png"
      ;;
    *) echo "unknown step '$step'"; exit 2 ;;
  esac
done
exit $failed
