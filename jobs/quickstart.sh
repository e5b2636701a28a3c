#!/usr/bin/env bash
# quickstart.sh -- the main job: train a small AR teacher on real-format data, convert it to a
# block-diffusion student with on-policy distillation (OPD), train the random-mask cross-entropy
# baseline (rm-ce) for the same number of training tokens, evaluate all of them and print one table.
#
# Teacher:  Qwen3-shaped, configs/teacher/quickstart.{ini,model.json}, trained on invented facts
#           (the knowledge probe) + 1-2 digit arithmetic (jobs/data/make_quickstart_corpus.sh)
# Convert:  configs/opd/quickstart.ini on the conversion prompts: arithmetic (no held-out operand
#           pairs) + the facts of the conversion entities (never an eval entity); OPD stops at
#           optim.max_train_tokens, rm-ce at OPD's measured count
# Evaluate: teacher (AR), S0 = the teacher's weights decoded as a DLM before any conversion, OPD,
#           rm-ce: exact match on the eval entities' facts (retention) and held-out arithmetic, multiple choice by
#           likelihood on facts, tokens per forward, KL(teacher||student) on own / random states
# Time:     398 s on 2 cores measured (teacher 163 s, OPD 74 s, rm-ce 45 s, evals 115 s),
#           plus the build on a fresh machine; ~15 MB of disk
# Output:   runs/quickstart/{teacher,opd,rm-ce}/ (model.h5, metrics.jsonl, summary.json),
#           runs/quickstart/eval/*.json (opdlm eval results), runs/quickstart/table.{txt,json}
#
# Usage: jobs/quickstart.sh          (builds build/opdlm first when it is missing)
#    or: sbatch jobs/quickstart.sh   (from the repository root, which must be on a shared filesystem;
#        resources: the #SBATCH lines below, 1 task x 2 CPUs for 1 h, log slurm-opdlm-quickstart-<id>.log;
#        change them on the command line, e.g. sbatch --cpus-per-task=8 --partition=p jobs/quickstart.sh.
#        A rerun, or a requeue, skips what is done: data, teacher, each finished conversion)
#   env: OPDLM (binary, default build/opdlm), DATA (data/quickstart), RUN (runs/quickstart),
#        EVAL_LIMIT (records per eval task, default 300), SEED (conversion seed, default 1234)
#SBATCH --job-name=opdlm-quickstart
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.log
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
DATA=${DATA:-data/quickstart}
RUN=${RUN:-runs/quickstart}
EVAL_LIMIT=${EVAL_LIMIT:-300}
SEED=${SEED:-1234}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
start=$(date +%s)
stamp() { echo "[quickstart $(( $(date +%s) - start )) s] $*"; }

source jobs/lib/common.sh  # ensure_opdlm, ensure_quickstart_data, ensure_quickstart_teacher
ensure_opdlm "$OPDLM"
mkdir -p "$RUN/eval"

# ---- data -----------------------------------------------------------------------------------------
ensure_quickstart_data "$OPDLM" "$DATA" "$RUN/data.log"

# ---- teacher --------------------------------------------------------------------------------------
ensure_quickstart_teacher "$OPDLM" "$DATA" "$RUN/teacher" "$RUN/teacher.log"
TEACHER=$RUN/teacher/model.h5

# ---- conversion: OPD, then rm-ce at OPD's token count ---------------------------------------------
convert() {  # mode out_dir extra-args...
  local mode=$1 out=$2; shift 2
  stamp "$mode: opdlm train --mode $mode (configs/opd/quickstart.ini) $*"
  mkdir -p "$out"
  "$OPDLM" train --mode "$mode" --config configs/opd/quickstart.ini --model.teacher="$TEACHER" \
    --model.tokenizer="$DATA/tokenizer.json" --data.prompts="$DATA/arith/conversion.jsonl,$DATA/facts/conversion.jsonl" \
    --eval.probe_prompts="$DATA/arith/eval_heldout.jsonl" --run.seed="$SEED" --run.out_dir="$out" "$@" \
    > "$out/summary.json.tmp" 2> "$RUN/$mode.log" || { echo "$mode failed: see $RUN/$mode.log" >&2; exit 1; }
  mv "$out/summary.json.tmp" "$out/summary.json"
}
[[ -f $RUN/opd/summary.json ]] || convert opd "$RUN/opd"
# rm-ce: stopped by OPD's token count, with OPD's number of optimizer steps as its cosine horizon
# (rl_steps only bounds the run), so both arms see the same LR schedule and the same tokens.
read -r OPD_TOKENS OPD_STEPS < <(python3 -c "import json; s = json.load(open('$RUN/opd/summary.json')); print(s['train_tokens'], s['optimizer_steps'])")
[[ -f $RUN/rm-ce/summary.json ]] || convert rm-ce "$RUN/rm-ce" --optim.max_train_tokens="$OPD_TOKENS" \
  --optim.max_steps="$OPD_STEPS" --optim.rl_steps=100000

# ---- evaluation -----------------------------------------------------------------------------------
TASKS=("$DATA/facts/eval.jsonl" "$DATA/arith/eval_heldout.jsonl")
evaluate() {  # name mode model
  stamp "eval $1 ($2)"
  "$OPDLM" eval --mode "$2" --model "$3" --teacher "$TEACHER" --tokenizer "$DATA/tokenizer.json" \
    --tasks "${TASKS[@]}" --limit "$EVAL_LIMIT" --max-new-tokens 16 --out "$RUN/eval/$1.json" \
    --items "$RUN/eval/$1.items.jsonl" > "$RUN/eval/$1.txt" 2>> "$RUN/eval.log" \
    || { echo "eval $1 failed: see $RUN/eval.log" >&2; exit 1; }
}
evaluate teacher ar "$TEACHER"
evaluate s0 diffusion "$TEACHER"
evaluate opd diffusion "$RUN/opd/model.h5"
evaluate rm-ce diffusion "$RUN/rm-ce/model.h5"

stamp "table"
python3 tools/eval_table.py --reference "teacher (AR)" --json "$RUN/table.json" \
  --row "teacher (AR)=$RUN/eval/teacher.json" \
  --row "S0 (no conversion)=$RUN/eval/s0.json" \
  --row "OPD=$RUN/eval/opd.json:$RUN/opd/summary.json" \
  --row "rm-ce=$RUN/eval/rm-ce.json:$RUN/rm-ce/summary.json" | tee "$RUN/table.txt"
stamp "done: $RUN/table.txt"
