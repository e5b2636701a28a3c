#!/usr/bin/env bash
# kill_matrix.sh OPDLM [MPIEXEC...] -- kill-anywhere resume (issue 7): layouts (TP, DP) = (1, 2) and
# (2, 2) run a 40-RL-step OPD conversion with a checkpoint after every step under `--run.resume=auto`;
# six starts are each SIGKILLed (one rank, chosen by a seeded RNG) a seeded 0-250 ms after they
# resume training, so deaths land in rollouts, updates, metrics writes and checkpoint saves; a seventh
# start finishes the run. Then, against an uninterrupted run of the same layout: model.h5 and the final
# checkpoint (parameters, AdamW moments, RNG seed and step, data cursor, counters) are bitwise equal,
# and the stitched metrics log holds every RL step exactly once. ~1-2 min.
set -euo pipefail
source "$(dirname "$(readlink -f "$0")")/lib/cli_test.sh" kill_matrix "$@"

make_tiny_teacher "$OPDLM"
OPD=(train --mode opd --model.teacher=teacher/model.h5 --model.tokenizer=tok.json
  --data.prompts=arith/conversion.jsonl --data.prompts_per_step=16 --data.rows_per_update=8
  --rollout.max_new_tokens=12 --optim.rl_steps=40 --optim.lr=1e-3 --optim.warmup_steps=1 --run.seed=5
  --eval.probe_prompts=arith/eval_heldout.jsonl --eval.probe_limit=4 --eval.probe_every=4
  --checkpoint.every=1 --checkpoint.keep=2 --run.resume=auto)
sums() { h5dump -A "$1" | grep -A10 'ATTRIBUTE "sha256"' | grep -o '"[0-9a-f]\{64\}"'; }
xxhs() { h5dump -A "$1" | grep -A12 'ATTRIBUTE "xxh3_64"' | grep -o '"[0-9a-f]\{16\}"'; }
ranks_of() { for p in $(pgrep -f "run.out_dir=$1( |$)"); do [[ $(cat /proc/$p/comm 2>/dev/null) == opdlm ]] && echo $p; done; }
count_lines() { if [[ -f $1 ]]; then wc -l <"$1"; else echo 0; fi; }
RANDOM=20261127  # the seeded kill schedule

for layout in "2 1" "4 2"; do
  read -r n tp <<<"$layout"
  name=np${n}_tp$tp
  "${MPIEXEC[@]}" -n $n "$OPDLM" "${OPD[@]}" --parallel.tp=$tp --run.out_dir=${name}_straight >/dev/null \
    2>${name}_straight.log || fail "$name: the uninterrupted run failed: $(tail -3 ${name}_straight.log)"
  # Six starts each SIGKILLed after a seeded delay, then one left to finish.
  kills=0
  for attempt in 1 2 3 4 5 6 7; do
    ( set +e; "${MPIEXEC[@]}" -n $n "$OPDLM" "${OPD[@]}" --parallel.tp=$tp --run.out_dir=$name >>$name.out \
        2>>$name.log; echo $? >$name.rc ) &
    if ((attempt < 7)); then
      # Once this start has logged a line past its resume point, a seeded delay of 0-250 ms (about
      # 0-7 RL steps with their checkpoints), so the death lands inside training, not in start-up.
      before=$(count_lines $name/metrics.jsonl)
      for _ in $(seq 400); do
        (($(count_lines $name/metrics.jsonl) > before + 1)) && break
        sleep 0.025
      done
      sleep "$(echo "scale=3; ($RANDOM % 250) / 1000" | bc)"
      victims=($(ranks_of $name))
      if ((${#victims[@]} > 0)); then
        kill -KILL "${victims[$((RANDOM % ${#victims[@]}))]}" 2>/dev/null && kills=$((kills + 1))
      fi
    fi
    wait
  done
  [[ $(cat $name.rc) == 0 ]] || fail "$name: the last start failed: $(tail -3 $name.log)"
  ((kills >= 4)) || fail "$name: only $kills of 6 kills landed (the runs ended first)"
  grep -c '"event":"resume"' $name/metrics.jsonl >/dev/null || fail "$name: no resume in the log"
  diff <(sums ${name}_straight/model.h5) <(sums $name/model.h5) >/dev/null || fail "$name: model.h5 differs"
  diff <(xxhs ${name}_straight/checkpoints/step_00000040/shard_tp0.h5) <(xxhs $name/checkpoints/step_00000040/shard_tp0.h5) \
    >/dev/null || fail "$name: the final checkpoint's parameters or AdamW moments differ"
  /usr/bin/python3 - "$name" <<'PY'
import json, subprocess, sys
from metrics import lines
name = sys.argv[1]
a, b = lines(f"{name}_straight", ("checkpoint", "resume")), lines(name, ("checkpoint", "resume"))
steps = [j["rl_step"] for j in b if j["event"] == "step"]
assert steps == list(range(1, 41)), f"{name}: RL steps in the stitched log: {steps}"
assert a == b, f"{name}: the stitched metrics differ from the uninterrupted run's"
# Attempts: numbered in order on every line; the work a death lost is kept in metrics.lost.jsonl,
# tagged with the attempt that did it (docs/logs.md).
att = [json.loads(l)["attempt"] for l in open(f"{name}/metrics.jsonl")]
assert att == sorted(att) and att[-1] >= 1, f"{name}: attempts {att}"
try:
    lost = [json.loads(l) for l in open(f"{name}/metrics.lost.jsonl")]
except FileNotFoundError:
    lost = []
assert all(j["lost_by"] == "restart" and j["lost_in_attempt"] < att[-1] for j in lost), f"{name}: lost lines {lost[:3]}"
PY
  for run in ${name}_straight $name; do "$OPDLM" ckpt inspect $run/checkpoints/step_00000040 >$run.inspect; done
  /usr/bin/python3 - "$name" <<'PY'
import json, sys
name = sys.argv[1]
a, b = (json.load(open(f"{r}.inspect")) for r in (f"{name}_straight", name))
for k in ("rng", "data_cursor", "optimizer_steps", "train_tokens", "lr_next", "rollouts"):
    assert a[k] == b[k], f"{name}: {k} {b[k]} != {a[k]}"
PY
  echo "$name: $kills kills, resumed $(grep -c '"event":"resume"' $name/metrics.jsonl) times; bitwise equal to the uninterrupted run" >>summary.txt
done
cat summary.txt
echo "kill_matrix: layouts (1,2) and (2,2) killed at random moments resume to the uninterrupted run bit for bit"
