#!/usr/bin/env bash
# The one prepared command for a GPU machine at hand for a few minutes (`make gpu-check OUT=dir`):
#   1. build against the torch found there (python3, or $PY), for sm_90a only, on all cores, and
#      report the registers and spills of its kernels;
#   2. under compute-sanitizer (memcheck, racecheck, synccheck), when it is there, the three places
#      the CUDA review found riskiest (tools/gpu_sanitize.py);
#   3. every test marked gpu: the CUDA kernels' and the Triton kernels compiled on CUDA tensors;
#   4. the GPU benchmarks (benchmarks/bench_*_cuda.py), at sizes that fit the time;
#   5. a summary of all of it, as JSON and Markdown, in OUT (tools/gpu_summary.py), written whatever
#      happened before (also when a step runs out of time).
# Each step has a time limit, and all of them one deadline (GPU_CHECK_SECONDS, default 450 s), so that
# the whole stays under 8 minutes. Without a GPU it runs dry: a CPU build, the same collection of
# tests (every one of them skipped), the benchmarks' collection, the summary; CI runs it that way so
# that it does not rot. The build replaces the installed library: make's build stamps are removed,
# so the next `make` builds again with its own settings.
set -uo pipefail
OUT=${1:?"usage: tools/gpu_check.sh OUT_DIR"}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # from the caller's directory
cd "$(dirname "$0")/.."
PY=${PY:-python3}
STEPS="$OUT/steps.tsv"
: > "$STEPS"
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-450}))

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  MODE=gpu
elif command -v nvidia-smi > /dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  echo "gpu-check: nvidia-smi lists a GPU, but torch (from $PY) cannot use it:" >&2
  "$PY" -c "import torch; print(torch.__version__, torch.version.cuda); torch.zeros(1, device='cuda')" >&2
  exit 2
else
  MODE=dry
fi
trap '"$PY" tools/gpu_summary.py "$OUT" "$MODE"; exit $?' EXIT
trap 'exit 143' TERM INT  # so that the summary is written when the whole command is stopped
echo "gpu-check: mode $MODE, python $("$PY" -c 'import sys; print(sys.executable)'), output $OUT"

# step NAME LIMIT_S LOG CMD...: CMD with a time limit (and never past the deadline), its output to
# LOG; the result goes to steps.tsv
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((DEADLINE - SECONDS - 5))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "$(basename "$log")" >> "$STEPS"
    echo "gpu-check: $name: no time left" | tee "$log"
    return 124
  fi
  local t0=$SECONDS
  timeout --kill-after=3 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$(basename "$log")" >> "$STEPS"
  echo "gpu-check: $name: exit $rc in $((SECONDS - t0)) s (log: $log)"
  return $rc
}

for need in "import setuptools, wheel" "import ninja" "import pytest"; do
  "$PY" -c "$need" 2>/dev/null || echo "gpu-check: missing for $PY: '$need' (the build or tests may fail)"
done
NPROC=$(nproc 2>/dev/null || echo 2)
if [ "$MODE" = gpu ]; then
  BUILD_ENV=(LETHE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS="$NPROC")
else
  BUILD_ENV=(LETHE_BUILD_CUDA=0 MAX_JOBS="$NPROC")
fi
step build 200 "$OUT/build.log" env "${BUILD_ENV[@]}" "$PY" -m pip install -v --no-build-isolation --no-deps \
  --no-index -e .
rm -f build/.built-*
step ptxas 40 "$OUT/ptxas.log" "$PY" tools/ptxas_report.py "$OUT/build.log"

if [ "$MODE" = gpu ] && command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do
    step "sanitize-$tool" 25 "$OUT/sanitize-$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" tools/gpu_sanitize.py
  done
fi

XDIST=()
if [ "$MODE" = gpu ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n 4)
fi
rm -f "$OUT/tests.jsonl"
step tests 110 "$OUT/tests.log" env LETHE_TEST_LOG="$OUT/tests.jsonl" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  ${XDIST[@]+"${XDIST[@]}"} tests
rm -f benchmarks/results/*_cuda.json
step benchmarks 80 "$OUT/benchmarks.log" env LETHE_BENCH_SHRED_CUDA="${LETHE_BENCH_SHRED_CUDA:-4096,4096,128256,64}" \
  LETHE_BENCH_TOKEN_STATS_CUDA="${LETHE_BENCH_TOKEN_STATS_CUDA:-4096,4096,128256}" "$PY" -m pytest -q -s -o python_files="bench_*_cuda.py" -p no:cacheprovider benchmarks
cp benchmarks/results/*_cuda.json "$OUT"/ 2> /dev/null
exit 0  # the summary (trap) sets the exit status
