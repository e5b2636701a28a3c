#!/usr/bin/env bash
# make_quickstart_corpus.sh: builds the quickstart's small corpus: invented facts (the knowledge
# probe, ../shared/docs/study.md 5.3) + easy arithmetic (1-2 digit + and -), a tiny BPE tokenizer,
# the teacher's token shard, the eval prompt files and the conversion prompts.
#
# Makes, under OUT (default data/quickstart):
#   facts/       train.txt (N_FACTS entities, 1-2 attributes each -> ~1.46 x N_FACTS facts, each
#                REPEATS times: the teacher learns every fact), conversion.jsonl (the facts of
#                N_FACTS_CONV entities as conversion prompts + gold responses: they show the students
#                the answer format), eval.jsonl (every fact of the other entities once: "The capital
#                of X is" -> " Y.", 3 distractors of the same attribute; never in the conversion
#                data, so the knowledge probe of C2), manifest.json
#   arith/       train.txt (N_ARITH "a+b=c" / "a-b=c" lines, operands 0-99, no negative results, 10%
#                of pairs held out),
#                eval_heldout.jsonl, eval_seen.jsonl, eval_length.jsonl (3-digit operands; N_EVAL
#                each), conversion.jsonl (N_CONV prompts + gold responses: never held out, never in
#                eval_seen, and no facts: conversion data for OPD and the RM-CE baseline), manifest.json
#   teacher_train.txt   facts/train.txt + arith/train.txt (the tokenizer's training text)
#   tokenizer.json      byte-level BPE, VOCAB ids; the last four are <|endoftext|> (eos = pad),
#                       <|im_start|>, <|im_end|>, <|MASK|> (the model's mask id = VOCAB - 1)
#   train.bin           token shard of teacher_train.txt: one document per line + <|endoftext|>,
#                       shuffled with SEED, then packed into SEQ_LEN-token rows padded with
#                       <|endoftext|> so every trainer window starts with a whole line (docs/data_formats.md)
#   SHA256SUMS
# Conversion prompts for training: arith/conversion.jsonl,facts/conversion.jsonl (data.prompts list).
# Sizes with defaults: 13,140 fact lines (438 facts: 213 eval, 225 conversion) + 60k arithmetic lines, 0.97 MB of text,
# 0.64M tokens (0.69M after packing into 64-token rows, 6.6% padding).
# Time on 2 cores: ~1 s.
#
# Usage: jobs/data/make_quickstart_corpus.sh [OUT]
#   env: OPDLM (binary, default build/opdlm), VOCAB (512), N_FACTS (300), N_FACTS_CONV (N_FACTS / 2), REPEATS (30),
#        TEMPLATES (1), N_ARITH (60000), N_EVAL (500), N_CONV (2000), SEED (0),
#        SEQ_LEN (64: rows of the packed shard; must equal the trainer's data.seq_len)
set -euo pipefail

OUT=${1:-data/quickstart}
OPDLM=${OPDLM:-build/opdlm}
VOCAB=${VOCAB:-512}
N_FACTS=${N_FACTS:-300}
N_FACTS_CONV=${N_FACTS_CONV:-$((N_FACTS / 2))}
REPEATS=${REPEATS:-30}
TEMPLATES=${TEMPLATES:-1}
N_ARITH=${N_ARITH:-60000}
N_EVAL=${N_EVAL:-500}
N_CONV=${N_CONV:-2000}
SEED=${SEED:-0}
SEQ_LEN=${SEQ_LEN:-64}

[[ -x "$OPDLM" ]] || { echo "opdlm binary not found at $OPDLM (set OPDLM=...)" >&2; exit 2; }
mkdir -p "$OUT"
start=$(date +%s)

"$OPDLM" data facts --out-dir "$OUT/facts" --n-facts "$N_FACTS" --repeats "$REPEATS" \
  --templates "$TEMPLATES" --seed "$SEED" --conversion-entities "$N_FACTS_CONV"
# Easy arithmetic for a tiny teacher: + and - only, operands 0-99, no negative results (they were
# the hardest part: 0 EM after 600 steps); the length set uses 3 digits.
"$OPDLM" data arithmetic --out-dir "$OUT/arith" --n-train "$N_ARITH" --n-eval "$N_EVAL" --seed "$SEED" \
  --ops "+-" --no-negative --max-digits 2 --length-digits 3 --n-conversion "$N_CONV"
cat "$OUT/facts/train.txt" "$OUT/arith/train.txt" > "$OUT/teacher_train.txt"

# Trained on the teacher's text only (the conversion prompts are arithmetic from the same
# distribution, so they tokenize the same way).
"$OPDLM" tokenizer train --input "$OUT/teacher_train.txt" --vocab-size "$VOCAB" --out "$OUT/tokenizer.json"
# Row-aligned packing (SEQ_LEN = the trainer's data.seq_len): every training window starts with a
# whole line at position 0, as eval prompts do; unpacked, held-out arithmetic EM was 0.11 where the
# same model reached 0.70 when given a leading <|endoftext|>.
"$OPDLM" data prepare --tokenizer "$OUT/tokenizer.json" --input "$OUT/teacher_train.txt" \
  --out "$OUT/train.bin" --append-eos --shuffle-seed "$SEED" --pack-rows "$SEQ_LEN"
"$OPDLM" data inspect "$OUT/train.bin"
sha256sum "$OUT/tokenizer.json" "$OUT/teacher_train.txt" "$OUT"/*.bin "$OUT"/facts/*.jsonl "$OUT"/arith/*.jsonl \
  > "$OUT/SHA256SUMS"
echo "done in $(( $(date +%s) - start )) s: $OUT"
