#!/usr/bin/env bash
# submit.sh -- submits slurm/opdlm.sbatch (a restartable `opdlm train` job): once, self-requeueing on
# preemption (default), or as a chain of N jobs for clusters that forbid requeue.
#
#   slurm/submit.sh [--chain N | --array N] [--dry-run] [sbatch options...] -- [opdlm train arguments...]
#
#   (default)   one job with --requeue: on SIGUSR1 (preemption notice, time limit) opdlm stops with a
#               checkpoint and exit 75, and the job requeues itself while SLURM_RESTART_COUNT <
#               OPDLM_MAX_RESTARTS (default 10); the same job id and log file throughout.
#   --chain N   N jobs, link k+1 with --dependency=afterany:<link k>, all --no-requeue and
#               OPDLM_REQUEUE=0: each link resumes from the newest checkpoint; once the run has
#               finished (RUN/DONE) the later links exit 0 at once. All links append to the first
#               link's log (slurm-<job-name>-<first id>.log) unless --output is given.
#   --array N   the same as one job array --array=1-N%1 (one task at a time, in order).
#   --dry-run   prints the sbatch commands instead of running them.
# Resources: the #SBATCH lines of slurm/opdlm.sbatch (2 nodes x 4 ranks x 8 CPUs, 24 h); any sbatch
# option given here overrides them, e.g. --nodes=4 --ntasks-per-node=8 --time=12:00:00 --partition=p.
# Environment: as slurm/opdlm.sbatch (OPDLM, OPDLM_LAUNCHER, OPDLM_MAX_RESTARTS, OPDLM_TEACHER_SHA256,
# ...); sbatch exports it to the job. Prints the job id(s), one per line.
#
# Example:
#   slurm/submit.sh --nodes=2 --ntasks-per-node=4 -- --mode opd --config configs/opd/paper.ini \
#     --model.teacher=/shared/qwen3-0.6b.h5 --checkpoint.every=10 --run.out_dir=/shared/runs/paper
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "submit.sh: $*" >&2; exit 2; }

chain=0 array=0 dry=0 sb=() args=() seen_sep=0
while (($#)); do
  if ((seen_sep)); then args+=("$1"); shift; continue; fi
  case $1 in
    --chain) chain=${2:-}; shift 2 || die "--chain needs a count" ;;
    --chain=*) chain=${1#*=}; shift ;;
    --array) array=${2:-}; shift 2 || die "--array needs a count" ;;
    --array=*) array=${1#*=}; shift ;;
    --dry-run) dry=1; shift ;;
    --) seen_sep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) sb+=("$1"); shift ;;
  esac
done
((seen_sep)) || die "put the opdlm train arguments after '--' (slurm/submit.sh [sbatch options] -- [opdlm args])"
[[ $chain =~ ^[0-9]+$ ]] || die "--chain '$chain' is not a count"
[[ $array =~ ^[0-9]+$ ]] || die "--array '$array' is not a count"
((chain == 0 || array == 0)) || die "--chain and --array exclude each other"
((chain != 1 && array != 1)) || die "a chain of 1 is a plain job without requeue: give N >= 2"

# shellcheck source-path=SCRIPTDIR source=lib/preflight.sh
source "$ROOT/slurm/lib/preflight.sh"
run=$(opdlm_arg run.out_dir "${args[@]}")
[[ -n $run ]] || die "no run directory: pass --run.out_dir=DIR (or [run] out_dir in the --config file)"
[[ ! -f $run/DONE ]] || echo "submit.sh: note: $run/DONE exists: the job will exit at once (remove DONE to train on)" >&2
has_output=0
for o in "${sb[@]}"; do [[ $o == -o* || $o == --output* ]] && has_output=1; done

export OPDLM_ROOT=$ROOT
SBATCH=(sbatch --parsable)
LINK=1
submit() {  # sbatch arguments... -> job id (with --dry-run: the command on stderr, "<jobK>" on stdout)
  if ((dry)); then
    printf '%q ' env "OPDLM_ROOT=$ROOT" ${OPDLM_REQUEUE:+"OPDLM_REQUEUE=$OPDLM_REQUEUE"} "${SBATCH[@]}" "$@" >&2
    echo >&2
    echo "<job$LINK>"
  else
    "${SBATCH[@]}" "$@" | cut -d';' -f1
  fi
}

if ((chain == 0 && array == 0)); then
  submit "${sb[@]}" "$ROOT/slurm/opdlm.sbatch" "${args[@]}"
elif ((array)); then
  export OPDLM_REQUEUE=0
  out=()
  ((has_output)) || out=(--output=slurm-%x-%A.log)
  submit --no-requeue --array="1-$array%1" "${out[@]}" "${sb[@]}" "$ROOT/slurm/opdlm.sbatch" "${args[@]}"
else
  export OPDLM_REQUEUE=0
  first=$(submit --no-requeue "${sb[@]}" "$ROOT/slurm/opdlm.sbatch" "${args[@]}")
  echo "$first"
  out=()
  if ((!has_output)); then
    name=opdlm
    for ((i = 0; i < ${#sb[@]}; i++)); do
      case ${sb[i]} in
        --job-name=*) name=${sb[i]#*=} ;;
        -J|--job-name) name=${sb[i + 1]:-$name} ;;
        -J*) name=${sb[i]#-J} ;;
      esac
    done
    out=(--output="slurm-$name-$first.log")
  fi
  prev=$first
  for ((k = 2; k <= chain; k++)); do
    LINK=$k
    prev=$(submit --no-requeue --dependency="afterany:$prev" "${out[@]}" "${sb[@]}" "$ROOT/slurm/opdlm.sbatch" "${args[@]}")
    echo "$prev"
  done
fi
