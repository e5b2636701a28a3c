#!/usr/bin/env bash
# stitch_real.sh OPDLM -- tools/opdlm_logs.py stitch on a real short training with two injected
# preemptions (issue 9): a 20-RL-step OPD run (checkpoints every 2 steps, probes every 5) is
#  - crashed in the middle of the checkpoint save of RL step 8 (OPDLM_CKPT_FAULT, exit 86, as a rank
#    killed inside its save: the steps after checkpoint 6, 7 and 8, are lost),
#  - resumed (--run.resume=auto), then SIGTERMed once it logs RL step >= 12 (exit 75: a checkpoint, nothing lost),
#  - resumed again and finished.
# From what it saw (the log the crash left, the resume points) the test computes the lost steps, and
# from the raw lines the goodput and checkpoint overhead; `stitch --json` must report the same, the
# merged curve must hold each RL step 1..20 once, and the allocated time must fit inside the processes'
# measured lifetimes. Then summary, rollouts and report must run on the real run. ~10-20 s.
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
source "$HERE/../cli/lib/cli_test.sh" stitch_real "$@"
TOOL=$(readlink -f "$HERE/../../tools/opdlm_logs.py")
PY=/usr/bin/python3

make_tiny_teacher "$OPDLM"
OPD=(train --mode opd --model.teacher=teacher/model.h5 --model.tokenizer=tok.json
  --data.prompts=arith/conversion.jsonl --data.prompts_per_step=10 --data.rows_per_update=8
  --rollout.max_new_tokens=8 --optim.lr=1e-3 --optim.warmup_steps=1 --run.seed=3 --optim.rl_steps=20
  --eval.probe_prompts=arith/eval_heldout.jsonl --eval.probe_limit=4 --eval.probe_every=5
  --checkpoint.every=2 --run.resume=auto --run.out_dir=run)
now() { date +%s.%N; }

# Starts attempt N in the background (its pid in $pid, its start time in tN.start); extra arguments
# are environment assignments for it.
launch() {
  local n=$1
  shift
  now >t$n.start
  ( set +e; env "$@" "$OPDLM" "${OPD[@]}" >>run.out 2>>attempt$n.log; echo $? >rc$n; now >t$n.end ) &
  pid=$!
}
# Waits (<= 60 s) until the log's last complete line is a step line of attempt $1 with an RL step
# satisfying the Python condition $2 on k, then sends signal $3 to the trainer at once.
signal_when() {
  $PY - "$1" "$2" "$3" "$pid" <<'PY'
import json, os, signal, sys, time
attempt, cond, sig, parent = int(sys.argv[1]), sys.argv[2], getattr(signal, sys.argv[3]), int(sys.argv[4])

def trainer():  # the opdlm child of the launching subshell
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
        except (OSError, ValueError):
            continue
        comm, rest = st[st.index("(") + 1:st.rindex(")")], st[st.rindex(")") + 2:].split()
        if p.isdigit() and comm == "opdlm" and int(rest[1]) == parent:
            return int(p)
    sys.exit(f"no opdlm process under {parent}")

t_end = time.time() + 60
while time.time() < t_end:
    try:
        with open("run/metrics.jsonl", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        data = b""
    lines = data.split(b"\n")[:-1]  # complete lines only
    if lines:
        j = json.loads(lines[-1])
        k = j.get("rl_step", -1)
        if j["event"] == "step" and j.get("attempt") == attempt and eval(cond):
            os.kill(trainer(), sig)
            print(k)
            sys.exit(0)
    time.sleep(0.002)
sys.exit(f"attempt {attempt}: no step line with {cond} within 60 s")
PY
}

# ---- attempt 0: dies inside the checkpoint save of RL step 8 (deterministic: no race with the save) ----
launch 0 OPDLM_CKPT_FAULT=0:mid_dataset:8
k0=8
wait
[[ $(cat rc0) == 86 ]] || fail "attempt 0: exit $(cat rc0), expected 86 (the injected crash): $(tail -3 attempt0.log)"
cp run/metrics.jsonl killed.jsonl  # what the dead attempt left
# ---- attempt 1: resume, SIGTERM once RL step >= 12 is logged: exit 75 with a checkpoint ----
launch 1
k1=$(signal_when 1 "k >= 12" SIGTERM) || fail "attempt 1: $(tail -3 attempt1.log)"
wait
[[ $(cat rc1) == 75 ]] || fail "attempt 1: exit $(cat rc1), expected 75: $(tail -3 attempt1.log)"
cp run/metrics.jsonl stopped.jsonl
# ---- attempt 2: resume and finish ----
launch 2
wait
[[ $(cat rc2) == 0 ]] || fail "attempt 2: exit $(cat rc2): $(tail -3 attempt2.log)"
# The progress line (docs/logs.md): throughput of this attempt, tokens per forward, probe KL, ETA.
grep -Eq "opd RL step 20/20 loss .* train tokens [0-9]+ \([0-9]+/s\) tok/fwd [0-9.]+ probe KL [0-9.e-]+ ETA 0s" attempt2.log ||
  fail "no progress line for RL step 20: $(grep 'RL step 20' attempt2.log)"
grep -Eq "opd RL step 3/20 .* ETA [0-9]+s" attempt0.log || fail "no ETA on RL step 3: $(grep 'RL step 3/' attempt0.log)"
echo "attempt 0 crashed saving RL step $k0, attempt 1 SIGTERMed after RL step $k1, attempt 2 finished"

"$PY" "$TOOL" stitch run --json --out merged.jsonl >stitch.json 2>stitch.err || fail "stitch: $(cat stitch.err)"
"$PY" - <<'PY' || fail "stitch's numbers"
import json
L = lambda p: [json.loads(l) for l in open(p)]
run, lost, killed, stopped = L("run/metrics.jsonl"), L("run/metrics.lost.jsonl"), L("killed.jsonl"), L("stopped.jsonl")
st = json.load(open("stitch.json"))
t, at = st["totals"], st["attempts"]
resumes = {j["attempt"]: j["rl_step"] for j in run + lost if j["event"] == "resume"}
# Attempt 0's lost steps: its step lines after the checkpoint attempt 1 resumed from, which must be the
# last checkpoint line it wrote (6: the save of 8 never committed), i.e. RL steps 7 and 8.
last_ckpt0 = max(j["rl_step"] for j in killed if j["event"] == "checkpoint")
assert resumes[1] == last_ckpt0, f"attempt 1 resumed from {resumes[1]}, attempt 0's last checkpoint was {last_ckpt0}"
lost0 = [j for j in killed if j["event"] == "step" and j["rl_step"] > resumes[1]]
stop = [j for j in stopped if j["event"] == "stop"]
assert len(stop) == 1 and resumes[2] == stop[0]["rl_step"], (stop, resumes)
lost1 = [j for j in stopped if j["event"] == "step" and j["attempt"] == 1 and j["rl_step"] > resumes[2]]
assert resumes[1] == 6 and [j["rl_step"] for j in lost0] == [7, 8], (resumes, [j["rl_step"] for j in lost0])
assert [a["status"] for a in at] == ["killed", "stopped (signal)", "finished"], [a["status"] for a in at]
assert [a["lost_steps"] for a in at] == [len(lost0), len(lost1), 0], ([a["lost_steps"] for a in at], len(lost0), len(lost1))
assert abs(at[0]["lost_step_s"] - sum(j["timings"]["step_s"] for j in lost0)) < 1e-9
# Goodput and checkpoint overhead from the raw lines: committed step time over the attempts' spans
# (start/resume line to the last line, in either file); saves = checkpoint lines with "seconds".
steps = [j for j in run if j["event"] == "step"]
assert [j["rl_step"] for j in steps] == list(range(1, 21)), [j["rl_step"] for j in steps]
span = {}
for j in run + lost:
    sp = span.setdefault(j["attempt"], [None, 0.0])
    if j["event"] in ("start", "resume"):
        sp[0] = j["time"]
    sp[1] = max(sp[1], j["time"])
allocated = sum(e - s for s, e in span.values())
committed = sum(j["timings"]["step_s"] for j in steps)
saves = [j for j in run + lost if j["event"] == "checkpoint" and "seconds" in j]
assert abs(t["allocated_s"] - allocated) < 1e-9, (t["allocated_s"], allocated)
assert abs(t["goodput"] - committed / allocated) < 1e-9, (t["goodput"], committed / allocated)
assert t["checkpoint_saves"] == len(saves), (t["checkpoint_saves"], len(saves))
assert abs(t["checkpoint_overhead"] - sum(j["seconds"] for j in saves) / allocated) < 1e-9
assert 0 < t["goodput"] < 1
assert t["duplicate_step_lines_in_log"] == 0 and t["each_step_once"], t  # the trainer cut its log on resume
# Each attempt's logged span lies inside its process's measured lifetime.
for a in at:
    s, e = (float(open(f"t{a['attempt']}.{x}").read()) for x in ("start", "end"))
    assert a["wall_s"] <= e - s, (a, e - s)
merged = [json.loads(l) for l in open("merged.jsonl")]
assert [j["rl_step"] for j in merged if j["event"] == "step"] == list(range(1, 21)), "merged curve"
print(f"stitch: lost {[a['lost_steps'] for a in at]} steps, goodput {t['goodput']:.3f}, "
      f"checkpoint overhead {t['checkpoint_overhead']:.3f}, allocated {allocated:.2f} s")
PY

"$PY" "$TOOL" summary run --json >summary.json || fail "summary"
"$PY" -c "
import json; s = json.load(open('summary.json'))
assert (s['status'], s['rl_steps'], s['attempts'], s['preemptions']) == ('finished', 20, 3, 2), s
assert s['own_state_kl'] is not None and s['train_tokens'] > 0, s" || fail "summary's numbers"
"$PY" "$TOOL" rollouts run >rollouts.txt || fail "rollouts"
grep -q "^per round" rollouts.txt || fail "rollouts: no per-round view"
"$PY" "$TOOL" report run --out report.html >/dev/null || fail "report"
! grep -qE "https?://" report.html || fail "the report references a URL"
echo "stitch_real: two preemptions (a crash inside a save, SIGTERM) of a real run; stitch's lost steps, goodput and merged curve match"
