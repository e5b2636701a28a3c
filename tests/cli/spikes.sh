#!/usr/bin/env bash
# spikes.sh OPDLM [MPIEXEC...] -- loss and gradient-norm spikes and the roll-back policy (issue 7):
# a gradient-norm spike injected on one rank at RL step 8 (OPDLM_INJECT_SPIKE, the rank's gradient
# x 1e4) is detected against the running window on every rank and handled by numerics.on_spike:
#  - warn logs it and applies the (clipped) update; skip drops exactly that update; abort names the key;
#  - rollback reloads the last committed checkpoint (RL step 6), replays step 7 bit for bit, skips the
#    batch of step 8 and goes on: every RL step appears once in the log, steps 1-7 equal a clean run's,
#    and DP 2 and TP 2 runs with the spike on rank 1 make the same decisions;
#  - a NaN with numerics.on_nonfinite = rollback rolls back too; numerics.max_rollbacks = 0 aborts;
#    with no checkpoint yet, rollback falls back to skip. ~20 s.
set -euo pipefail
source "$(dirname "$(readlink -f "$0")")/lib/cli_test.sh" spikes "$@"

make_tiny_teacher "$OPDLM"
OPD=(train --mode opd --model.teacher=teacher/model.h5 --model.tokenizer=tok.json
  --data.prompts=arith/conversion.jsonl --data.prompts_per_step=10 --data.rows_per_update=8
  --rollout.max_new_tokens=8 --optim.lr=1e-3 --optim.warmup_steps=1 --run.seed=3 --optim.rl_steps=12
  --numerics.spike_window=6)
run() {  # run NAME [env/launcher/flags...]: expects success
  local name=$1
  shift
  env "$@" --run.out_dir=$name ${CKPT---checkpoint.every=3} >$name.json 2>$name.log || fail "$name: $(tail -3 $name.log)"
}
run clean "$OPDLM" "${OPD[@]}"
grep -q '"event":"spike"' clean/metrics.jsonl && fail "the clean run has a spike: the test's window is too tight"

for pol in warn skip rollback; do
  run $pol OPDLM_INJECT_SPIKE=0:8 "$OPDLM" "${OPD[@]}" --numerics.on_spike=$pol
done
run rollback_dp2 OPDLM_INJECT_SPIKE=1:8 "${MPIEXEC[@]}" -n 2 "$OPDLM" "${OPD[@]}" --numerics.on_spike=rollback
run rollback_tp2 OPDLM_INJECT_SPIKE=1:8 "${MPIEXEC[@]}" -n 2 "$OPDLM" "${OPD[@]}" --numerics.on_spike=rollback --parallel.tp=2
run nan_rollback OPDLM_INJECT_NAN=0:8 "$OPDLM" "${OPD[@]}" --numerics.on_nonfinite=rollback
CKPT= run no_ckpt OPDLM_INJECT_SPIKE=0:8 "$OPDLM" "${OPD[@]}" --numerics.on_spike=rollback
if OPDLM_INJECT_SPIKE=0:8 "$OPDLM" "${OPD[@]}" --numerics.on_spike=abort --run.out_dir=abort >abort.json 2>abort.log; then
  fail "abort: the run went on after a spike"
fi
grep -q "grad_norm spike .* at RL step 8.*field numerics.on_spike" abort.log || fail "abort: $(tail -2 abort.log)"
if OPDLM_INJECT_SPIKE=0:8 "$OPDLM" "${OPD[@]}" --numerics.on_spike=rollback --numerics.max_rollbacks=0 \
  --checkpoint.every=3 --run.out_dir=capped >capped.json 2>capped.log; then fail "max_rollbacks = 0 rolled back"; fi
grep -q "field numerics.max_rollbacks" capped.log || fail "capped: $(tail -2 capped.log)"
for bad in "--numerics.on_spike=retry" "--numerics.spike_sigma=0" "--numerics.spike_min_ratio=0.5" \
  "--numerics.spike_window=-1" "--numerics.on_nonfinite=retry"; do
  if "$OPDLM" "${OPD[@]}" "$bad" --run.out_dir=bad >/dev/null 2>bad.err; then fail "$bad accepted"; fi
  key=${bad%%=*}
  grep -q -- "${key#--}" bad.err || fail "$bad: the error does not name the key: $(cat bad.err)"
  [[ ! -e bad ]] || fail "$bad: the refused run created its output directory"
done

/usr/bin/python3 - "$OPDLM" <<'PY'
import json, subprocess, sys
from metrics import lines

def events(run, ev):
    return [j for j in map(json.loads, open(f"{run}/metrics.jsonl")) if j["event"] == ev]
def steps(run):
    return {j["rl_step"]: j for j in events(run, "step")}
clean = steps("clean")

# warn: logged with the window's figures, the update applied (as many optimizer steps as the clean run).
sp = events("warn", "spike")
assert len(sp) == 1 and sp[0]["rl_step"] == 8 and sp[0]["metric"] == "grad_norm" and sp[0]["policy"] == "warn", sp
assert sp[0]["value"] > sp[0]["threshold"] > sp[0]["window_mean"], sp
assert steps("warn")[8]["optimizer_steps"] == clean[8]["optimizer_steps"]
# skip: exactly that update dropped.
sp = events("skip", "spike")
assert len(sp) == 1 and sp[0]["policy"] == "skip" and sp[0]["skipped_updates"] == 1, sp
assert steps("skip")[8]["optimizer_steps"] == clean[8]["optimizer_steps"] - 1

# rollback: back to the checkpoint of RL step 6, step 7 replayed, step 8's batch skipped.
for run in ("rollback", "rollback_dp2", "rollback_tp2", "nan_rollback"):
    rb = events(run, "rollback")
    assert len(rb) == 1 and rb[0]["rl_step"] == 8 and rb[0]["to_rl_step"] == 6 and rb[0]["skip_batches"] == [8], (run, rb)
    cause = rb[0]["cause"]
    assert cause["event"] == ("nonfinite" if run == "nan_rollback" else "spike") and cause["rl_step"] == 8, (run, cause)
    st = events(run, "step")
    assert [j["rl_step"] for j in st] == list(range(1, 13)), f"{run}: RL steps {[j['rl_step'] for j in st]}"
    got = steps(run)
    assert got[8].get("skipped_batch") is True and got[8]["rows"] == 0, (run, got[8])
    assert got[8]["optimizer_steps"] == got[7]["optimizer_steps"], (run, got[8])
    assert [e["rl_step"] for e in events(run, "skip_batch")] == [8], run
    assert events(run, "end"), f"{run}: did not finish"
# One process: the steps before the spike, the replayed step 7 included, are the clean run's bit for bit.
ref = [j for j in lines("clean") if j["event"] == "step" and j["rl_step"] <= 7]
got = [j for j in lines("rollback") if j["event"] == "step" and j["rl_step"] <= 7]
assert ref == got, "rollback: RL steps 1-7 differ from the clean run"
assert steps("rollback")[12]["optimizer_steps"] == clean[12]["optimizer_steps"] - 2, "step 8 made 2 updates in the clean run"
# DP 2 (bitwise with one process, docs/parallel.md): the same log and the same final checkpoint.
# (The injected value differs: under DP 2 only rank 1's part of the gradient is scaled.)
assert lines("rollback_dp2", ["rollback"]) == lines("rollback", ["rollback"]), "rollback under DP 2 differs from one process"
def ckpt(run):
    out = subprocess.run([sys.argv[1], "ckpt", "inspect", f"{run}/checkpoints/step_00000012"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)
num = ckpt("rollback")["numerics"]
assert num["skip_batches"] == [8] and len(num["grad_norm_window"]) == 6, f"the final checkpoint's numerics: {num}"

# No checkpoint yet: the roll-back falls back to skipping the update, and says so.
sp = events("no_ckpt", "spike")
assert len(sp) == 1 and sp[0]["policy"].startswith("skip (no checkpoint"), sp
assert not events("no_ckpt", "rollback")
PY
echo "spikes: a gradient-norm spike at RL step 8 is warned, skipped, aborted on, or rolled back to step 6 with the batch skipped (1 process, DP 2, TP 2); NaN roll-back; the cap; the fallback"
