#!/usr/bin/env bash
# run.sh BUILD_DIR [SECONDS] [TARGET...] -- fuzzes each libFuzzer target of tests/fuzz for SECONDS
# (default 30; CI's short run) from its committed seed corpus plus its regressions, in a scratch copy
# (the committed corpus is not modified), with limits: 10 s per input, 2 GiB RSS, 512 MiB per
# allocation (a hostile header must not make opdlm allocate without bound). Prints executions per
# second per target. A crash leaves its input under $OUT (default /tmp/opdlm_fuzz_out) and fails:
# reproduce with BUILD_DIR/tests/fuzz/fuzz_T FILE, fix, and copy it to tests/fuzz/regressions/T/.
# The longer run (docs/testing.md): tests/fuzz/run.sh build-san 600.
set -uo pipefail
BUILD=$(readlink -f "$1")
SECS=${2:-30}
shift $(($# >= 2 ? 2 : $#))
HERE=$(dirname "$(readlink -f "$0")")
OUT=${OUT:-/tmp/opdlm_fuzz_out}
TARGETS=("$@")
if ((${#TARGETS[@]} == 0)); then
  for d in "$HERE"/corpus/*/; do TARGETS+=("$(basename "$d")"); done
fi
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/opdlm_fuzz_work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# Leaks in MPI/HDF5 start-up are not ours; UBSan reports are fatal (-fno-sanitize-recover).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
printf '%-18s %10s %10s %8s  %s\n' target executions exec/s corpus result
for t in "${TARGETS[@]}"; do
  bin=$BUILD/tests/fuzz/fuzz_$t
  [[ -x $bin ]] || { echo "run.sh: $bin is not built (configure with -DOPDLM_FUZZ=ON)"; exit 2; }
  mkdir -p "$WORK/$t"
  cp -r "$HERE/corpus/$t/." "$WORK/$t/"
  log=$OUT/$t.log
  dict=()
  case $t in  # the targets whose input is (or holds) JSON
    safetensors | model_config | tokenizer_json | jsonl | ckpt_manifest | ckpt_attrs) dict=(-dict="$HERE/json.dict") ;;
  esac
  "$bin" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 -print_final_stats=1 \
    "${dict[@]}" -artifact_prefix="$OUT/$t-" "$WORK/$t" "$HERE/regressions/$t" >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  files=$(find "$WORK/$t" -type f | wc -l)
  if ((rc == 0)); then res=ok; else res="FAILED (exit $rc): $(grep -m1 -E 'ERROR|runtime error|deadly signal|uncaught' "$log")"; failed+=("$t"); fi
  printf '%-18s %10s %10s %8s  %s\n' "$t" "${runs:-?}" "${rate:-?}" "$files" "$res"
done
if ((${#failed[@]})); then
  echo "run.sh: findings in ${failed[*]}: inputs and logs under $OUT"
  exit 1
fi
