# shellcheck shell=bash
# jobs/lib/common.sh -- pieces shared by jobs/quickstart.sh and jobs/reproduce.sh. Source it from
# the repository root after defining stamp() (one progress line). Nothing here runs on source.
#
#   ensure_opdlm BIN                 build build/opdlm when BIN is missing and is that default path
#   ensure_quickstart_data OPDLM DATA LOG
#                                    jobs/data/make_quickstart_corpus.sh DATA unless DATA/train.bin exists
#   ensure_quickstart_teacher OPDLM DATA OUT_DIR LOG
#                                    the quickstart teacher (configs/teacher/quickstart.ini) into
#                                    OUT_DIR/{model.h5,summary.json} unless OUT_DIR/model.h5 exists

ensure_opdlm() {
  local bin=$1
  [[ -x $bin ]] && return 0
  if [[ $bin != build/opdlm ]]; then
    echo "opdlm binary not found at $bin (set OPDLM=...)" >&2
    return 1
  fi
  stamp "building $bin"
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
  cmake --build build -j"$(nproc)" --target opdlm_cli > /dev/null
}

ensure_quickstart_data() {
  local opdlm=$1 data=$2 log=$3
  if [[ -f $data/train.bin ]]; then
    [[ -f $data/facts/conversion.jsonl ]] && return 0
    echo "$data was built by an older make_quickstart_corpus.sh (no facts/conversion.jsonl): move it away" \
      "or set DATA to a new folder" >&2
    return 1
  fi
  stamp "data -> $data"
  mkdir -p "$(dirname "$log")"
  OPDLM=$opdlm jobs/data/make_quickstart_corpus.sh "$data" > "$log" \
    || { echo "data build failed: see $log" >&2; return 1; }
}

ensure_quickstart_teacher() {
  local opdlm=$1 data=$2 out=$3 log=$4
  [[ -f $out/model.h5 ]] && return 0
  stamp "teacher: opdlm train --mode ar (configs/teacher/quickstart.ini) -> $out"
  mkdir -p "$out"
  "$opdlm" train --mode ar --config configs/teacher/quickstart.ini --model.tokenizer="$data/tokenizer.json" \
    --data.train="$data/train.bin" --run.out_dir="$out" > "$out/summary.json.tmp" 2> "$log" \
    || { echo "teacher training failed: see $log" >&2; return 1; }
  mv "$out/summary.json.tmp" "$out/summary.json"
}
