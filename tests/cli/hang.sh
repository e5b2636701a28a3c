#!/usr/bin/env bash
# hang.sh OPDLM [MPIEXEC...] -- the hang watchdog (issue 7): under mpiexec -n 4 (TP 2 x DP 2) rank 1
# stops talking at RL step 3 (OPDLM_INJECT_HANG); the other ranks' collectives stay pending, their
# watchdogs fire past max(watchdog.floor, factor x the longest step), every rank writes its flight
# record, and the job ends with exit code 88 within the bound + grace + 10 s of the last logged
# step; `opdlm flight RUN` names rank 1 and the collectives it never arrived at; the metrics log
# has a `hang` line. A run without a hang leaves no record. ~20 s.
set -euo pipefail
source "$(dirname "$(readlink -f "$0")")/lib/cli_test.sh" hang "$@"

make_tiny_teacher "$OPDLM"
OPD=(train --mode opd --model.teacher=teacher/model.h5 --model.tokenizer=tok.json
  --data.prompts=arith/conversion.jsonl --data.prompts_per_step=10 --data.rows_per_update=8
  --rollout.max_new_tokens=8 --optim.lr=1e-3 --optim.warmup_steps=1 --run.seed=3 --optim.rl_steps=6
  --parallel.tp=2 --watchdog.floor=2 --watchdog.factor=3 --watchdog.grace=1)
FLOOR=2 GRACE=1

# No hang: the watchdog stays quiet and writes nothing.
"${MPIEXEC[@]}" -n 4 "$OPDLM" "${OPD[@]}" --run.out_dir=calm >calm.json 2>calm.log || fail "calm: $(tail -3 calm.log)"
[[ -z $(find calm/flight -name 'rank*.json' 2>/dev/null) ]] || fail "a run without a hang left flight records"

# Rank 1 goes silent when RL step 2 is logged; the job must end within floor + grace + 10 s of that
# (the steps take ~0.03 s here, so the bound is the floor; 10 s for the 0.5 s polls and mpiexec's teardown).
( set +e; OPDLM_INJECT_HANG=1:3 timeout 120 "${MPIEXEC[@]}" -n 4 "$OPDLM" "${OPD[@]}" --run.out_dir=hung \
    >hung.json 2>hung.log; echo $? >hung.rc ) &
for _ in $(seq 600); do
  grep -q '"event":"step".*"rl_step":2\b' hung/metrics.jsonl 2>/dev/null && break
  sleep 0.05
done
silent=$(date +%s.%N)
wait
took=$(echo "$(date +%s.%N) - $silent" | bc)
rc=$(cat hung.rc)
[[ $rc == 88 ]] || fail "exit $rc, expected 88 (the watchdog's code): $(grep -i 'hang\|error' hung.log | tail -5)"
(($(echo "$took < $FLOOR + $GRACE + 10" | bc))) || fail "the hung job took $took s to end (bound $FLOOR + $GRACE + 10)"
/usr/bin/python3 - <<'PY'
import json, glob
m = [json.loads(l) for l in open("hung/metrics.jsonl")]
steps = [j["rl_step"] for j in m if j["event"] == "step"]
assert steps == [1, 2], f"RL steps logged: {steps}"
hang = [j for j in m if j["event"] == "hang"]
assert len(hang) == 1 and hang[0]["world_rank"] == 0 and "pending" in hang[0]["reason"], hang
records = sorted(glob.glob("hung/flight/attempt_*/rank*.json"))
assert len(records) == 4, f"flight records: {records}"
for f in records:
    j = json.load(open(f))
    assert j["reason"] and set(j["comms"]) == {"world", "tp", "dp"}, f
PY
"$OPDLM" flight hung >flight.txt || fail "opdlm flight: $(cat flight.txt)"
grep -q "^culprit: rank 1 " flight.txt || fail "the merge does not name rank 1: $(cat flight.txt)"
grep -q "rank 1 never arrived at tp #[0-9]*: its newest tp call was #[0-9]*; it is in no collective" flight.txt ||
  fail "the merge does not say what rank 1 missed: $(cat flight.txt)"
"$OPDLM" flight hung --json >flight.json
/usr/bin/python3 -c "
import json; d = json.load(open('flight.json'))
assert d['culprits'] == [1], d['culprits']
tp = [p for p in d['pending'] if p['comm'] == 'tp']
assert len(tp) == 1 and tp[0]['members'] == [0, 1] and tp[0]['waiting'] == [0] and tp[0]['absent'] == [1], tp
"
if "$OPDLM" flight calm >/dev/null 2>bad.err; then fail "opdlm flight accepted a run without records"; fi
grep -q "no flight records" bad.err || fail "opdlm flight: $(cat bad.err)"
echo "hang: rank 1 silent at RL step 3 -> exit 88 after $took s, 4 flight records, opdlm flight names rank 1 and $(grep -o "tp #[0-9]*" flight.txt | head -1)"
