#!/usr/bin/env bash
# The one prepared command for a GPU machine at hand for a few minutes (`make gpu-check OUT=dir`):
#   1. build against the torch found there (python3, or $PY), for sm_90a only, on all cores;
#   2. under compute-sanitizer (memcheck, racecheck, synccheck), when it is there, the three places
#      the CUDA review found riskiest (tools/gpu_sanitize.py);
#   3. every test marked gpu: the CUDA kernels' and the Triton kernels compiled on CUDA tensors;
#   4. the GPU benchmarks (benchmarks/bench_*_cuda.py);
#   5. a summary of all of it, as JSON and Markdown, in OUT (tools/gpu_summary.py).
# Every step has a time limit, so that the whole stays under 8 minutes and the summary is always
# written. Without a GPU it runs dry: a CPU build, the same collection of tests (every one of them
# skipped), the benchmarks' collection, the summary; CI runs it that way so that it does not rot.
# The build replaces the installed library: make's build stamps are removed, so the next `make`
# builds again with its own settings.
set -uo pipefail
OUT=${1:?"usage: tools/gpu_check.sh OUT_DIR"}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
STEPS="$OUT/steps.tsv"
: > "$STEPS"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  MODE=gpu
else
  MODE=dry
fi
echo "gpu-check: mode $MODE, python $("$PY" -c 'import sys; print(sys.executable)'), output $OUT"

# step NAME LIMIT_S LOG CMD...: runs CMD with a time limit, its output to LOG, and records the result
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$(basename "$log")" >> "$STEPS"
  echo "gpu-check: $name: exit $rc in $((SECONDS - t0)) s (log: $log)"
  return $rc
}

NPROC=$(nproc 2>/dev/null || echo 2)
if [ "$MODE" = gpu ]; then
  BUILD_ENV=(LETHE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS="$NPROC")
else
  BUILD_ENV=(LETHE_BUILD_CUDA=0 MAX_JOBS="$NPROC")
fi
step build 240 "$OUT/build.log" env "${BUILD_ENV[@]}" "$PY" -m pip install -v --no-build-isolation --no-deps \
  --no-index -e .
rm -f build/.built-*
step ptxas 120 "$OUT/ptxas.log" "$PY" tools/ptxas_report.py "$OUT/build.log"

if [ "$MODE" = gpu ] && command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do
    step "sanitize-$tool" 60 "$OUT/sanitize-$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" tools/gpu_sanitize.py
  done
fi

XDIST=()
if [ "$MODE" = gpu ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n 4)
fi
rm -f "$OUT/tests.jsonl"
step tests 150 "$OUT/tests.log" env LETHE_TEST_LOG="$OUT/tests.jsonl" "$PY" -m pytest -q -m gpu -p no:cacheprovider "${XDIST[@]}" \
  --junitxml="$OUT/tests.xml" tests
rm -f benchmarks/results/*_cuda.json
step benchmarks 120 "$OUT/benchmarks.log" "$PY" -m pytest -q -s -o python_files="bench_*_cuda.py" \
  -p no:cacheprovider --junitxml="$OUT/benchmarks.xml" benchmarks
cp benchmarks/results/*_cuda.json "$OUT"/ 2> /dev/null

"$PY" tools/gpu_summary.py "$OUT" "$MODE"
