#!/usr/bin/env bash
# numerics.sh OPDLM [MPIEXEC...] -- non-finite gradients (issue 7, part): a NaN injected on one rank
# at one RL step (OPDLM_INJECT_NAN, into a TP-sharded tensor) under TP 2 and under DP 2 is named in the
# log with its rank, tensor and RL step; numerics.on_nonfinite = abort ends the run with an error
# naming the key, skip drops exactly that update on every rank (a `nonfinite` metrics line: RL step 3
# makes one optimizer step fewer than in a clean run) and the run goes on. ~15 s.
set -euo pipefail
source "$(dirname "$(readlink -f "$0")")/lib/cli_test.sh" numerics "$@"

make_tiny_teacher "$OPDLM"
OPD=(train --mode opd --model.teacher=teacher/model.h5 --model.tokenizer=tok.json
  --data.prompts=arith/conversion.jsonl --data.prompts_per_step=10 --data.rows_per_update=8
  --rollout.max_new_tokens=8 --optim.lr=1e-3 --optim.warmup_steps=1 --run.seed=3 --optim.rl_steps=5)
"$OPDLM" "${OPD[@]}" --run.out_dir=clean >clean.json 2>clean.log || fail "clean run: $(tail -3 clean.log)"

for layout in "tp 2" "dp 2"; do
  read -r kind n <<<"$layout"
  extra=()
  [[ $kind == tp ]] && extra=(--parallel.tp=2)
  # abort (the default): an error naming the key; the log names rank 1, the tensor and the step.
  if OPDLM_INJECT_NAN=1:3 "${MPIEXEC[@]}" -n $n "$OPDLM" "${OPD[@]}" "${extra[@]}" --run.out_dir=abort_$kind \
    >abort_$kind.json 2>abort_$kind.log; then fail "$kind: a NaN gradient did not stop the run"; fi
  grep -q "non-finite gradient on rank 1 .*at RL step 3.*model.layers.0.self_attn.q_proj.weight\[0\] = nan" abort_$kind.log ||
    fail "$kind: the log does not name rank 1, RL step 3 and the tensor: $(grep -i finite abort_$kind.log | head -3)"
  grep -q "numerics.on_nonfinite" abort_$kind.log || fail "$kind: the error does not name numerics.on_nonfinite"
  # skip: that one update is dropped on every rank; the run goes on.
  OPDLM_INJECT_NAN=1:3 "${MPIEXEC[@]}" -n $n "$OPDLM" "${OPD[@]}" "${extra[@]}" --numerics.on_nonfinite=skip \
    --run.out_dir=skip_$kind >skip_$kind.json 2>skip_$kind.log || fail "$kind: skip: $(tail -3 skip_$kind.log)"
  /usr/bin/python3 - skip_$kind <<'PY'
import json, sys
d = sys.argv[1]
ev = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"nonfinite"' in l]
assert len(ev) == 1 and ev[0]["rl_step"] == 3 and ev[0]["what"] == "gradient norm" and ev[0]["policy"] == "skip", ev
# Up to RL step 3 the weights, rollouts and rows are the clean run's: step 3 makes one update fewer.
def opt_steps(run):
    return {j["rl_step"]: j["optimizer_steps"] for j in map(json.loads, open(f"{run}/metrics.jsonl")) if j["event"] == "step"}
a, b = opt_steps("clean"), opt_steps(d)
assert b[2] == a[2] and b[3] == a[3] - 1, f"{d}: optimizer steps per RL step {b}, the clean run {a}"
assert len(b) == 5, f"{d}: the run did not go on to RL step 5"
PY
done
if "$OPDLM" "${OPD[@]}" --numerics.on_nonfinite=retry --run.out_dir=bad >/dev/null 2>bad.err; then fail "retry accepted"; fi
grep -q "numerics.on_nonfinite" bad.err || fail "bad policy: $(cat bad.err)"
echo "numerics: an injected NaN is named (rank 1, tensor, RL step 3) under TP 2 and DP 2; abort stops, skip drops one update"
