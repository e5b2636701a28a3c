#!/usr/bin/env bash
# reproduce.sh -- the full reproduction study (../shared/docs/study.md, our page docs/study.md): the
# paper's claims C1 (data efficiency), C2 (knowledge retention) and C3 (train/inference mismatch)
# at CPU scale. Hours, not CI.
#
# Teacher:  the quickstart teacher (Qwen3-shaped, configs/teacher/quickstart.{ini,model.json}) on
#           data/quickstart (invented facts + 1-2 digit arithmetic); reused when present, else built
#           exactly as jobs/quickstart.sh does (jobs/lib/common.sh)
# Arms:     A opd, C rm-kl, B rm-ce (--loss.ce_source=gold), B' rm-ce (--loss.ce_source=teacher)
#           (study.md 5.4), all from S0 = the teacher's weights, configs/opd/quickstart.ini, on the
#           conversion prompts arith/conversion.jsonl + facts/conversion.jsonl (the facts of the
#           conversion entities; never an eval entity); every arm gets the same LR sweep and seeds
# Budget:   per run MAX_TOKENS training tokens (default 160,000; optim.max_train_tokens), with
#           checkpoints at the MILESTONES (default 2,500 .. 160,000, doubling: run.save_at_tokens)
#           and the state-KL probe (eval.probe_every, PROBES per run). The cosine horizon
#           (optim.max_steps) is set per arm from a short calibration run so that every arm's LR
#           decays over the same MAX_TOKENS. Defaults: 4 arms x 3 LRs x 3 seeds = 36 runs
# Evaluate: every milestone checkpoint with `opdlm eval --mode diffusion` (static b 4 s 4, greedy):
#           held-out arithmetic EM (C1), facts EM + multiple choice (C2 retention), state KL with
#           --teacher (C3), gen-PPL of arithmetic-prompt samples under the teacher; the teacher once
#           (--mode ar) and S0 once (--mode diffusion); then the tau sweep (low_confidence_dynamic)
#           on the final checkpoint of each arm's best LR (and S0): EM and tokens per forward
# Report:   tools/study_report.py RUN -> RUN/report.md + RUN/report.json (pass/fail of study.md 5.8)
# Model:    quickstart teacher size (configs/teacher/quickstart.model.json); smoke teachers work too
# Time:     measured on 2 cores with JOBS=2 OMP_NUM_THREADS=1: 36 conversions of 120k tokens, 144
#           milestone evals at EVAL_LIMIT 100, two taus: 37 min (docs/study.md). The defaults (160k
#           tokens, EVAL_LIMIT 200, six taus) should take about 1.5x that (an estimate, not measured).
# Output:   RUN/study.json (settings + per-arm horizon), RUN/calib/ARM/ (calibration runs),
#           RUN/train/ARM/lr_LR/seed_S/{metrics.jsonl,summary.json,train.log,model.h5,checkpoints/tokens_M.h5},
#           RUN/eval/ARM/lr_LR/seed_S/tokens_M.{json,log}, RUN/eval/ref/{teacher,s0}.json,
#           RUN/tau/ARM/lr_LR/seed_S/tau_T.json, RUN/tau/s0/tau_T.json, RUN/report.{md,json}
# Restart:  rerun the same command: a run with summary.json, an eval or tau result that exists is
#           skipped; a run without summary.json is restarted from scratch. RUN refuses settings that
#           differ from its study.json in what cached results depend on (use another RUN).
#
# Usage: jobs/reproduce.sh
#    or: sbatch jobs/reproduce.sh (from the repository root, on a shared filesystem; resources: the
#        #SBATCH lines below, 1 task x 4 CPUs for 6 h, log slurm-opdlm-reproduce-<id>.log; change them
#        on the command line, e.g. JOBS=8 sbatch --cpus-per-task=8 jobs/reproduce.sh; a resubmission
#        or a requeue picks up where it stopped, as under Restart above)
#   env: OPDLM (build/opdlm), DATA (data/quickstart), TEACHER (runs/quickstart/teacher/model.h5; built
#        there when missing and DATA is the quickstart data), CONFIG (configs/opd/quickstart.ini),
#        RUN (runs/reproduce), ARMS ("opd rm-kl rm-ce-gold rm-ce-teacher"), SEEDS ("1 2 3"),
#        LRS ("1e-4 3e-4 1e-3"), MAX_TOKENS (160000), MILESTONES (comma list ending at MAX_TOKENS;
#        default MAX_TOKENS/64, /32, ..., MAX_TOKENS), EVAL_LIMIT (records per eval task, 200),
#        TAUS ("0.5 0.7 0.8 0.9 0.95 1.0"), PROBES (state-KL probes per run, 16), CALIB_TOKENS
#        (tokens of each arm's calibration run, max(2000, MAX_TOKENS/20)), JOBS (parallel opdlm
#        processes, 1; with JOBS > 1 each gets OMP_NUM_THREADS=1 unless set)
#   reduced example (smoke teacher, ~2-3 min):
#     DATA=/tmp/smoke1/data TEACHER=/tmp/smoke1/teacher/model.h5 RUN=runs/reproduce-smoke SEEDS="1 2" \
#       LRS=3e-4 MAX_TOKENS=8000 MILESTONES=2000,4000,8000 EVAL_LIMIT=100 TAUS="0.7 0.9" jobs/reproduce.sh
#SBATCH --job-name=opdlm-reproduce
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=06:00:00
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
TEACHER=${TEACHER:-runs/quickstart/teacher/model.h5}
CONFIG=${CONFIG:-configs/opd/quickstart.ini}
RUN=${RUN:-runs/reproduce}
ARMS=${ARMS:-opd rm-kl rm-ce-gold rm-ce-teacher}
SEEDS=${SEEDS:-1 2 3}
LRS=${LRS:-1e-4 3e-4 1e-3}
MAX_TOKENS=${MAX_TOKENS:-160000}
EVAL_LIMIT=${EVAL_LIMIT:-200}
TAUS=${TAUS:-0.5 0.7 0.8 0.9 0.95 1.0}
PROBES=${PROBES:-16}
JOBS=${JOBS:-1}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
if (( JOBS > 1 )); then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
start=$(date +%s)
stamp() { echo "[reproduce $(( $(date +%s) - start )) s] $*"; }
die() { echo "reproduce.sh: $*" >&2; exit 1; }
source jobs/lib/common.sh  # ensure_opdlm, ensure_quickstart_data, ensure_quickstart_teacher

# ---- settings -------------------------------------------------------------------------------------
[[ $MAX_TOKENS =~ ^[1-9][0-9]*$ ]] || die "MAX_TOKENS='$MAX_TOKENS' is not a positive integer"
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "JOBS='$JOBS' is not a positive integer"
[[ $PROBES =~ ^[1-9][0-9]*$ ]] || die "PROBES='$PROBES' is not a positive integer"
[[ $EVAL_LIMIT =~ ^[0-9]+$ ]] || die "EVAL_LIMIT='$EVAL_LIMIT' is not a non-negative integer"
if [[ -z ${MILESTONES:-} ]]; then
  MILESTONES=$(python3 -c "m=$MAX_TOKENS; print(','.join(str(max(1, round(m / 2**k))) for k in range(6, -1, -1)))")
fi
python3 - "$MILESTONES" "$MAX_TOKENS" <<'PY' || die "bad MILESTONES='$MILESTONES'"
import sys
ms, top = sys.argv[1].split(","), int(sys.argv[2])
v = [int(x) for x in ms]  # ValueError names the item
assert all(x > 0 for x in v) and v == sorted(set(v)), "milestones must be positive and ascending"
assert v[-1] == top, f"the last milestone ({v[-1]}) must equal MAX_TOKENS ({top})"
PY
CALIB_TOKENS=${CALIB_TOKENS:-$(( MAX_TOKENS / 20 > 2000 ? MAX_TOKENS / 20 : 2000 ))}
for arm in $ARMS; do
  case $arm in opd|rm-kl|rm-ce-gold|rm-ce-teacher) ;; *) die "unknown arm '$arm' in ARMS (opd rm-kl rm-ce-gold rm-ce-teacher)";; esac
done
[[ " $ARMS " == *" opd "* ]] || die "ARMS must include opd (every factor is relative to it)"
[[ -n ${SEEDS// } && -n ${LRS// } ]] || die "SEEDS and LRS must not be empty"
ARITH=$DATA/arith/eval_heldout.jsonl
FACTS=$DATA/facts/eval.jsonl
PROMPTS=$DATA/arith/conversion.jsonl,$DATA/facts/conversion.jsonl  # facts of other entities than FACTS
MAX_NEW=16  # answers are one short line (jobs/quickstart.sh)

arm_args() {  # arm -> the trainer's mode and objective flags
  case $1 in
    opd) echo "--mode opd" ;;
    rm-kl) echo "--mode rm-kl" ;;
    rm-ce-gold) echo "--mode rm-ce --loss.ce_source=gold" ;;
    rm-ce-teacher) echo "--mode rm-ce --loss.ce_source=teacher" ;;
  esac
}

# ---- parallel pool: JOBS at a time; a failed job is recorded and stops the stage ---------------------
FAILED=$RUN/failed.txt
spawn() {
  if (( JOBS <= 1 )); then "$@"; return; fi
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
  ( "$@" ) || echo "$*" >> "$FAILED" &
}
drain() {  # stage name
  wait
  if [[ -s $FAILED ]]; then
    echo "reproduce.sh: $1: failed jobs (see their logs):" >&2; cat "$FAILED" >&2; rm -f "$FAILED"; exit 1
  fi
}

# ---- data + teacher -------------------------------------------------------------------------------
ensure_opdlm "$OPDLM"
mkdir -p "$RUN"
rm -f "$FAILED"
if [[ ! -f $DATA/train.bin ]]; then
  [[ $DATA == data/quickstart ]] || die "DATA=$DATA has no train.bin (only data/quickstart is built here)"
  ensure_quickstart_data "$OPDLM" "$DATA" "$RUN/data.log"
fi
for f in "$ARITH" "$FACTS" ${PROMPTS//,/ } "$DATA/tokenizer.json"; do [[ -f $f ]] || die "missing data file $f"; done
if [[ ! -f $TEACHER ]]; then
  [[ $TEACHER == */model.h5 ]] || die "TEACHER=$TEACHER is missing (a missing teacher is built only at .../model.h5)"
  ensure_quickstart_teacher "$OPDLM" "$DATA" "$(dirname "$TEACHER")" "$(dirname "$TEACHER")/../teacher.log"
fi

# ---- calibration: tokens per optimizer step per arm -> the cosine horizon ---------------------------
# One short run per arm (first seed, middle LR) measures training tokens per optimizer step and per
# RL step over its second half (the first steps' rollouts are long: the student has not learned to
# stop yet); optim.max_steps = ceil(MAX_TOKENS / tokens per update) makes every arm's cosine end at
# about MAX_TOKENS, and eval.probe_every spreads PROBES probes over the run.
read -r -a LR_ARR <<< "$LRS"; LR_MID=${LR_ARR[$(( (${#LR_ARR[@]} - 1) / 2 ))]}
read -r -a SEED_ARR <<< "$SEEDS"; SEED0=${SEED_ARR[0]}
calibrate() {  # arm
  local arm=$1 out=$RUN/calib/$1
  [[ -f $out/summary.json ]] && return 0
  rm -rf "$out"; mkdir -p "$out"
  stamp "calibrate $arm ($CALIB_TOKENS tokens)"
  # shellcheck disable=SC2046
  "$OPDLM" train $(arm_args "$arm") --config "$CONFIG" --model.teacher="$TEACHER" \
    --model.tokenizer="$DATA/tokenizer.json" --data.prompts="$PROMPTS" --eval.probe_prompts="$ARITH" \
    --eval.probe_every=0 --eval.probe_limit=1 --optim.max_train_tokens="$CALIB_TOKENS" --optim.rl_steps=1000000 \
    --optim.lr="$LR_MID" --run.log_every=1 --run.seed="$SEED0" --run.out_dir="$out" > "$out/summary.json.tmp" 2> "$out/train.log" \
    || die "calibration of $arm failed: see $out/train.log"
  mv "$out/summary.json.tmp" "$out/summary.json"
}
for arm in $ARMS; do calibrate "$arm"; done

# study.json: what the report reads. Settings that cached results depend on must not change in a RUN.
python3 - "$RUN" "$CONFIG" "$DATA" "$TEACHER" "$ARMS" "$SEEDS" "$LRS" "$MAX_TOKENS" "$MILESTONES" \
  "$EVAL_LIMIT" "$TAUS" "$PROBES" "$CALIB_TOKENS" "$ARITH" "$FACTS" "$PROMPTS" "$MAX_NEW" <<'PY' \
  || die "cannot write $RUN/study.json"
import json, math, os, sys
(run, config, data, teacher, arms, seeds, lrs, max_tokens, milestones, eval_limit, taus, probes,
 calib_tokens, arith, facts, prompts, max_new) = sys.argv[1:]
max_tokens, probes = int(max_tokens), int(probes)
horizon = {}
for arm in arms.split():
    s = json.load(open(f"{run}/calib/{arm}/summary.json"))
    per_update = s["train_tokens"] / s["optimizer_steps"]
    per_rl = s["train_tokens"] / s["rl_steps"]
    steps = [json.loads(l) for l in open(f"{run}/calib/{arm}/metrics.jsonl") if '"event":"step"' in l]
    steps = [(e["budget"]["train_tokens"], e["optimizer_steps"], e["rl_step"]) for e in steps]
    half = [x for x in steps if x[0] >= s["train_tokens"] / 2]
    if len(half) >= 2 and half[-1][1] > half[0][1] and half[-1][2] > half[0][2]:  # the second half's rates
        per_update = (half[-1][0] - half[0][0]) / (half[-1][1] - half[0][1])
        per_rl = (half[-1][0] - half[0][0]) / (half[-1][2] - half[0][2])
    rl_est = math.ceil(max_tokens / per_rl)
    horizon[arm] = {"calib_train_tokens": s["train_tokens"], "calib_optimizer_steps": s["optimizer_steps"],
                    "calib_rl_steps": s["rl_steps"], "tokens_per_update": per_update, "tokens_per_rl_step": per_rl,
                    "max_steps": max(11, math.ceil(max_tokens / per_update)),
                    "probe_every": max(1, round(rl_est / probes)), "rl_steps": 20 * rl_est + 100}
study = {"format": "opdlm-study/1", "config": config, "data": data, "teacher": teacher,
         "arms": arms.split(), "seeds": seeds.split(), "lrs": lrs.split(), "max_tokens": max_tokens,
         "milestones": [int(x) for x in milestones.split(",")], "eval_limit": int(eval_limit),
         "taus": taus.split(), "probes": probes, "calib_tokens": int(calib_tokens), "max_new_tokens": int(max_new),
         "tasks": {"arith": arith, "facts": facts}, "prompts": prompts, "horizon": horizon}
path = f"{run}/study.json"
if os.path.exists(path):
    old = json.load(open(path))
    for k in ("config", "data", "teacher", "max_tokens", "milestones", "eval_limit", "calib_tokens", "tasks", "max_new_tokens"):
        if old.get(k) != study[k]:
            sys.exit(f"reproduce.sh: {path} was made with {k}={old.get(k)!r}, now {study[k]!r}: use another RUN")
    # a RUN may grow: keep arms / seeds / LRs / taus of earlier invocations listed
    for k in ("arms", "seeds", "lrs", "taus"):
        study[k] = old[k] + [x for x in study[k] if x not in old[k]]
    study["horizon"] = {**old.get("horizon", {}), **horizon}
json.dump(study, open(path + ".tmp", "w"), indent=1)
os.replace(path + ".tmp", path)
PY
hz() {  # arm key -> value from study.json's horizon
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['horizon'][sys.argv[2]][sys.argv[3]])" "$RUN/study.json" "$1" "$2"
}

# ---- conversion runs ------------------------------------------------------------------------------
train_run() {  # arm lr seed
  local arm=$1 lr=$2 seed=$3 out=$RUN/train/$1/lr_$2/seed_$3
  [[ -f $out/summary.json ]] && return 0
  rm -rf "$out"; mkdir -p "$out"
  stamp "train $arm lr $lr seed $seed"
  # shellcheck disable=SC2046
  "$OPDLM" train $(arm_args "$arm") --config "$CONFIG" --model.teacher="$TEACHER" \
    --model.tokenizer="$DATA/tokenizer.json" --data.prompts="$PROMPTS" --eval.probe_prompts="$ARITH" \
    --eval.probe_every="$(hz "$arm" probe_every)" --optim.lr="$lr" --optim.max_train_tokens="$MAX_TOKENS" \
    --optim.rl_steps="$(hz "$arm" rl_steps)" --optim.max_steps="$(hz "$arm" max_steps)" \
    --run.save_at_tokens="$MILESTONES" --run.log_every=1 --run.seed="$seed" --run.out_dir="$out" \
    > "$out/summary.json.tmp" 2> "$out/train.log" || die "train $arm lr $lr seed $seed failed: see $out/train.log"
  mv "$out/summary.json.tmp" "$out/summary.json"
}
for arm in $ARMS; do for lr in $LRS; do for seed in $SEEDS; do
  spawn train_run "$arm" "$lr" "$seed"
done; done; done
drain training

# ---- evaluation -----------------------------------------------------------------------------------
run_eval() {  # out.json log model mode extra-args... (skipped when out.json exists)
  local out=$1 log=$2 model=$3 mode=$4; shift 4
  [[ -f $out ]] && return 0
  [[ -f $model ]] || die "missing model $model"
  mkdir -p "$(dirname "$out")"
  "$OPDLM" eval --mode "$mode" --model "$model" --tokenizer "$DATA/tokenizer.json" --limit "$EVAL_LIMIT" \
    --max-new-tokens "$MAX_NEW" --out "${out%.json}.tmp.json" "$@" > "$log" 2>&1 \
    || die "eval of $model failed: see $log"
  mv "${out%.json}.tmp.json" "$out"
}
full_eval() {  # out.json model mode: the milestone evaluation (C1 EM, C2 facts, C3 state KL, gen-PPL)
  run_eval "$1" "${1%.json}.log" "$2" "$3" --teacher "$TEACHER" --tasks "$FACTS" "$ARITH" --gen-ppl-tasks "$ARITH"
}
stamp "eval: references (teacher AR, S0)"
spawn full_eval "$RUN/eval/ref/teacher.json" "$TEACHER" ar
spawn full_eval "$RUN/eval/ref/s0.json" "$TEACHER" diffusion
stamp "eval: milestone checkpoints"
IFS=, read -r -a MS <<< "$MILESTONES"
for arm in $ARMS; do for lr in $LRS; do for seed in $SEEDS; do for m in "${MS[@]}"; do
  spawn full_eval "$RUN/eval/$arm/lr_$lr/seed_$seed/tokens_$m.json" \
    "$RUN/train/$arm/lr_$lr/seed_$seed/checkpoints/tokens_$m.h5" diffusion
done; done; done; done
drain evaluation

# ---- tau sweep: final checkpoint of each arm's best LR (tools/study_report.py picks it), and S0 ------
tau_eval() {  # out.json model
  run_eval "$1" "${1%.json}.log" "$2" diffusion --tasks "$ARITH" --strategy low_confidence_dynamic --tau "$3"
}
for tau in $TAUS; do spawn tau_eval "$RUN/tau/s0/tau_$tau.json" "$TEACHER" "$tau"; done
for arm in $ARMS; do
  lr=$(python3 tools/study_report.py "$RUN" --best-lr "$arm") || die "cannot pick the best LR of $arm"
  stamp "tau sweep: $arm (best lr $lr)"
  for seed in $SEEDS; do for tau in $TAUS; do
    spawn tau_eval "$RUN/tau/$arm/lr_$lr/seed_$seed/tau_$tau.json" \
      "$RUN/train/$arm/lr_$lr/seed_$seed/checkpoints/tokens_$MAX_TOKENS.h5" "$tau"
  done; done
done
drain "tau sweep"

# ---- report ---------------------------------------------------------------------------------------
stamp "report"
python3 tools/study_report.py "$RUN" || die "tools/study_report.py $RUN failed"
stamp "done: $RUN/report.md"
