#!/usr/bin/env bash
# sanitize.sh [FUZZ_SECONDS] -- the untrusted-input checks (docs/testing.md, issue 12), as .ci/run runs
# them: a clang build (build-san) of the library with AddressSanitizer + UndefinedBehaviorSanitizer and
# libFuzzer coverage; the unit tests under the sanitizers; every fuzz target replaying its seeds and
# past findings (ctest -L fuzz); then tests/fuzz/run.sh fuzzing each target for FUZZ_SECONDS (30).
# The MPI tests are not run here: Open MPI's own start-up trips LeakSanitizer and its shared-memory
# transport is uninstrumented; the MPI code paths run in the normal suite and the CLI tests.
# Env: BUILD_DIR (default build-san), JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD_DIR:-build-san}
SECS=${1:-30}
FUZZ_TARGETS=(safetensors model_config tokenizer_json tokenizer_encode config_ini jsonl token_shard ckpt_manifest ckpt_attrs)
CC=clang CXX=clang++ cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOPDLM_CUDA=OFF -DOPDLM_BUILD_BENCH=OFF \
  -DOPDLM_SANITIZE=ON -DOPDLM_FUZZ=ON -DOPDLM_OPENBLAS_VARIANT=pthread >/dev/null
cmake --build "$BUILD" -j"${JOBS:-$(nproc)}" --target opdlm_unit_tests "${FUZZ_TARGETS[@]/#/fuzz_}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/tests/fuzz/lsan.supp:print_suppressions=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OPENBLAS_NUM_THREADS=1
# No host block cache: a freed tensor must reach ASan, so a use after free is caught
# (HostBlockCache.* turns it on for its own checks).
export OPDLM_HOST_CACHE_MB=0
echo "sanitize: unit tests under ASan + UBSan"
start=$(date +%s)
# The one unit test that starts MPI runs without leak detection: Open MPI's start-up keeps memory in
# components it unloads at exit, whose stacks no suppression can name. Every other test runs with it.
MPI_TEST=CheckMacros.MpiFailureNamesTheCall
"$BUILD/tests/opdlm_unit_tests" --gtest_brief=1 --gtest_filter="-$MPI_TEST"
ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0" "$BUILD/tests/opdlm_unit_tests" --gtest_brief=1 --gtest_filter="$MPI_TEST"
echo "sanitize: unit tests passed in $(($(date +%s) - start)) s"
echo "sanitize: seeds and past findings of every fuzz target"
ctest --test-dir "$BUILD" -L fuzz --output-on-failure
echo "sanitize: fuzzing each target for $SECS s"
tests/fuzz/run.sh "$BUILD" "$SECS"
