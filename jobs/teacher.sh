#!/usr/bin/env bash
# teacher.sh -- trains the quickstart's AR teacher on real text and reports what it learned.
#
# Model:   Qwen3, 2.4M parameters (configs/teacher/kjv-arith.ini + kjv-arith.model.json)
# Data:    KJV Bible, 1,137 trained chapters (1.2M tokens), + 100k arithmetic lines (1.0M tokens),
#          4,096-token BPE trained on that text (jobs/data/make_teacher_corpus.sh)
# Budget:  1,800 steps x 2,048 tokens = 3.7M training tokens
# Time:    ~14 minutes of training at ~4,400 tokens/s on 2 cores, then ~1.5 minutes of evaluation
# Output:  runs/teacher/{model.h5, metrics.jsonl, eval_*.jsonl, summary.json}
#
# Usage: jobs/teacher.sh [extra --section.key=value overrides for the trainer]
#   env: OPDLM (default build/opdlm), DATA (default data/teacher), RUN (default runs/teacher),
#        EVAL_LIMIT (items per eval task, default 500)
set -euo pipefail
# The repository: this script's parent folder; under sbatch, which runs a copy of the script from its
# spool folder, OPDLM_ROOT or the submit directory (submit from the repository root).
ROOT=${OPDLM_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $ROOT/jobs/lib/common.sh ]] || ROOT=${SLURM_SUBMIT_DIR:-.}
if ! cd "$ROOT" || [[ ! -f jobs/lib/common.sh ]]; then
  echo "$0: cannot find the opdlm repository (jobs/lib/common.sh): run it from the repository, or set OPDLM_ROOT" >&2
  exit 2
fi
OPDLM=${OPDLM:-build/opdlm}
DATA=${DATA:-data/teacher}
RUN=${RUN:-runs/teacher}
EVAL_LIMIT=${EVAL_LIMIT:-500}
# OpenBLAS is linked in its OpenMP build, so OpenMP workers may spin (active is faster here).

[[ -f $DATA/train.bin ]] || VOCAB=4096 N_ARITH=100000 OPDLM=$OPDLM jobs/data/make_teacher_corpus.sh "$DATA"

mkdir -p "$RUN"
t0=$(date +%s)
"$OPDLM" train --mode ar --config configs/teacher/kjv-arith.ini \
  --model.tokenizer="$DATA/tokenizer.json" --data.train="$DATA/train.bin" --data.eval="$DATA/kjv_heldout.bin" \
  --run.out_dir="$RUN" "$@" | tail -1 > "$RUN/train_summary.json"
t1=$(date +%s)

# Greedy completion tasks: KJV "Book C:V w1 w2 w3" -> rest of the verse (seen verses), arithmetic
# on held-out operand pairs and on seen problems.
"$OPDLM" eval --mode ar --model "$RUN/model.h5" --limit "$EVAL_LIMIT" --max-new-tokens 96 \
  --tasks "$DATA/kjv/eval_seen.jsonl" "$DATA/arith/eval_heldout.jsonl" "$DATA/arith/eval_seen.jsonl" \
  --out "$RUN/eval_items.jsonl" | tee "$RUN/eval.txt"
t2=$(date +%s)
echo "train: $((t1 - t0)) s, eval: $((t2 - t1)) s"
cat "$RUN/train_summary.json"
