#!/usr/bin/env bash
# The GPU check of kvtier's copy engine, in one run of a few minutes (budget
# 470 s) on a machine with an NVIDIA GPU, PyTorch with CUDA and nvcc. Needs
# neither vLLM nor the network. Each step prints one line; the last line is
# one JSON object ({"ok": ..., "steps": {...}, "bench": {...}, ...}).
#
#   build      pip install -e . (no deps, no build isolation): the extension,
#              with its CUDA path where nvcc is found
#   nvcc       csrc/copy/check_cuda_build.sh: the .cu sources compile (sm_90 + PTX)
#   tests      tests/copy/test_copy_engine.py and tests/copy/test_copy_engine_cuda.py
#              (self-check fallback, kernel and DMA paths against torch, ordering)
#   worker     tests/vllm/test_worker_cuda.py: KVTierWorker on a FlashAttention-shaped
#              CUDA cache, copies ordered after unsynchronized "vLLM" work
#   bench      the GPU section of benchmarks/copy_engine.py
#   memcheck   compute-sanitizer memcheck over benchmarks/gpu_round_trip.py
#   racecheck  compute-sanitizer racecheck over it, kernel path
#
# Without a GPU it runs what the CPU allows (build, nvcc, the CPU cases of the
# tests and worker steps) and says which steps it skipped, and why.
#
#   benchmarks/gpu_check.sh
#   PYTHON=python3 (the interpreter with torch), KVTIER_GPU_CHECK_BUILD=0
#   (use the installed build), KVTIER_GPU_CHECK_LOGS=DIR (each step's full
#   output, DIR/<step>.log; default a new directory under /tmp).
# Exit status: 0 when no step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python3}
BUDGET=${KVTIER_GPU_CHECK_SECONDS:-470}
LOGS=${KVTIER_GPU_CHECK_LOGS:-$(mktemp -d /tmp/kvtier-gpu-check.XXXXXX)}
mkdir -p "$LOGS"
RESULTS=$LOGS/results.tsv
: >"$RESULTS"
START=$SECONDS

find_tool() {  # name: on PATH, else in /usr/local/cuda/bin, else nothing
  command -v "$1" 2>/dev/null || { [ -x "/usr/local/cuda/bin/$1" ] && echo "/usr/local/cuda/bin/$1"; } || true
}
NVCC=${NVCC:-$(find_tool nvcc)}
SANITIZER=$(find_tool compute-sanitizer)
export PY NVCC SANITIZER PYTHONUNBUFFERED=1

record() {  # step status seconds summary
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"
  printf 'gpu_check: %-9s %-4s %4s s  %s\n' "$1" "${2^^}" "$3" "$4"
}

skip() { record "$1" skip 0 "$2"; }

# run_step name limit function: runs the function (exported) in bash under
# timeout, its output in $LOGS/name.log; the summary is its last "SUMMARY: "
# line (else its last line). Exit status 3 means "cannot run here": skipped.
run_step() {
  local name=$1 limit=$2 fn=$3 left rc=0 t0=$SECONDS summary
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    skip "$name" "no time left in the ${BUDGET} s budget"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout --kill-after=10 "$limit" bash -c "$fn" >"$LOGS/$name.log" 2>&1 || rc=$?
  summary=$(grep '^SUMMARY: ' "$LOGS/$name.log" | tail -n 1 | cut -c10-)
  [ -n "$summary" ] || summary=$(grep -v '^[[:space:]]*$' "$LOGS/$name.log" | tail -n 1)
  summary=${summary:0:300}
  if [ "$rc" -eq 0 ]; then
    record "$name" pass $((SECONDS - t0)) "$summary"
  elif [ "$rc" -eq 3 ]; then
    record "$name" skip $((SECONDS - t0)) "$summary"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" fail $((SECONDS - t0)) "timed out after $limit s ($LOGS/$name.log)"
  else
    record "$name" fail $((SECONDS - t0)) "exit $rc: $summary ($LOGS/$name.log)"
  fi
}

# -- the steps (run in a child bash: exported) -------------------------------
step_build() {
  [ -n "$NVCC" ] && export CUDACXX=$NVCC
  "$PY" -m pip install --no-build-isolation --no-deps -e . || return
  "$PY" - <<'EOF'
import os, sys
import kvtier._copy_engine as ce
print(f"SUMMARY: kvtier._copy_engine built, with_cuda={ce.with_cuda}")
sys.exit(1 if os.environ["NVCC"] and not ce.with_cuda else 0)   # nvcc found: CUDA path required
EOF
}

step_nvcc() { KVTIER_REQUIRE_NVCC=1 bash csrc/copy/check_cuda_build.sh; }

pytest_step() {  # pytest args...: runs them; the summary is pytest's count line
  local out rc
  out=$(mktemp)
  "$PY" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  echo "SUMMARY: $(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$out" | tail -n 1)$GPU_NOTE"
  rm -f "$out"
  return "$rc"
}

step_tests() {
  pytest_step tests/copy/test_copy_engine.py tests/copy/test_copy_engine_cuda.py -k "not under_memcheck"
}

step_worker() { pytest_step tests/vllm/test_worker_cuda.py; }

sanitize() {  # tool args...: compute-sanitizer over the round trip
  local tool=$1 out rc
  shift
  out=$(mktemp)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
    "$PY" -m benchmarks.gpu_round_trip "$@" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  if grep -q 'Device not supported' "$out"; then
    echo "SUMMARY: compute-sanitizer does not support this device or runtime"
    rc=3
  else
    echo "SUMMARY: $(grep -E '^gpu_round_trip:' "$out" | tail -n 1 | cut -c1-120);" \
      "$(grep -E '(ERROR|RACECHECK) SUMMARY' "$out" | tail -n 1 | sed 's/^=* *//')"
  fi
  rm -f "$out"
  return "$rc"
}

step_memcheck() { sanitize memcheck --path both; }

step_racecheck() { sanitize racecheck --path kernel; }

step_bench() {
  "$PY" benchmarks/copy_engine.py --section gpu --repeats 5 || return
  "$PY" - "$LOGS/bench.log" <<'EOF'
import json, sys
r = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
keys = [k for k in r if k.startswith(("gpu_d2h_16_", "gpu_h2d_16_", "gpu_matmul"))
        and ("GBps" in k or "slowdown" in k) and "per_run" not in k]
print("SUMMARY: " + ", ".join(f"{k.removeprefix('gpu_')}={r[k]}" for k in keys))
EOF
}

export LOGS
export -f step_build step_nvcc pytest_step step_tests step_worker sanitize step_memcheck \
  step_racecheck step_bench

# -- the run -----------------------------------------------------------------
ENV_LINE=$("$PY" - <<'EOF' 2>&1
import sys
try:
    import torch
except ImportError:
    print(f"python {sys.version.split()[0]}, NO torch"); sys.exit(1)
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
print(f"{gpu}|python {sys.version.split()[0]}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), GPU: {gpu or 'none'}")
EOF
)
GPU=${ENV_LINE%%|*}
[ "$GPU" = "$ENV_LINE" ] && GPU=""
GPU_NOTE=""
[ -n "$GPU" ] || GPU_NOTE=" (no GPU: the CUDA cases skipped)"
export GPU_NOTE
record env info 0 "${ENV_LINE#*|}; nvcc: ${NVCC:-none}; compute-sanitizer: ${SANITIZER:-none}"

if [ "${KVTIER_GPU_CHECK_BUILD:-1}" = 0 ]; then
  skip build "KVTIER_GPU_CHECK_BUILD=0: the installed build"
else
  run_step build 300 step_build
fi
if [ -n "$NVCC" ]; then run_step nvcc 180 step_nvcc; else skip nvcc "nvcc not found"; fi
run_step tests 180 step_tests
WITH_CUDA=$("$PY" -c 'import kvtier._copy_engine as c; print(int(c.with_cuda))' 2>/dev/null)
if [ -z "$GPU" ]; then
  NO_GPU="no CUDA GPU (torch.cuda.is_available() is False)"
elif [ "$WITH_CUDA" != 1 ]; then
  NO_GPU="kvtier._copy_engine has no CUDA path (built without nvcc)"
else
  NO_GPU=""
fi
run_step worker 120 step_worker
if [ -n "$NO_GPU" ]; then skip bench "$NO_GPU"; else run_step bench 120 step_bench; fi
for tool in memcheck racecheck; do   # last: the slowest, and the budget's first casualties
  if [ -n "$NO_GPU" ]; then skip "$tool" "$NO_GPU"
  elif [ -z "$SANITIZER" ]; then skip "$tool" "compute-sanitizer not found"
  else run_step "$tool" 150 "step_$tool"; fi
done

"$PY" - "$RESULTS" "$LOGS" $((SECONDS - START)) "$GPU" <<'EOF'
import json, sys
sys.path.insert(0, ".")
from benchmarks.stamp import stamp
results, logs, seconds, gpu = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
steps = {}
for line in open(results):
    name, status, secs, summary = line.rstrip("\n").split("\t", 3)
    if name != "env":
        steps[name] = {"status": status, "seconds": int(secs), "summary": summary}
bench = None
try:
    bench = json.loads([l for l in open(f"{logs}/bench.log") if l.startswith("{")][-1])
except (OSError, IndexError, ValueError):
    pass
print(json.dumps({"ok": all(s["status"] != "fail" for s in steps.values()),
                  "gpu": gpu or None, "seconds": seconds,
                  "skipped": [n for n, s in steps.items() if s["status"] == "skip"],
                  "steps": steps, "bench": bench, "logs": logs, "stamp": stamp()}))
EOF
! grep -q $'\tfail\t' "$RESULTS"
