#!/usr/bin/env bash
# stop_requeue.sh OPDLM [MPIEXEC...] -- graceful stops of `opdlm train` (issue 7, part 1): a stop
# signal or the time limit ends the run at the next RL-step boundary with a committed checkpoint and
# exit code 75 ("requeue me"), within one step + one save + 5 s of the signal:
#  - SIGTERM to one process; `--run.resume=auto` then finishes the run bit for bit like an
#    uninterrupted one (model.h5 sha256 and every step line);
#  - run.time_limit: stops before the limit with the reason "time limit";
#  - under mpiexec -n 2: SIGTERM to rank 1 only (every rank stops), and SIGUSR1 to mpiexec (forwarded).
set -euo pipefail
source "$(dirname "$(readlink -f "$0")")/lib/cli_test.sh" stop_requeue "$@"

make_tiny_teacher "$OPDLM"
OPD=(train --mode opd --model.teacher=teacher/model.h5 --model.tokenizer=tok.json
  --data.prompts=arith/conversion.jsonl --data.prompts_per_step=10 --data.rows_per_update=8
  --rollout.max_new_tokens=8 --optim.lr=1e-3 --optim.warmup_steps=1 --run.seed=3 --optim.rl_steps=200)
now() { date +%s.%N; }
# The pids of the opdlm processes whose command line names run directory $1.
ranks_of() { for p in $(pgrep -f "run.out_dir=$1( |$)"); do [[ $(cat /proc/$p/comm 2>/dev/null) == opdlm ]] && echo $p; done; }
# Starts a run in the background; returns once it has logged its first RL step.
start() {  # start NAME [launcher...]
  local name=$1
  shift
  ( set +e; "$@" "$OPDLM" "${OPD[@]}" --run.out_dir=$name >$name.json 2>$name.log; echo $? >$name.rc ) &
  for _ in $(seq 200); do
    grep -q '"event":"step"' $name/metrics.jsonl 2>/dev/null && return 0
    sleep 0.05
  done
  fail "$name: no RL step within 10 s: $(tail -3 $name.log)"
}
# Waits for the run, checks exit 75, a stop line with the reason and a committed checkpoint at its step.
expect_stop() {  # expect_stop NAME REASON T_SIGNAL
  local name=$1 reason=$2 t0=$3
  wait
  local took rc step
  took=$(echo "$(now) - $t0" | bc)
  rc=$(cat $name.rc)
  [[ $rc == 75 ]] || fail "$name: exit $rc, expected 75: $(tail -3 $name.log)"
  step=$(/usr/bin/python3 -c "
import json, sys
stop = [json.loads(l) for l in open('$name/metrics.jsonl') if '\"stop\"' in l]
assert len(stop) == 1 and stop[0]['reason'] == '$reason', stop
print(stop[0]['rl_step'])")
  [[ $(cat $name/checkpoints/LATEST) == $(printf 'step_%08d' $step) ]] || fail "$name: LATEST is not the stop step $step"
  "$OPDLM" ckpt verify $name >/dev/null || fail "$name: the stop checkpoint does not verify"
  (( $(echo "$took < 10" | bc) )) || fail "$name: took ${took}s after the signal"
  echo "$name: exit 75 after RL step $step, ${took}s after the signal (the start, for the time limit)" >>summary.txt
}

# One process, SIGTERM; then the resume finishes it like an uninterrupted run.
"$OPDLM" "${OPD[@]}" --run.out_dir=straight >/dev/null 2>straight.log || fail "straight run: $(tail -3 straight.log)"
start term
t0=$(now)
kill -TERM $(ranks_of term)
expect_stop term signal $t0
"$OPDLM" "${OPD[@]}" --run.out_dir=term --run.resume=auto >/dev/null 2>term_resume.log || fail "resume: $(tail -3 term_resume.log)"
sums() { h5dump -A "$1" | grep -A10 'ATTRIBUTE "sha256"' | grep -o '"[0-9a-f]\{64\}"'; }
diff <(sums straight/model.h5) <(sums term/model.h5) >/dev/null || fail "stopped + resumed differs from the straight run"
/usr/bin/python3 - <<'PY'
from metrics import lines
skip = ("checkpoint", "stop", "resume")
a, b = lines("straight", skip), lines("term", skip)
assert sum(j["event"] == "step" for j in a) == 200
assert a == b, "the stopped and resumed run's metrics differ from the straight run's"
PY

# The time limit: 6 s, with steps of ~20 ms: stops before it, margin 5 s + 1.5 x the longest step.
t0=$(now)
set +e
"$OPDLM" "${OPD[@]/--optim.rl_steps=200/--optim.rl_steps=100000}" --run.time_limit=6 --run.out_dir=limit \
  >/dev/null 2>limit.log
echo $? >limit.rc
set -e
took=$(echo "$(now) - $t0" | bc)
(( $(echo "$took < 6" | bc) )) || fail "time limit 6 s: the run took ${took}s"
expect_stop limit "time limit" $t0

# Under mpiexec -n 2: SIGTERM to rank 1 only, SIGUSR1 to mpiexec.
start rank1 "${MPIEXEC[@]}" -n 2
t0=$(now)
kill -TERM $(ranks_of rank1 | tail -1)
expect_stop rank1 signal $t0
grep -q '"ranks_signalled":1' rank1/metrics.jsonl || fail "rank1: the stop line does not say one rank was signalled"
start usr1 "${MPIEXEC[@]}" -n 2
t0=$(now)
pkill -USR1 -f "^${MPIEXEC[0]}.*run.out_dir=usr1( |$)"
expect_stop usr1 signal $t0
cat summary.txt
echo "stop_requeue: SIGTERM (1 process, one rank of 2), SIGUSR1 to mpiexec and the time limit stop with a checkpoint" \
  "and exit 75; the resume is bitwise"
