#!/usr/bin/env bash
# The one command run on a GPU machine, from the repository root:
#
#   bash python/tools/gpu_check.sh [OUT] [--only STEPS] [--bench NAMES] [--quick] [--pytest ARGS]
#
# OUT: output folder ($1, else $OUT, else ./out). Steps, in order (all by default):
#   build   install the wheels brought in .whl/ (into /tmp/site, on PYTHONPATH), build the
#           extension (TORCH_CUDA_ARCH_LIST=9.0a unless set), check that xdit_ops._C loads (and
#           xdit_ops._C_sm90 on a Hopper GPU when csrc/cuda/sm90 has sources)
#   cmake   the standalone kernel build and its ctest unit tests (CMakeLists.txt); without cmake,
#           the same unit tests compiled directly with nvcc
#   doctor  xdit-ops doctor
#   run     xdit-ops run (the README's main job)
#   tests   pytest -m "gpu or sm90 or multigpu" tests
#   bench   every benchmarks/bench_*.py: with python, or, when its source has the line
#           "# xdit-bench: torchrun", under torchrun with 2 GPUs and with all visible GPUs when
#           there are >= 4 (skipped when fewer GPUs); JSON results into OUT/bench/
# --only build,tests,...  run only these steps (build is added for run/tests/bench when the
#                         extension does not load)
# --bench attention,usp   only these benchmarks (names with or without bench_ / .py)
# --quick                 benchmarks pass --quick (fewer iterations)
# --pytest "ARGS"         extra pytest arguments (e.g. "-k attention -x")
#
# Nothing stops on a single failure; the exit code is non-zero if any step failed. Output: the
# summary table last on stdout; OUT/gpu_check.log (every step's full output, in order) and
# OUT/artifacts.tar.gz (per-step logs, junit XML, the benchmark JSON files).
set -uo pipefail

OUT_DIR=""
ONLY=""
BENCHES=""
QUICK=0
PYTEST_EXTRA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY="$2"; shift 2 ;;
    --only=*) ONLY="${1#*=}"; shift ;;
    --bench) BENCHES="$2"; shift 2 ;;
    --bench=*) BENCHES="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    --pytest) PYTEST_EXTRA="$2"; shift 2 ;;
    --pytest=*) PYTEST_EXTRA="${1#*=}"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) OUT_DIR="$1"; shift ;;
  esac
done
OUT_DIR="${OUT_DIR:-${OUT:-./out}}"
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/bench"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
PY="${PYTHON:-python3}"
ALL_STEPS="build cmake doctor run tests bench"
STEPS="${ONLY//,/ }"
STEPS="${STEPS:-$ALL_STEPS}"
for s in $STEPS; do
  case " $ALL_STEPS " in *" $s "*) ;; *) echo "gpu_check: unknown step $s ($ALL_STEPS)" >&2; exit 2 ;; esac
done

# NVLink multicast stays off on these machines (shared/GPU.md): never unset these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1

# The GPU machine gets a copy of the tree whose .git may be missing or a stale snapshot (seen: an
# earlier session's HEAD with the new work as changes on top): XDIT_OPS_GIT_COMMIT, when set,
# names the commit and wins.
COMMIT="$(git rev-parse --short HEAD 2> /dev/null || true)"
[[ "$COMMIT" =~ ^[0-9a-f]{7,40}$ ]] || COMMIT=""   # an empty repository prints "HEAD"
COMMIT="${XDIT_OPS_GIT_COMMIT:-${COMMIT:-unknown}}"

SUMMARY=()
FAILED=0
T_START=$(date +%s)

note() { echo "$*" | tee -a "$LOG"; }

# step NAME TIMEOUT_S TAIL_LINES CMD...: run CMD with a timeout, log it, record its status.
step() {
  local name="$1" limit="$2" tail_n="$3"; shift 3
  local slog="$OUT_DIR/logs/$name.log" t0 rc status secs
  t0=$(date +%s)
  note "=== [$name] $* (limit ${limit}s) at $(date -u +%H:%M:%S)"
  timeout --kill-after=30 "$limit" "$@" > "$slog" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  cat "$slog" >> "$LOG"
  if [ $rc -eq 0 ]; then status="ok"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT"; FAILED=1
  else status="FAIL(rc=$rc)"; FAILED=1; fi
  if [ "$status" != "ok" ] && [ "$tail_n" -lt 20 ]; then tail_n=20; fi
  if [ "$tail_n" -gt 0 ]; then tail -n "$tail_n" "$slog"; fi
  note "=== [$name] $status in ${secs}s"
  SUMMARY+=("$(printf '%-34s %-14s %6ss' "$name" "$status" "$secs")")
}

skip() {
  note "=== [$1] skipped: $2"
  SUMMARY+=("$(printf '%-34s %-14s %7s  %s' "$1" "skip" "" "$2")")
}

wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ----------------------------------------------------------------------------- environment
if compgen -G ".whl/*.whl" > /dev/null; then
  # Reinstall only when the set of wheels changed since the last install on this machine.
  stamp="$(ls -l .whl/*.whl | md5sum | cut -c1-32)"
  if [ "$(cat /tmp/site/.xdit_wheels 2> /dev/null)" != "$stamp" ]; then
    step wheels 600 0 "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade \
      --target /tmp/site .whl/*.whl && echo "$stamp" > /tmp/site/.xdit_wheels
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The source tree is importable even when the editable install falls back to build_ext --inplace.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

read -r NGPU HOPPER < <("$PY" -c "import torch; n = torch.cuda.device_count(); \
print(n, int(any(torch.cuda.get_device_capability(i) == (9, 0) for i in range(n))))" \
  2> /dev/null || echo 0 0)
NGPU="${NGPU:-0}"; HOPPER="${HOPPER:-0}"
note "gpu_check: $(date -u +%FT%TZ) commit $COMMIT \
$NGPU GPU(s), hopper=$HOPPER, steps: $STEPS, out: $OUT_DIR"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader >> "$LOG" 2>&1 || true

ext_loads() { "$PY" -c "import xdit_ops._extension as e, sys; sys.exit(0 if e.has('_C') else 1)" \
  > /dev/null 2>&1; }

# ----------------------------------------------------------------------------------- build
build() {
  set -e
  if ! "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    echo "editable install failed; falling back to setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace
  fi
  "$PY" - <<'EOF'
import glob, sys
import torch
import xdit_ops
from xdit_ops import _extension as e
print("xdit_ops._C:", "loaded" if e.has("_C") else "NOT loaded: " + e.reason("_C"))
print("xdit_ops._C_sm90:", "loaded" if e.has("_C_sm90") else "NOT loaded: " + e.reason("_C_sm90"))
ok = e.has("_C")
hopper = any(torch.cuda.get_device_capability(i) == (9, 0)
             for i in range(torch.cuda.device_count()))
if hopper and glob.glob("csrc/cuda/sm90/*.cu") and not e.has("_C_sm90"):
    print("FAIL: a Hopper GPU is visible and csrc/cuda/sm90 has sources, but _C_sm90 did not load")
    ok = False
sys.exit(0 if ok else 1)
EOF
}
export -f build
export PY
if wants build || { { wants tests || wants bench || wants run; } && ! ext_loads; }
then
  step build 1500 6 bash -c build
fi

# ----------------------------------------------------------------------------------- cmake
cmake_tests() {
  set -e
  local bdir=build/cmake
  if command -v cmake > /dev/null && cmake -S . -B "$bdir" -DCMAKE_BUILD_TYPE=Release; then
    cmake --build "$bdir" -j "$MAX_JOBS"
    ctest --test-dir "$bdir" --output-on-failure
  else
    echo "cmake missing, or configuring failed (CMakeLists.txt needs cmake >= 3.24): compiling" \
      "the kernel unit tests with nvcc directly"
    local nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
    command -v nvcc > /dev/null && nvcc=nvcc
    mkdir -p "$bdir"
    for t in csrc/tests/test_*.cu; do
      local exe="$bdir/$(basename "${t%.cu}")"
      "$nvcc" -std=c++17 -O2 --use_fast_math -gencode=arch=compute_90a,code=sm_90a \
        -Icsrc/include "$t" csrc/kernels/*.cu -o "$exe"
      local rc=0
      "$exe" || rc=$?
      if [ $rc -eq 77 ]; then echo "$exe: skipped (no GPU)"; elif [ $rc -ne 0 ]; then return $rc; fi
    done
  fi
}
export -f cmake_tests
if wants cmake; then step cmake 900 4 bash -c cmake_tests; fi

# ---------------------------------------------------------------------------- doctor / run
if wants doctor; then step doctor 300 0 "$PY" -m xdit_ops.cli doctor; fi
if wants run; then step run 600 12 "$PY" -m xdit_ops.cli run; fi

# ----------------------------------------------------------------------------------- tests
if wants tests; then
  # --pytest's words with the shell's quoting (run 51: -k 'a and (b or c)' was split at spaces)
  PYTEST_ARGS=()
  if [ -n "$PYTEST_EXTRA" ]; then eval "PYTEST_ARGS=($PYTEST_EXTRA)"; fi
  step tests 3000 8 "$PY" -m pytest -m "gpu or sm90 or multigpu" tests -q -rfEs \
    -p no:cacheprovider --junitxml="$OUT_DIR/logs/pytest.xml" "${PYTEST_ARGS[@]}"
fi

# ----------------------------------------------------------------------------------- bench
selected() {  # selected FILE: whether --bench names it (everything when --bench is empty)
  [ -z "$BENCHES" ] && return 0
  local base n
  base="$(basename "$1" .py)"
  for n in ${BENCHES//,/ }; do
    n="${n%.py}"; n="${n#bench_}"
    [ "$base" = "bench_$n" ] && return 0
  done
  return 1
}
if wants bench; then
  for n in ${BENCHES//,/ }; do  # a misspelt name is a failure, not a silent no-op
    n="${n%.py}"; n="${n#bench_}"
    if [ ! -e "benchmarks/bench_$n.py" ]; then
      note "no benchmark benchmarks/bench_$n.py"; FAILED=1
      SUMMARY+=("$(printf '%-34s %-14s' "bench_$n" "FAIL(no such)")")
    fi
  done
  QUICK_ARG=()
  [ $QUICK -eq 1 ] && QUICK_ARG=(--quick)
  found=0
  for b in benchmarks/bench_*.py; do
    [ -e "$b" ] || continue
    selected "$b" || continue
    found=1
    name="$(basename "$b" .py)"
    if grep -q '^# xdit-bench: torchrun' "$b"; then
      sizes=(2)
      [ "$NGPU" -ge 4 ] && sizes+=("$NGPU")
      for n in "${sizes[@]}"; do
        if [ "$NGPU" -lt "$n" ]; then skip "$name x$n" "needs $n GPUs, have $NGPU"; continue; fi
        step "$name x$n" 1200 35 "$PY" -m torch.distributed.run --standalone \
          --nproc-per-node="$n" "$b" --out "$OUT_DIR/bench" "${QUICK_ARG[@]}"
      done
    else
      if [ "$NGPU" -lt 1 ]; then skip "$name" "no GPU"; continue; fi
      step "$name" 1200 35 "$PY" "$b" --out "$OUT_DIR/bench" "${QUICK_ARG[@]}"
    fi
  done
  [ $found -eq 1 ] || [ -n "$BENCHES" ] || { note "no benchmarks/bench_*.py"; FAILED=1; }
fi

# --------------------------------------------------------------------------------- results
JSONS="$(cd "$OUT_DIR" && ls bench/*.json 2> /dev/null | tr '\n' ' ')"
tar -czf "$OUT_DIR/artifacts.tar.gz" -C "$OUT_DIR" logs bench 2>> "$LOG" \
  && rm -rf "$OUT_DIR/logs" "$OUT_DIR/bench"
{
  echo
  echo "gpu_check summary ($(date -u +%FT%TZ), $(( $(date +%s) - T_START ))s, $NGPU GPU(s), \
commit $COMMIT)"
  printf '%-34s %-14s %7s\n' "step" "status" "time"
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  echo "log: $LOG"
  echo "artifacts (step logs, junit XML, benchmark JSON): $OUT_DIR/artifacts.tar.gz"
  echo "benchmark JSON in it: ${JSONS:-none}"
  [ $FAILED -eq 0 ] && echo "RESULT: all steps passed" || echo "RESULT: FAILED"
} | tee -a "$LOG"
exit $FAILED
