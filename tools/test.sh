#!/usr/bin/env bash
# test.sh -- configure, build and run the test suite (the README's test command, after install-deps).
#   tools/test.sh [extra ctest args]    e.g. tools/test.sh -L unit
# Env: BUILD_DIR (default build), CMAKE_ARGS (extra configure flags), JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
# shellcheck disable=SC2086
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
cmake --build "$BUILD_DIR" -j"$JOBS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
ctest --test-dir "$BUILD_DIR" --output-on-failure -j"$JOBS" "$@"
