#!/usr/bin/env bash
# One-call GPU verification of moe_kernels, for a GPU machine without network that already has
# torch (and cmake, ninja, pybind11, pytest, hypothesis) installed:
#
#   benchmarks/gpu_check.sh [--out DIR] [--smoke] [--no-build]
#
# Stages, each under its own time budget (below), in this order:
#   build      pip install --no-build-isolation --no-deps -e . for the one GPU architecture
#              present (MOE_CUDA_ARCHS: 90a on H100/H200), all cores. Editable, so that the tests
#              and benchmarks, run from this checkout, import the build. CUTLASS headers come from
#              MOE_CUTLASS_DIR or an installed nvidia-cutlass wheel; without them the build goes on
#              without the CUTLASS grouped GEMM (the summary says so).
#   selfcheck  python -m moe_kernels.selfcheck --full (every op x backend x dtype x edge case
#              against the reference, forward and backward).
#   tests      the gpu-marked tests (pytest -m gpu).
#   memcheck   compute-sanitizer --tool memcheck, and
#   racecheck  compute-sanitizer --tool racecheck, each on a reduced set: the self-check's quick
#              cases on the cuda backends.
#   ops        python -m benchmarks.ops_gpu and
#   layer      python -m benchmarks.layer_gpu on the named shapes, one shape per run, in the order
#              of SHAPES; when a benchmark's budget cannot take another shape, the remaining
#              shapes are cut (and listed), never a stage.
# Everything goes to one folder (default gpu_check_out/), at most 8 files: summary.txt (the
# summary table, also printed last), log.txt (every stage's output), build.log, selfcheck.json,
# ops_gpu.json, layer_gpu.json. Exit status 1 when any stage failed or timed out, else 0.
#
# --smoke runs the same stages on CPU, as CI does: the CUDA stages (build, tests, sanitizers)
# report "skipped: no GPU", the self-check covers the C++ backends and the Triton kernels
# through Triton's interpreter, and the benchmarks run their --smoke shapes (one shape).
# --no-build skips the build (use the package as installed). PYTHON picks the interpreter
# (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

# ---- time budgets (seconds) ------------------------------------------------------------------
# Sum: 15 + 150 + 90 + 70 + 45 + 45 + 50 + 55 = 520 s, under 9 minutes on an H100/H200 with
# 16 cores. The self-check gets the most after the build: on a fresh machine it also pays
# Triton's compilation of every kernel variant it runs (no kernel cache yet). Build estimate, from the compile times of each object measured here (2 cores,
# build/.ninja_log of a MOE_KERNELS_CUDA=1 build for 80;90a): sm90 CUTLASS grouped GEMM (bf16,
# fp16) ~60 s each, sm80 CUTLASS ~35 s each (not built for 90a alone), route.cu 39 s,
# topk_gating / dispatch_combine / routing_histogram / check .cu ~16 s each, the five *_bind.cpp
# ~10 s each, CPU objects ~1 s each: ~290 s of compiling for 90a alone. With 16 parallel jobs the
# longest object (an sm90 CUTLASS one, ~60 s) bounds it: ~60 s + configure, link and pip
# (~30 s) = about 90 s there; the budget leaves 1.6 times that.
BUDGET_ENV=15
BUDGET_BUILD=150
BUDGET_SELFCHECK=90
BUDGET_TESTS=70
BUDGET_MEMCHECK=45
BUDGET_RACECHECK=45
BUDGET_OPS=50
BUDGET_LAYER=55
BUILD_ESTIMATE_S=90
# Named shapes (benchmarks.gpu_harness.SHAPES), the fine-grained ones first: cut from the end.
SHAPES="olmoe deepseek_fine qwen3_30b mixtral"
# --smoke on a CPU: each budget times this (a shared CI machine is slower than the GPU host).
SMOKE_SCALE=3

OUT=gpu_check_out
SMOKE=0
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="${2:?--out: expected a folder}"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
export PY SMOKE OUT SHAPES
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
TMP=$(mktemp -d)
export OUT TMP
trap 'rm -rf "$TMP"' EXIT
: >"$LOG"
START=$(date +%s)
STAGES=()
FAILED=0

# run_stage NAME BUDGET CMD...: run CMD (a command or a function of this script) under
# `timeout BUDGET` (times SMOKE_SCALE with --smoke), output appended to log.txt.
run_stage() {
  local name=$1 planned=$2 budget=$2 t0 rc status
  shift 2
  [ $SMOKE -eq 1 ] && budget=$((budget * SMOKE_SCALE))
  t0=$(date +%s)
  printf '\n===== %s (budget %ss): %s\n' "$name" "$budget" "$*" >>"$LOG"
  echo "[gpu_check] $name (budget ${budget}s)" >&2
  timeout --kill-after=5 "$budget" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then status=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT (budget ${budget}s)"; FAILED=1
  else status="FAILED (exit $rc)"; FAILED=1
  fi
  STAGES+=("$name|$planned|$(($(date +%s) - t0))|$status")
  return $rc
}

skip_stage() {  # skip_stage NAME BUDGET REASON
  STAGES+=("$1|$2|0|skipped: $3")
  printf '\n===== %s: skipped: %s\n' "$1" "$3" >>"$LOG"
}

# ---- env --------------------------------------------------------------------------------------
GPU=0
ARCH=""
if [ $SMOKE -eq 0 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1
  ARCH=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print('90a' if (M, m) == (9, 0) else f'{M}{m}')")
fi
env_info() {
  echo "date: $(date -u +%FT%TZ); cores: $(nproc); smoke: $SMOKE; gpu: $GPU; arch: ${ARCH:-none}"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  "$PY" -c "
import importlib.util as u, sys, torch
t = __import__('triton').__version__ if u.find_spec('triton') else 'not installed'
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'triton', t)"
}
export GPU ARCH
export -f env_info
run_stage env $BUDGET_ENV env_info

# ---- build ------------------------------------------------------------------------------------
BUILD_NOTE=""
if [ $GPU -eq 0 ]; then
  skip_stage build $BUDGET_BUILD "no GPU (the installed package is checked)"
elif [ $BUILD -eq 0 ]; then
  skip_stage build $BUDGET_BUILD "--no-build"
else
  if [ -z "${MOE_CUTLASS_DIR:-}" ] && ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('cutlass_library') else 1)"; then
    export MOE_CUTLASS=OFF
    BUILD_NOTE="no CUTLASS headers (set MOE_CUTLASS_DIR): built without the CUTLASS grouped GEMM"
  fi
  build() {
    MOE_KERNELS_CUDA=1 MOE_CUDA_ARCHS="$ARCH" MOE_BUILD_JOBS="$(nproc)" \
      "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$OUT/build.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT/build.log"
    "$PY" -c "import moe_kernels; print(moe_kernels.build_info())"
    return $rc
  }
  export -f build
  run_stage build $BUDGET_BUILD build
fi

# ---- selfcheck --------------------------------------------------------------------------------
if [ $GPU -eq 1 ]; then
  run_stage selfcheck $BUDGET_SELFCHECK "$PY" -m moe_kernels.selfcheck --full --device cuda:0 \
    --json "$OUT/selfcheck.json"
else
  TRITON_INTERPRET=1 run_stage selfcheck $BUDGET_SELFCHECK "$PY" -m moe_kernels.selfcheck \
    --device cpu --json "$OUT/selfcheck.json"
fi

# ---- gpu-marked tests, sanitizers ----------------------------------------------------------------
if [ $GPU -eq 1 ]; then
  run_stage tests $BUDGET_TESTS "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    tests/ops tests/test_cuda_graph.py
  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      budget=$BUDGET_MEMCHECK
      [ $tool = racecheck ] && budget=$BUDGET_RACECHECK
      run_stage $tool "$budget" compute-sanitizer --tool $tool --error-exitcode 3 \
        --target-processes all "$PY" -m moe_kernels.selfcheck --backends cuda --device cuda:0 \
        --quiet
    done
  else
    skip_stage memcheck $BUDGET_MEMCHECK "compute-sanitizer not found"
    skip_stage racecheck $BUDGET_RACECHECK "compute-sanitizer not found"
  fi
else
  skip_stage tests $BUDGET_TESTS "no GPU"
  skip_stage memcheck $BUDGET_MEMCHECK "no GPU"
  skip_stage racecheck $BUDGET_RACECHECK "no GPU"
fi

# ---- benchmarks ---------------------------------------------------------------------------------
# bench NAME BUDGET: one run per shape while the budget can take another (the last run's time
# is the estimate), then one merged JSON.
bench() {
  local name=$1 budget=$2 t0 left last=0 done_shapes=() cut=() shape args rc=0
  t0=$(date +%s)
  if [ $SMOKE -eq 1 ] || [ $GPU -eq 0 ]; then
    args=(--smoke --device cpu --routing uniform --tokens 32 --backends auto)
    [ "$name" = layer_gpu ] && args+=(--baselines torch_grouped_mm --passes fwd)
    timeout --kill-after=5 "$budget" "$PY" -m "benchmarks.$name" --shapes olmoe "${args[@]}" \
      --json "$TMP/$name.olmoe.json" || rc=1
  else
    for shape in $SHAPES; do
      left=$((budget - ($(date +%s) - t0)))
      if [ $left -le $((last + 5)) ]; then cut+=("$shape"); continue; fi
      local s0=$(date +%s)
      timeout --kill-after=5 "$left" "$PY" -m "benchmarks.$name" --shapes "$shape" \
        --json "$TMP/$name.$shape.json" || rc=1
      last=$(($(date +%s) - s0))
      done_shapes+=("$shape")
    done
    [ ${#cut[@]} -gt 0 ] && echo "$name: shapes cut to fit the budget: ${cut[*]}"
  fi
  "$PY" - "$OUT/$name.json" "$TMP"/"$name".*.json <<'EOF' || rc=1
import json, sys
from benchmarks.common import write_json_atomic
out, parts = sys.argv[1], [json.load(open(p)) for p in sys.argv[2:]]
if not parts:
    sys.exit("no benchmark result written")
merged = parts[0]
for key in ("ops", "layer", "memory"):
    if key in merged:
        merged[key] = [row for p in parts for row in p[key]]
merged["shapes_run"] = [p["args"]["shapes"][0] for p in parts]
write_json_atomic(out, merged)
EOF
  return $rc
}
export -f bench
B=$((SMOKE ? SMOKE_SCALE : 1))
run_stage ops $BUDGET_OPS bench ops_gpu $((BUDGET_OPS * B))
run_stage layer $BUDGET_LAYER bench layer_gpu $((BUDGET_LAYER * B))

# ---- summary ------------------------------------------------------------------------------------
{
  echo "moe_kernels GPU check: $(date -u +%FT%TZ), smoke: $SMOKE, gpu: $GPU, arch: ${ARCH:-none}"
  echo "build estimate there: ~${BUILD_ESTIMATE_S}s on 16 cores for ${ARCH:-90a} (see the budget notes in this script)"
  [ -n "$BUILD_NOTE" ] && echo "note: $BUILD_NOTE"
  if [ -f "$OUT/selfcheck.json" ]; then
    "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); r=d['rows']; print(f\"selfcheck: {sum(x['verdict']=='ok' for x in r)} of {len(r)} checks passed on {d['device']}\")" "$OUT/selfcheck.json"
  fi
  grep -h "shapes cut to fit" "$LOG" || true
  echo
  printf '%-10s %8s %8s  %s\n' stage budget_s used_s status
  printf '%-10s %8s %8s  %s\n' ---------- -------- -------- ------
  total=0
  for s in "${STAGES[@]}"; do
    IFS='|' read -r n b u st <<<"$s"
    printf '%-10s %8s %8s  %s\n' "$n" "$b" "$u" "$st"
    total=$((total + b))
  done
  [ $SMOKE -eq 1 ] && echo "(--smoke: each stage ran under ${SMOKE_SCALE}x its budget)"
  echo "total budget ${total}s; wall $(($(date +%s) - START))s; verdict: $([ $FAILED -eq 0 ] && echo PASSED || echo FAILED)"
} >"$SUMMARY"
if [ -f "$OUT/ops_gpu.json" ] || [ -f "$OUT/layer_gpu.json" ]; then
  files=()
  for f in "$OUT/ops_gpu.json" "$OUT/layer_gpu.json"; do [ -f "$f" ] && files+=("$f"); done
  { echo; "$PY" -m benchmarks.gpu_targets "${files[@]}" 2>&1 | tail -n 20; } >>"$LOG"
fi
cat "$SUMMARY"
exit $FAILED
