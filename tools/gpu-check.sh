#!/usr/bin/env bash
# gpu-check.sh -- the GPU check in one command (issue 10): build with CUDA, run the parity suite
# (every CUDA op against its CPU twin, the model and a few OPD-row optimizer steps against the CPU),
# then the GPU benchmarks, and write everything to one results folder. Sized for < 8 minutes on one
# H100 (the build takes most of it on a 16-core machine).
#
#   tools/gpu-check.sh [--out DIR] [--build-dir DIR] [--arch SM] [--prebuilt DIR]
#
#   --out DIR        results folder (default gpu-check-<UTC time>): gpu-check.md (summary),
#                    parity.txt (one PARITY row per comparison), bench.jsonl, logs/*.log
#   --build-dir DIR  CMake build folder (default build-gpu)
#   --arch SM        CUDA architecture to build for (default: the visible GPU's, e.g. 90)
#   --prebuilt DIR   skip the build: run the binaries of a folder made by tools/gpu-pack.sh (for GPU
#                    machines without the CPU dependencies; its lib/ is put on LD_LIBRARY_PATH)
#
# Env: GPU_CHECK_TEST_TIMEOUT (s per test suite, default 300), GPU_CHECK_BENCH_TIMEOUT (s per benchmark, 240).
# Exit status: 0 when every parity test passed and every benchmark ran; 1 otherwise; 77 without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="gpu-check-$(date -u +%Y%m%dT%H%M%SZ)"
BUILD=build-gpu
ARCH=""
PREBUILT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2;;
    --build-dir) BUILD=$2; shift 2;;
    --arch) ARCH=$2; shift 2;;
    --prebuilt) PREBUILT=$2; shift 2;;
    -h|--help) sed -n '2,/^set -uo/{/^set -uo/!p}' "$0"; exit 0;;
    *) echo "gpu-check.sh: unknown argument '$1' (see --help)" >&2; exit 2;;
  esac
done
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/gpu-check.md
start=$(date +%s)
say() { echo "$*" | tee -a "$SUMMARY"; }

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check.sh: no NVIDIA GPU visible (nvidia-smi -L failed): nothing to check" >&2
  exit 77
fi
: >"$SUMMARY"
say "# opdlm GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say ""
say "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
say "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"

# ---- binaries ---------------------------------------------------------------------------------------
if [ -n "$PREBUILT" ]; then
  BIN=$(cd "$PREBUILT" && pwd)
  # cuBLAS and NCCL are too large to carry: take the machine's (the toolkit's, or a Python wheel's).
  extra=""
  for lib in libcudart.so.13 libcublasLt.so.13 libcublas.so.13 libnccl.so.2; do
    d=$(find /usr/local /opt /usr/lib /usr/lib64 -name "$lib" 2>/dev/null | head -1)
    [ -n "$d" ] && extra="$extra:$(dirname "$d")"
  done
  export LD_LIBRARY_PATH="$BIN/lib$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  TESTS=$BIN/opdlm_gpu_tests
  BENCH_DIR=$BIN
  say "- binaries: prebuilt ($PREBUILT)"
else
  if [ -z "$ARCH" ]; then
    ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
  fi
  say "- build: $BUILD, CUDA architecture $ARCH"
  t0=$(date +%s)
  if ! { cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DOPDLM_CUDA=ON &&
         cmake --build "$BUILD" -j"$(nproc)" --target opdlm_gpu_tests $(for f in bench/gpu/*.cpp; do echo "opdlm_$(basename "$f" .cpp)"; done); } \
       >"$OUT/logs/build.log" 2>&1; then
    say "- BUILD FAILED (logs/build.log):"; tail -30 "$OUT/logs/build.log" | tee -a "$SUMMARY"; exit 1
  fi
  say "- build time: $(( $(date +%s) - t0 )) s"
  TESTS=$BUILD/tests/opdlm_gpu_tests
  BENCH_DIR=$BUILD/bench
fi
[ -x "$TESTS" ] || { say "- no test binary at $TESTS"; exit 1; }

# ---- parity suite: one process per test suite, so a sticky CUDA error cannot hide the others -------
say ""
say "## Parity (CUDA op vs CPU twin; \`PARITY\` rows in parity.txt)"
say ""
export OPDLM_GPU_REPORT=$OUT/parity.txt
: >"$OPDLM_GPU_REPORT"
failed_suites=0
listing=$("$TESTS" --gtest_list_tests 2>&1)
lrc=$?
if [ $lrc -ne 0 ]; then
  say "- $TESTS could not list its tests (exit $lrc): $listing"
  exit 1
fi
suites=$(echo "$listing" | grep -v '^ ' | grep '\.$' | sed 's/\.$//')
say "| suite | tests | result | seconds |"
say "| --- | --- | --- | --- |"
for s in $suites; do
  t0=$(date +%s)
  timeout "${GPU_CHECK_TEST_TIMEOUT:-300}" "$TESTS" --gtest_filter="$s.*" >"$OUT/logs/test_$s.log" 2>&1
  rc=$?
  n=$(grep -c '^\[       OK \]\|^\[  FAILED  \] .*ms)$' "$OUT/logs/test_$s.log")
  if [ $rc -eq 0 ]; then r=passed; else r="FAILED (rc $rc)"; failed_suites=$((failed_suites + 1)); fi
  say "| $s | $n | $r | $(( $(date +%s) - t0 )) |"
done
rows=$(grep -c '^PARITY' "$OPDLM_GPU_REPORT")
bad=$(grep -c 'FAIL$' "$OPDLM_GPU_REPORT")
say ""
say "- parity rows: $rows, out of tolerance: $bad; failed suites: $failed_suites"
if [ "$bad" -gt 0 ]; then grep 'FAIL$' "$OPDLM_GPU_REPORT" | head -40 | sed 's/^/    /' | tee -a "$SUMMARY"; fi

# ---- benchmarks -----------------------------------------------------------------------------------------
say ""
say "## Benchmarks (bench.jsonl; each figure against a baseline measured in the same run)"
say ""
export OPDLM_GPU_BENCH_OUT=$OUT/bench.jsonl
: >"$OPDLM_GPU_BENCH_OUT"
failed_bench=0
for src in bench/gpu/*.cpp; do
  name=opdlm_$(basename "$src" .cpp)
  b=$BENCH_DIR/$name
  if [ ! -x "$b" ]; then say "### $name: MISSING binary"; failed_bench=$((failed_bench + 1)); continue; fi
  t0=$(date +%s)
  timeout "${GPU_CHECK_BENCH_TIMEOUT:-240}" "$b" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && failed_bench=$((failed_bench + 1))
  say "### $name (rc $rc, $(( $(date +%s) - t0 )) s)"
  say '```'
  grep -v '^\s*$' "$OUT/logs/$name.log" | tail -40 | tee -a "$SUMMARY"
  say '```'
done

say ""
say "- total: $(( $(date +%s) - start )) s"
if [ $failed_suites -eq 0 ] && [ "$bad" -eq 0 ] && [ $failed_bench -eq 0 ]; then
  say "- verdict: PASS"; exit 0
fi
say "- verdict: FAIL ($failed_suites failed suites, $bad parity rows out of tolerance, $failed_bench failed benchmarks)"
exit 1
