#!/usr/bin/env bash
# make_teacher_corpus.sh: builds the AR teacher's training corpus and the eval prompt files from
# the Debian KJV (bible-kjv) and the synthetic arithmetic generator (../shared/docs/data.md 6.1, 6.5).
#
# Makes, under OUT (default data/teacher):
#   kjv/         train.txt (29,786 "Book C:V text" lines of the 1,137 trained chapters, 4.4 MB),
#                heldout.txt (1,316 verses of the 52 held-out chapters), kjv.tsv (all 31,102 verses),
#                heldout_chapters.txt, eval_seen.jsonl (997 items: "Book C:V w1 w2 w3" -> rest, 3
#                distractors), eval_heldout.jsonl (1,316 items), manifest.json (source sha256, counts)
#   arith/       train.txt (N_ARITH "a+b=c" lines, 1-3 digit operands, 10% of pairs held out),
#                eval_heldout.jsonl, eval_length.jsonl (4-digit operands), eval_seen.jsonl (N_EVAL each)
#   teacher_train.txt   kjv/train.txt + arith/train.txt (the tokenizer's training text)
#   tokenizer.json      byte-level BPE with VOCAB ids (or $TOKENIZER copied, e.g. the Qwen3 one)
#   train.bin           token shard of teacher_train.txt, one document per line + <|endoftext|>,
#                       documents shuffled with SEED (docs/data_formats.md)
#   kjv_heldout.bin     token shard of kjv/heldout.txt (held-out perplexity)
# Sizes with defaults: about 6.4 MB of text; with the Qwen3 tokenizer train.bin is 3.18M tokens
# (KJV 1.20M incl. EOS). Time on 2 cores: the data steps take ~2 s; the rest is BPE training.
#
# Usage: jobs/data/make_teacher_corpus.sh [OUT]
#   env: OPDLM (binary, default build/opdlm), VOCAB (8192), N_ARITH (200000), N_EVAL (1000),
#        SEED (0), TOKENIZER (use this tokenizer.json instead of training one)
set -euo pipefail

OUT=${1:-data/teacher}
OPDLM=${OPDLM:-build/opdlm}
VOCAB=${VOCAB:-8192}
N_ARITH=${N_ARITH:-200000}
N_EVAL=${N_EVAL:-1000}
SEED=${SEED:-0}

[[ -x "$OPDLM" ]] || { echo "opdlm binary not found at $OPDLM (set OPDLM=...)" >&2; exit 2; }
command -v bible >/dev/null || { echo "the KJV reader is missing: apt-get install bible-kjv bible-kjv-text" >&2; exit 2; }
mkdir -p "$OUT"
start=$(date +%s)

"$OPDLM" data kjv --out-dir "$OUT/kjv" --seed "$SEED"
"$OPDLM" data arithmetic --out-dir "$OUT/arith" --n-train "$N_ARITH" --n-eval "$N_EVAL" --seed "$SEED"
cat "$OUT/kjv/train.txt" "$OUT/arith/train.txt" > "$OUT/teacher_train.txt"

if [[ -n "${TOKENIZER:-}" ]]; then
  cp "$TOKENIZER" "$OUT/tokenizer.json"
else
  # Trained on the training text only: nothing of the held-out chapters shapes the vocabulary.
  "$OPDLM" tokenizer train --input "$OUT/teacher_train.txt" --vocab-size "$VOCAB" --out "$OUT/tokenizer.json"
fi

"$OPDLM" data prepare --tokenizer "$OUT/tokenizer.json" --input "$OUT/teacher_train.txt" \
  --out "$OUT/train.bin" --append-eos --shuffle-seed "$SEED"
"$OPDLM" data prepare --tokenizer "$OUT/tokenizer.json" --input "$OUT/kjv/heldout.txt" \
  --out "$OUT/kjv_heldout.bin" --append-eos
"$OPDLM" data inspect "$OUT/train.bin"
sha256sum "$OUT/tokenizer.json" "$OUT/teacher_train.txt" "$OUT"/*.bin > "$OUT/SHA256SUMS"
echo "done in $(( $(date +%s) - start )) s: $OUT"
