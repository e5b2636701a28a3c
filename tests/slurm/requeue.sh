#!/usr/bin/env bash
# requeue.sh OPDLM [MPIEXEC...] -- issue 8 against a real Slurm: starts a throwaway single-node
# cluster (tools/slurm-local.sh: munged, slurmctld, slurmd under this test's temp dir, private
# ports, stopped by PID at exit), submits the project's own slurm/opdlm.sbatch for a small OPD run
# (tiny teacher, 2 ranks, 200 RL steps, a checkpoint after every step) and checks:
#  1. preempted by `scontrol requeue` (Slurm kills and requeues it) and then by
#     `scancel --signal=USR1 --batch` (the batch shell forwards USR1, opdlm exits 75, the script
#     requeues itself and Slurm restarts it unattended), the job ends COMPLETED with Restarts=2;
#     model.h5 and the final checkpoint are bitwise those of an uninterrupted `mpiexec -n 2` run,
#     the metrics log holds RL steps 1..200 once each and equals the uninterrupted one, and the job
#     log holds all three attempts in order (appended, never truncated);
#  2. the restart cap: OPDLM_MAX_RESTARTS=1 and OPDLM_LAUNCHER=mpirun, two USR1 preemptions: one
#     requeue, then the job stops requeueing, ends FAILED with exit code 75 and says so in the log,
#     and its last checkpoint verifies at the step it stopped;
#  3. the chained mode (slurm/submit.sh --chain 3, no requeue): link 1 is stopped by USR1 (exit 75),
#     link 2 resumes and finishes bitwise like the uninterrupted run, link 3 sees DONE and exits 0;
#  4. jobs/ under sbatch (which runs a copy from its spool folder): jobs/quickstart.sh finds the
#     repository (SLURM_SUBMIT_DIR); jobs/qwen3_convert.sh imports the tiny teacher exported as a
#     Hugging Face Qwen3 directory and converts it at TP 2 through slurm/opdlm.sbatch.
# Exits 77 (ctest SKIP) without slurmctld/slurmd/munged or without root, unless OPDLM_REQUIRE_SLURM=1
# (CI); KEEP=1 keeps the temp dir.
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
REPO=$(cd "$HERE/../.." && pwd)
# Skip (77) without Slurm or root; OPDLM_REQUIRE_SLURM=1 (.ci/run) turns that into a failure.
skip() {
  if [[ ${OPDLM_REQUIRE_SLURM:-0} == 1 ]]; then echo "FAIL: $* (OPDLM_REQUIRE_SLURM=1)"; exit 1; fi
  echo "SKIP: $*"
  exit 77
}
for c in slurmctld slurmd munged munge sbatch scontrol squeue srun scancel; do
  command -v "$c" >/dev/null || skip "$c is not installed (tools/install-deps.sh installs Slurm and munge)"
done
[[ $(id -u) == 0 ]] || skip "the throwaway Slurm runs its daemons as root (SlurmUser=root)"
# A Slurm job around this test (CI inside an allocation) must not leak into ours.
while read -r v; do unset "$v"; done < <(compgen -v SLURM_ || true)
source "$REPO/tests/cli/lib/cli_test.sh" slurm_requeue "$@"
T_TEST=$(date +%s)
trap 'echo "FAIL: requeue.sh line $LINENO: \"$BASH_COMMAND\" exited $?"' ERR

# ---- the cluster, stopped at exit whatever happens ----------------------------------------------------
export SLURM_LOCAL_DIR=$W/slurm
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 20); do
  p=$((20000 + RANDOM % 20000))
  if port_free "$p" && port_free $((p + 1)); then break; fi
done
export SLURM_LOCAL_CTLD_PORT=$p SLURM_LOCAL_SLURMD_PORT=$((p + 1)) SLURM_LOCAL_CRED_EXPIRE=10
# A watchdog well inside ctest's TIMEOUT (900 s): ctest kills with SIGKILL, which would leave the
# daemons running; SIGTERM here runs cleanup (within 0.1 s: the test only polls, short commands).
(
  trap 'kill "$sp" 2>/dev/null; exit 0' TERM
  sleep 600 &
  sp=$!
  wait "$sp"
  echo "FAIL: slurm_requeue: still running after 600 s, stopping"
  kill -TERM $$
) &
WATCHDOG=$!
cleanup() {
  local rc=$?
  kill "$WATCHDOG" 2>/dev/null || true
  "$REPO/tools/slurm-local.sh" stop >/dev/null 2>&1 || echo "slurm_requeue: tools/slurm-local.sh stop failed in $SLURM_LOCAL_DIR"
  if ((rc != 0)); then
    for f in "$W"/*.log; do [[ -f $f ]] && { echo "---- $f (tail)"; tail -n 15 "$f" | cut -c1-240; }; done
    echo "---- slurmctld.log (tail)"; tail -n 15 "$SLURM_LOCAL_DIR/log/slurmctld.log" 2>/dev/null || true
  fi
  if [[ -n ${KEEP:-} ]]; then echo "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
chmod 711 "$W"  # munged wants every folder above its socket searchable by all (mktemp -d makes 700)
env_line=$("$REPO/tools/slurm-local.sh" start 2>"$W/slurm-local.log") \
  || fail "tools/slurm-local.sh start: $(tail -5 "$W/slurm-local.log")"
eval "$env_line"
[[ ${SLURM_CONF:-} == "$SLURM_LOCAL_DIR/etc/slurm.conf" ]] || fail "tools/slurm-local.sh start did not print SLURM_CONF"
echo "slurm up in $SLURM_LOCAL_DIR (ports $p, $((p + 1)))"

# ---- helpers ----------------------------------------------------------------------------------------
state() { squeue -h -j "$1" -o %T 2>/dev/null || true; }
field() { scontrol show job "$1" | grep -o "\b$2=[^ ]*" | head -1 | cut -d= -f2; }  # JOBID FIELD
waitfor() {  # TIMEOUT_S WHAT COMMAND...: polls COMMAND every 0.1 s
  local t=$1 what=$2 i
  shift 2
  for ((i = 0; i < t * 10; i++)); do "$@" && return 0; sleep 0.1; done
  fail "waited ${t}s for: $what"
}
gone() { [[ -z $(state "$1") ]]; }
is_state() { [[ $(state "$1") == "$2" ]]; }
last_step() { grep -o '"event":"step".*"rl_step":[0-9]*' "$1/metrics.jsonl" 2>/dev/null | tail -1 | grep -o '[0-9]*$' || echo 0; }
step_at_least() { (($(last_step "$1") >= $2)); }
resumes() { grep -c '"event":"resume"' "$1/metrics.jsonl" 2>/dev/null || true; }
resumed_and_stepped() {  # RUN N_RESUMES STEPS: the N-th resume happened and STEPS more steps followed it
  local r
  (($(resumes "$1") >= $2)) || return 1
  r=$(grep '"event":"resume"' "$1/metrics.jsonl" | tail -1 | grep -o '"rl_step":[0-9]*' | cut -d: -f2)
  step_at_least "$1" $((r + $3))
}
# A requeued job waits cred_expire (10 s here) before it may start again; StartTime=now skips that
# (infra.md 5.5), but a start within ~1 s of the requeue fails with "Job credential revoked" (the
# revocation has 1 s resolution): wait 2 s first.
nudge() { sleep 2; scontrol update JobId="$1" StartTime=now; }
sums() { h5dump -A "$1" | grep -A10 'ATTRIBUTE "sha256"' | grep -o '"[0-9a-f]\{64\}"'; }
xxhs() { h5dump -A "$1" | grep -A12 'ATTRIBUTE "xxh3_64"' | grep -o '"[0-9a-f]\{16\}"'; }
same_as_ref() {  # RUN: bitwise the uninterrupted run, every RL step once
  local run=$1
  [[ -f $run/model.h5 ]] || fail "$run: no model.h5"
  diff <(sums ref/model.h5) <(sums "$run/model.h5") >/dev/null || fail "$run/model.h5 differs from the uninterrupted run's"
  [[ $(cat "$run/checkpoints/LATEST") == step_00000200 ]] || fail "$run/checkpoints/LATEST is $(cat "$run/checkpoints/LATEST"), not step_00000200"
  diff <(xxhs ref/checkpoints/step_00000200/shard_tp0.h5) <(xxhs "$run/checkpoints/step_00000200/shard_tp0.h5") >/dev/null \
    || fail "$run: the final checkpoint's parameters or AdamW moments differ from the uninterrupted run's"
  "$OPDLM" ckpt inspect "$run/checkpoints/step_00000200" >"$run.inspect" || fail "$run: opdlm ckpt inspect failed"
  /usr/bin/python3 - "$run" <<'PY'
import json, sys
from metrics import lines
run = sys.argv[1]
a, b = json.load(open("ref.inspect")), json.load(open(f"{run}.inspect"))
for k in ("rng", "data_cursor", "optimizer_steps", "train_tokens", "lr_next", "rollouts"):
    assert a[k] == b[k], f"{run}: checkpoint {k} {b[k]} != {a[k]} (uninterrupted)"
skip = ("checkpoint", "resume", "stop", "spike")
steps = [j["rl_step"] for j in lines(run, skip) if j["event"] == "step"]
assert steps == list(range(1, 201)), f"{run}/metrics.jsonl: RL steps are not 1..200 once each: {steps}"
assert lines("ref", skip) == lines(run, skip), f"{run}/metrics.jsonl differs from the uninterrupted run's"
PY
}

# ---- the tiny teacher and the uninterrupted reference (same layout: 2 ranks) ---------------------------
make_tiny_teacher "$OPDLM"
OPD=(--mode opd --model.teacher=teacher/model.h5 --model.tokenizer=tok.json --data.prompts=arith/conversion.jsonl
  --data.prompts_per_step=10 --data.rows_per_update=8 --rollout.max_new_tokens=8 --optim.lr=1e-3
  --optim.warmup_steps=1 --run.seed=3 --checkpoint.every=1)
"${MPIEXEC[@]}" -n 2 "$OPDLM" train "${OPD[@]}" --optim.rl_steps=200 --run.out_dir=ref >ref.json 2>ref.log \
  || fail "the uninterrupted reference run failed: $(tail -3 ref.log)"
"$OPDLM" ckpt inspect ref/checkpoints/step_00000200 >ref.inspect
export OPDLM OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
# sbatch runs in this folder (the submit directory): relative paths in OPD resolve here.
SB=(sbatch --parsable --nodes=1 --ntasks=2 --ntasks-per-node=2 --cpus-per-task=1)
T_REF=$(date +%s)

# ---- 1. scontrol requeue, then scancel --signal=USR1 --batch: comes back by itself, bitwise ------------
t=$(date +%s)
job=$("${SB[@]}" --output="$W/job.log" "$REPO/slurm/opdlm.sbatch" "${OPD[@]}" --optim.rl_steps=200 --run.out_dir=run)
waitfor 120 "job $job: RL step 20 in run/metrics.jsonl" step_at_least run 20
scontrol requeue "$job" || fail "scontrol requeue $job refused"
waitfor 30 "job $job PENDING after scontrol requeue" is_state "$job" PENDING
nudge "$job"
waitfor 120 "job $job: resumed once and 20 more RL steps" resumed_and_stepped run 1 20
step_before_usr1=$(last_step run)
((step_before_usr1 < 190)) || fail "job $job: the run was at RL step $step_before_usr1 of 200 before the USR1 preemption: too fast to test"
scancel --signal=USR1 --batch "$job"
# no StartTime nudge now: the self-requeued job must come back on its own (after cred_expire = 10 s)
waitfor 180 "job $job to finish" gone "$job"
[[ $(field "$job" JobState) == COMPLETED ]] || fail "job $job ended $(field "$job" JobState) (exit $(field "$job" ExitCode)), not COMPLETED"
[[ $(field "$job" Restarts) == 2 ]] || fail "job $job: Restarts=$(field "$job" Restarts), expected 2"
[[ -f run/DONE && -f run/summary.json ]] || fail "job $job: no run/DONE or run/summary.json"
same_as_ref run
# The log: every attempt, in order, and the first attempt's lines still at the top (append, not truncate).
grep -o 'attempt [0-9]* (SLURM_RESTART_COUNT=[0-9]*' job.log >attempts.txt || true
printf 'attempt %d (SLURM_RESTART_COUNT=%d\n' 1 0 2 1 3 2 | diff - attempts.txt >/dev/null \
  || fail "job.log: attempts $(tr '\n' ';' <attempts.txt), expected 1, 2, 3 in order"
head -1 job.log | grep -q "attempt 1 (SLURM_RESTART_COUNT=0," || fail "job.log does not start with attempt 1: truncated?"
grep -q "DUE TO JOB REQUEUE" job.log || fail "job.log: no trace of the scontrol requeue"
grep -q "got SIGUSR1; forwarding SIGUSR1 to the job step" job.log || fail "job.log: the batch shell did not forward SIGUSR1"
grep -q "requeueing (restart 2 of at most 10)" job.log || fail "job.log: no self-requeue after the USR1 stop"
(($(grep -c "stopping after RL step" job.log) >= 2)) || fail "job.log: the ranks did not stop with a checkpoint twice"
[[ $(grep -c "resumed from run/checkpoints/step_" job.log) == 2 ]] || fail "job.log: not 2 resumes"
echo "1. job $job: scontrol requeue + USR1 (at RL step $step_before_usr1): Restarts=2, COMPLETED, bitwise, $(($(date +%s) - t)) s" >>summary.txt

# ---- 2. the restart cap (OPDLM_MAX_RESTARTS=1), mpirun launcher --------------------------------------
t=$(date +%s)
job=$(OPDLM_MAX_RESTARTS=1 OPDLM_LAUNCHER=mpirun "${SB[@]}" --output="$W/cap.log" "$REPO/slurm/opdlm.sbatch" \
  "${OPD[@]}" --optim.rl_steps=100000 --run.out_dir=cap)
waitfor 120 "job $job: RL step 5" step_at_least cap 5
scancel --signal=USR1 --batch "$job"
waitfor 30 "job $job PENDING after its self-requeue" is_state "$job" PENDING
nudge "$job"
waitfor 120 "job $job: resumed and 5 more RL steps" resumed_and_stepped cap 1 5
scancel --signal=USR1 --batch "$job"
waitfor 60 "job $job to end" gone "$job"
[[ $(field "$job" JobState) == FAILED && $(field "$job" ExitCode) == 75:0 ]] \
  || fail "job $job ended $(field "$job" JobState) exit $(field "$job" ExitCode), expected FAILED 75:0 at the cap"
[[ $(field "$job" Restarts) == 1 ]] || fail "job $job: Restarts=$(field "$job" Restarts), expected 1 (the cap)"
grep -q "restart cap reached: SLURM_RESTART_COUNT=1 >= OPDLM_MAX_RESTARTS=1, not requeueing" cap.log \
  || fail "cap.log does not say the restart cap was hit"
stop_step=$(grep '"event":"stop"' cap/metrics.jsonl | tail -1 | grep -o '"rl_step":[0-9]*' | cut -d: -f2) \
  || fail "cap/metrics.jsonl has no stop line"
[[ $(cat cap/checkpoints/LATEST) == $(printf 'step_%08d' "$stop_step") ]] || fail "cap/checkpoints/LATEST is not the stop step $stop_step"
"$OPDLM" ckpt verify cap >/dev/null || fail "cap: the checkpoint at the cap does not verify"
echo "2. job $job: cap 1 (mpirun): FAILED 75:0 after 1 requeue, checkpoint step $stop_step verifies, $(($(date +%s) - t)) s" >>summary.txt

# ---- 3. chained mode: slurm/submit.sh --chain 3 (no requeue) ------------------------------------------
t=$(date +%s)
mapfile -t links < <("$REPO/slurm/submit.sh" --chain 3 "${SB[@]:2}" --job-name=chain -- "${OPD[@]}" \
  --optim.rl_steps=200 --run.out_dir=chain)
((${#links[@]} == 3)) || fail "slurm/submit.sh --chain 3 printed ${#links[@]} job ids: ${links[*]}"
waitfor 120 "chain link ${links[0]}: RL step 10" step_at_least chain 10
scancel --signal=USR1 --batch "${links[0]}"
waitfor 180 "chain link ${links[2]} to end" gone "${links[2]}"
[[ $(field "${links[0]}" JobState) == FAILED && $(field "${links[0]}" ExitCode) == 75:0 && $(field "${links[0]}" Restarts) == 0 ]] \
  || fail "chain link 1 (${links[0]}) ended $(field "${links[0]}" JobState) $(field "${links[0]}" ExitCode), expected FAILED 75:0 without requeue"
for k in 1 2; do
  [[ $(field "${links[k]}" JobState) == COMPLETED ]] || fail "chain link $((k + 1)) (${links[k]}) ended $(field "${links[k]}" JobState)"
done
log=slurm-chain-${links[0]}.log
[[ -f $log ]] || fail "no shared chain log $log"
grep -q "requeue is off (OPDLM_REQUEUE=0): the next chained job resumes" "$log" || fail "$log: link 1 did not stop for the chain"
grep -q "the run already finished (chain/DONE" "$log" || fail "$log: link 3 did not exit at once on chain/DONE"
same_as_ref chain
echo "3. chain ${links[*]}: FAILED 75 (USR1), COMPLETED (resumed, bitwise), COMPLETED (DONE), $(($(date +%s) - t)) s" >>summary.txt

# ---- 4. the jobs/ recipes under sbatch (sbatch runs a copy in the spool folder) -----------------------
t=$(date +%s)
# Submitted from the repository root as a user would; polled every 0.1 s (sbatch --wait polls slowly).
from_repo() { (cd "$REPO" && "$@"); }
job=$(OPDLM=/nonexistent/opdlm from_repo sbatch --parsable -n 1 --output="$W/qs.log" jobs/quickstart.sh)
waitfor 120 "job $job (jobs/quickstart.sh) to end" gone "$job"
[[ $(field "$job" ExitCode) == 1:0 ]] || fail "sbatch jobs/quickstart.sh with OPDLM=/nonexistent/opdlm: exit $(field "$job" ExitCode), expected 1:0"
grep -q "opdlm binary not found at /nonexistent/opdlm" qs.log || fail "qs.log: jobs/quickstart.sh did not reach jobs/lib/common.sh under sbatch"
# The Qwen3 recipe for real: the tiny teacher exported as a Hugging Face Qwen3 directory, imported
# and converted at TP 2 under sbatch (the batch shell becomes slurm/opdlm.sbatch after the import).
"$OPDLM" export-hf --model teacher/model.h5 --out hf >/dev/null || fail "opdlm export-hf of the tiny teacher failed"
cp tok.json hf/tokenizer.json
job=$(from_repo sbatch --parsable "${SB[@]:2}" --output="$W/q3.log" jobs/qwen3_convert.sh --hf "$W/hf" \
  --prompts "$W/arith/conversion.jsonl" --run "$W/q3" --tp 2 -- --optim.rl_steps=3 --data.prompts_per_step=8 \
  --rollout.max_new_tokens=8 --rollout.ramp_start_tokens=0 --rollout.ramp_steps=0)
waitfor 180 "job $job (jobs/qwen3_convert.sh) to end" gone "$job"
[[ $(field "$job" JobState) == COMPLETED ]] || fail "sbatch jobs/qwen3_convert.sh: $(field "$job" JobState) $(field "$job" ExitCode): $(tail -3 q3.log)"
[[ -f q3/opd/DONE && -f q3/opd/model.h5 ]] || fail "jobs/qwen3_convert.sh under sbatch: no q3/opd/DONE or model.h5"
(cd q3 && sha256sum -c --quiet teacher.h5.sha256) || fail "q3/teacher.h5 does not match q3/teacher.h5.sha256"
grep -q "teacher $W/q3/teacher.h5 sha256 [0-9a-f]* matches $W/q3/teacher.h5.sha256" q3.log \
  || fail "q3.log: the preflight did not check the imported teacher against its .sha256"
grep -q "TP 2 x DP 1" q3.log || fail "q3.log: the conversion did not run at TP 2 x DP 1"
echo "4. jobs/quickstart.sh (finds the repo), jobs/qwen3_convert.sh (import + TP 2 conversion) under sbatch: $(($(date +%s) - t)) s" >>summary.txt

cat summary.txt
echo "slurm_requeue: passed in $(($(date +%s) - T_TEST)) s (teacher + reference $((T_REF - T_TEST)) s)"
