#!/usr/bin/env bash
# qwen3_convert.sh -- the real-model recipe: import a Hugging Face Qwen3 checkpoint (`opdlm import-hf`)
# and convert it to a block-diffusion LM by on-policy distillation with the paper's settings
# (configs/opd/paper.ini), multi-node under Slurm (srun, through slurm/opdlm.sbatch: preflight,
# SIGUSR1 forwarding, checkpoint + self-requeue on preemption) or on one machine under mpirun.
#
# Model:    Qwen3-0.6B by default (28 layers, hidden 1024, 16 query / 8 KV heads); 1.7B, 4B and 8B run
#           the same way (4B/8B: add --loss.divergence=topk_forward_kl --loss.topk=16 as paper.ini
#           says). parallel.tp must divide the 8 KV heads: --tp 1, 2, 4 or 8. Memory per rank, f32:
#           teacher + student + AdamW moments / DP, about 10 GB for 0.6B at TP 1 (estimate); use --tp
#           to split the 4B/8B models across the ranks of a node.
# Budget:   paper.ini: 483 RL steps x 128 prompts = 61,824 rollouts, responses ramped from 100 to at
#           most 4,000 tokens over the first 100 RL steps: at most ~247M generated tokens, training
#           on one state per block of each (16 optimizer steps of 8 rows per RL step, 7,729 in all).
# Time:     an estimate, not measured: ~6 GFLOP per generated token for 0.6B (decode + teacher score
#           + student forward/backward) x ~60M tokens (if responses average ~1,000) = ~4e17 FLOP.
#           opdlm's training runs on the CPU cores today (GPU kernels are planned, README Status),
#           so at ~1 TFLOP/s sustained over 2 nodes that is days (~4-5); try a smaller budget first
#           (e.g. -- --optim.rl_steps=20 --rollout.max_new_tokens=256) and read the RL-step time
#           from the log. The job stops with a checkpoint before its time limit and requeues itself.
# Resources (the #SBATCH lines below): 2 nodes x 4 ranks x 16 CPUs, 48 h, requeue, SIGUSR1 600 s
#           before the end (one RL step + one checkpoint save must fit in it). Change them on the
#           sbatch command line, e.g. sbatch --nodes=4 --ntasks-per-node=8 --cpus-per-task=8
#           --partition=gpu --gpus-per-node=8 jobs/qwen3_convert.sh ... (GPUs are not used yet).
#
# Usage (from the repository root, on a filesystem every node sees):
#   sbatch jobs/qwen3_convert.sh --hf /shared/Qwen3-0.6B --prompts /shared/prompts.jsonl \
#     [--run runs/qwen3-0.6b] [--tp 1] [--config configs/opd/paper.ini] [--dtype f32|bf16] \
#     [--checkpoint-every 5] [--dry-run] [-- extra opdlm train overrides]
#   jobs/qwen3_convert.sh --np 4 --hf ... --prompts ...    (one machine: mpirun -np 4, no Slurm)
# --hf: a Hugging Face Qwen3 directory (config.json with model_type qwen3, tokenizer.json,
# model.safetensors or model.safetensors.index.json). --prompts: conversion prompts, JSONL with a
# "prompt" field (docs/data_formats.md). --dry-run checks the arguments and prints the commands.
# Output:   RUN/teacher.h5 (+ teacher.h5.sha256, checked at every start), RUN/opd/ (model.h5,
#           metrics.jsonl, checkpoints/, summary.json, DONE); the log: slurm-opdlm-qwen3-<jobid>.log.
# Env: OPDLM (default build/opdlm), OPDLM_MAX_RESTARTS, OPDLM_LAUNCHER, ... (slurm/opdlm.sbatch).
#SBATCH --job-name=opdlm-qwen3
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.log
set -euo pipefail
START_DIR=$PWD  # relative --hf, --prompts, --run and --config are relative to it (the submit directory)
# The repository: this script's parent folder; under sbatch, which runs a copy of the script from its
# spool folder, OPDLM_ROOT or the submit directory (submit from the repository root).
ROOT=${OPDLM_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $ROOT/jobs/lib/common.sh ]] || ROOT=${SLURM_SUBMIT_DIR:-.}
if ! cd "$ROOT" || [[ ! -f jobs/lib/common.sh ]]; then
  echo "$0: cannot find the opdlm repository (jobs/lib/common.sh): run it from the repository, or set OPDLM_ROOT" >&2
  exit 2
fi
ROOT=$(pwd)
ME=qwen3_convert.sh
usage() { sed -n '/^# Usage/,/^# Env:/p' "$ROOT/jobs/qwen3_convert.sh" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "$ME: $*" >&2; exit 2; }
stamp() { echo "[$ME $(date '+%F %T')] $*"; }
abspath() { if [[ -z $1 || $1 == /* ]]; then echo "$1"; else echo "$START_DIR/$1"; fi; }

HF="" PROMPTS="" RUN=$ROOT/runs/qwen3-convert CONFIG=$ROOT/configs/opd/paper.ini TP=1 NP=1 DTYPE=f32 EVERY=5 DRY=0 EXTRA=()
while (($#)); do
  case $1 in
    --hf) HF=$(abspath "${2:-}"); shift 2 || usage ;;
    --prompts) PROMPTS=$(abspath "${2:-}"); shift 2 || usage ;;
    --run) RUN=$(abspath "${2:-}"); shift 2 || usage ;;
    --config) CONFIG=$(abspath "${2:-}"); shift 2 || usage ;;
    --tp) TP=${2:-}; shift 2 || usage ;;
    --np) NP=${2:-}; shift 2 || usage ;;
    --dtype) DTYPE=${2:-}; shift 2 || usage ;;
    --checkpoint-every) EVERY=${2:-}; shift 2 || usage ;;
    --dry-run) DRY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown argument '$1' (see --help; opdlm overrides go after --)" ;;
  esac
done

# ---- arguments ------------------------------------------------------------------------------------
[[ -n $HF ]] || die "--hf DIR is required: a Hugging Face Qwen3 directory"
[[ -d $HF ]] || die "--hf $HF is not a directory"
[[ -f $HF/config.json ]] || die "--hf $HF has no config.json"
[[ -f $HF/tokenizer.json ]] || die "--hf $HF has no tokenizer.json (the prompts are tokenized with it)"
[[ -f $HF/model.safetensors || -f $HF/model.safetensors.index.json ]] \
  || die "--hf $HF has neither model.safetensors nor model.safetensors.index.json"
mt=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("model_type", ""))' "$HF/config.json" 2>/dev/null) \
  || die "--hf $HF/config.json is not valid JSON"
[[ $mt == qwen3 ]] || die "--hf $HF/config.json: model_type is '$mt', not qwen3"
[[ -n $PROMPTS ]] || die "--prompts FILE.jsonl is required: the conversion prompts"
[[ -f $PROMPTS ]] || die "--prompts $PROMPTS does not exist"
[[ -f $CONFIG ]] || die "--config $CONFIG does not exist"
[[ $TP =~ ^(1|2|4|8)$ ]] || die "--tp $TP: must divide Qwen3's 8 KV heads (1, 2, 4 or 8)"
[[ $NP =~ ^[1-9][0-9]*$ ]] || die "--np $NP is not a positive integer"
[[ $DTYPE == f32 || $DTYPE == bf16 ]] || die "--dtype $DTYPE must be f32 or bf16"
[[ $EVERY =~ ^[1-9][0-9]*$ ]] || die "--checkpoint-every $EVERY is not a positive integer"
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  ((${SLURM_NTASKS:-1} % TP == 0)) || die "--tp $TP does not divide SLURM_NTASKS=${SLURM_NTASKS:-1}"
else
  ((NP % TP == 0)) || die "--tp $TP does not divide --np $NP"
fi
OPDLM=${OPDLM:-$ROOT/build/opdlm}
export OPDLM OPDLM_ROOT=$ROOT
TEACHER=$RUN/teacher.h5
IMPORT=("$OPDLM" import-hf --from "$HF" --out "$TEACHER.tmp" --dtype "$DTYPE")
ARGS=(--mode opd --config "$CONFIG" --model.teacher="$TEACHER" --model.tokenizer="$HF/tokenizer.json"
  --data.prompts="$PROMPTS" --parallel.tp="$TP" --checkpoint.every="$EVERY" --run.out_dir="$RUN/opd" "${EXTRA[@]}")
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  LAUNCH=(bash "$ROOT/slurm/opdlm.sbatch" "${ARGS[@]}")
else
  LAUNCH=(mpirun -np "$NP" --bind-to none)
  if [[ $(id -u) == 0 ]]; then LAUNCH+=(--allow-run-as-root); fi
  LAUNCH+=("$OPDLM" train "${ARGS[@]}" --run.resume=auto)
fi

if ((DRY)); then
  stamp "dry run: the arguments check out; the commands:"
  if [[ -f $TEACHER && -f $TEACHER.sha256 ]]; then echo "# $TEACHER exists: no import"; else
    echo "mkdir -p $(printf '%q' "$RUN")"
    printf '%q ' "${IMPORT[@]}"; echo
    echo "mv $(printf '%q' "$TEACHER.tmp") $(printf '%q' "$TEACHER") && (cd $(printf '%q' "$RUN") && sha256sum teacher.h5) > $(printf '%q' "$TEACHER.sha256")"
  fi
  [[ -n ${SLURM_JOB_ID:-} ]] && echo "# in job $SLURM_JOB_ID (${SLURM_NTASKS:-1} tasks): the batch shell becomes slurm/opdlm.sbatch"
  printf '%q ' "${LAUNCH[@]}"; echo
  exit 0
fi

# ---- 1. import (once; a requeued job finds it) ----------------------------------------------------
# A preemption notice during the import is kept for slurm/opdlm.sbatch (it then stops and requeues).
PENDING=""
trap 'PENDING=USR1; stamp "got SIGUSR1 during the import: stopping after it"' USR1
trap 'PENDING=TERM; stamp "got SIGTERM during the import: stopping after it"' TERM
mkdir -p "$RUN"
if [[ ! -f $TEACHER || ! -f $TEACHER.sha256 ]]; then
  [[ -x $OPDLM ]] || die "opdlm binary $OPDLM is missing: build it (cmake --build build --target opdlm_cli) or set OPDLM"
  stamp "import: ${IMPORT[*]}"
  "${IMPORT[@]}" &
  pid=$!
  while :; do
    rc=0
    wait "$pid" || rc=$?
    ((rc == 0)) && break
    kill -0 "$pid" 2>/dev/null && continue   # a trapped signal interrupted wait: the import goes on
    die "opdlm import-hf --from $HF failed (exit $rc)"
  done
  mv -f "$TEACHER.tmp" "$TEACHER"
  (cd "$(dirname "$TEACHER")" && sha256sum "$(basename "$TEACHER")") >"$TEACHER.sha256"
  stamp "imported $TEACHER: $(cut -d' ' -f1 "$TEACHER.sha256")"
else
  stamp "teacher $TEACHER already imported"
fi

# ---- 2. the conversion ----------------------------------------------------------------------------
trap - USR1 TERM
stamp "convert: ${LAUNCH[*]}"
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  # exec keeps this shell's pid: Slurm's SIGUSR1 (--signal=B:USR1) then reaches slurm/opdlm.sbatch
  OPDLM_PENDING_SIGNAL=$PENDING exec "${LAUNCH[@]}"
fi
exec "${LAUNCH[@]}"
