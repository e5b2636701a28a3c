#!/usr/bin/env bash
# opd_dp.sh OPDLM [MPIEXEC...] -- `opdlm train --mode opd` launched five ways gives the same run:
# one process without mpirun, `mpiexec -n 2` and `mpiexec -n 4` (DP = 2, 4): the sha256 of every
# tensor of model.h5 and every metrics line apart from wall-clock fields are equal; `--parallel.tp=2`
# on 2 and 4 ranks (TP 2, TP 2 x DP 2): every count equal (the same tokens), losses, norms and probe
# KLs within 1e-6 (relative; absolute for values below 1); with --parallel.deterministic_shards=2 one
# process, TP 2, TP 2 x DP 2 and DP 4 bit for bit. Then the launch refusals: DP not a power of two,
# deterministic_shards not a multiple of TP or not dividing the KV heads, TP beyond the KV heads, top-p and rm-ce teacher sampling under TP, the srun singleton trap
# (SLURM_NTASKS != world size) and --mode ar under mpiexec, each a non-zero exit that names the field
# and leaves no output behind. A tiny teacher (2 layers, hidden 32) trained here; ~30 s.
set -euo pipefail
source "$(dirname "$(readlink -f "$0")")/lib/cli_test.sh" opd_dp "$@"

make_tiny_teacher "$OPDLM"

# A 4-RL-step conversion, 10 prompts per step, 8 rows per update, the probe every 2 steps.
OPD=(train --mode opd --model.teacher=teacher/model.h5 --model.tokenizer=tok.json
  --data.prompts=arith/conversion.jsonl --data.prompts_per_step=10 --data.rows_per_update=8
  --rollout.max_new_tokens=8 --optim.rl_steps=4 --optim.lr=1e-3 --optim.warmup_steps=1
  --eval.probe_prompts=arith/eval_heldout.jsonl --eval.probe_limit=6 --eval.probe_every=2 --run.seed=3)
"$OPDLM" "${OPD[@]}" --run.out_dir=one >one.json 2>one.log || fail "one process: $(tail -3 one.log)"
for n in 2 4; do
  "${MPIEXEC[@]}" -n $n "$OPDLM" "${OPD[@]}" --run.out_dir=dp$n >dp$n.json 2>dp$n.log ||
    fail "mpiexec -n $n: $(tail -3 dp$n.log)"
done
# Tensor parallel: TP 2 (2 ranks) and TP 2 x DP 2 (4 ranks).
for n in 2 4; do
  "${MPIEXEC[@]}" -n $n "$OPDLM" "${OPD[@]}" --parallel.tp=2 --run.out_dir=tp2_n$n >tp2_n$n.json 2>tp2_n$n.log ||
    fail "mpiexec -n $n --parallel.tp=2: $(tail -3 tp2_n$n.log)"
done

# One summary line per job (rank 0), and the same run three times.
[[ $(wc -l < dp4.json) == 1 ]] || fail "expected one summary line from 4 ranks, got $(wc -l < dp4.json)"
sums() { h5dump -A "$1" | grep -A10 'ATTRIBUTE "sha256"' | grep -o '"[0-9a-f]\{64\}"'; }
[[ $(sums one/model.h5 | wc -l) -ge 10 ]] || fail "no tensor checksums read from one/model.h5"
for d in dp2 dp4; do
  diff <(sums one/model.h5) <(sums $d/model.h5) >/dev/null || fail "$d/model.h5 differs from the one-process run"
done
/usr/bin/python3 - <<'PY'
import json
from metrics import assert_close, lines
one = lines("one")
assert sum(j["event"] == "step" for j in one) == 4, "expected 4 step lines"
assert sum(j["event"] == "probe" for j in one) == 3, "expected 3 probe lines"
for d, dp in (("dp2", 2), ("dp4", 4)):
    assert lines(d) == one, f"{d}: metrics differ from the one-process run"
    start = json.loads(open(f"{d}/metrics.jsonl").readline())
    assert start["parallel"] == {"tp": 1, "dp": dp, "rows_per_rank": 8 // dp, "deterministic_shards": 0}, start["parallel"]
# TP sums in another order: the same tokens (every count), losses, norms and KLs within 1e-6.
for d, dp in (("tp2_n2", 1), ("tp2_n4", 2)):
    assert_close(one, lines(d), d)
    start = json.loads(open(f"{d}/metrics.jsonl").readline())
    assert start["parallel"] == {"tp": 2, "dp": dp, "rows_per_rank": 8 // dp, "deterministic_shards": 0}, start["parallel"]
PY

# The deterministic-reduction mode (2 virtual shards): one process, TP 2, TP 2 x DP 2 and DP 4 give
# the same bits: every tensor's sha256 and every metrics line (losses and norms included).
"$OPDLM" "${OPD[@]}" --parallel.deterministic_shards=2 --run.out_dir=det_one >det_one.json 2>det_one.log ||
  fail "deterministic, one process: $(tail -3 det_one.log)"
for layout in "2 2" "4 2" "4 1"; do
  read -r n t <<<"$layout"
  "${MPIEXEC[@]}" -n $n "$OPDLM" "${OPD[@]}" --parallel.deterministic_shards=2 --parallel.tp=$t \
    --run.out_dir=det_n${n}_tp$t >det_n${n}_tp$t.json 2>det_n${n}_tp$t.log ||
    fail "deterministic, mpiexec -n $n --parallel.tp=$t: $(tail -3 det_n${n}_tp$t.log)"
  diff <(sums det_one/model.h5) <(sums det_n${n}_tp$t/model.h5) >/dev/null ||
    fail "deterministic mode: det_n${n}_tp$t/model.h5 differs from the one-process run"
done
/usr/bin/python3 - <<'PY'
from metrics import lines
one = lines("det_one")
assert sum(j["event"] == "step" for j in one) == 4 and all(j["loss"] > 0 for j in one if j["event"] == "step")
for d in ("det_n2_tp2", "det_n4_tp2", "det_n4_tp1"):
    assert lines(d) == one, f"{d}: metrics differ from the deterministic one-process run"
PY

# Refusals: non-zero exit, the field named, no output folder.
expect_refusal() {  # expect_refusal NAME PATTERN command...
  local name=$1 pattern=$2
  shift 2
  if "$@" >"$name.out" 2>"$name.err"; then fail "$name: exited 0"; fi
  grep -q -- "$pattern" "$name.err" || fail "$name: '$pattern' not in: $(head -c 600 "$name.err")"
  [[ ! -e "$name" ]] || fail "$name: created its output folder"
}
expect_refusal dp3 "parallel.tp" "${MPIEXEC[@]}" -n 3 "$OPDLM" "${OPD[@]}" --run.out_dir=dp3
grep -q "power of two" dp3.err || fail "dp3: the reason is not given"
expect_refusal det3 "parallel.deterministic_shards" "${MPIEXEC[@]}" -n 2 "$OPDLM" "${OPD[@]}" --parallel.tp=2 \
  --parallel.deterministic_shards=3 --run.out_dir=det3
expect_refusal det4 "num_key_value_heads = 2" "$OPDLM" "${OPD[@]}" --parallel.deterministic_shards=4 --run.out_dir=det4
expect_refusal tp4 "num_key_value_heads" "${MPIEXEC[@]}" -n 4 "$OPDLM" "${OPD[@]}" \
  --parallel.tp=4 --run.out_dir=tp4
expect_refusal topp "rollout.top_p" "${MPIEXEC[@]}" -n 2 "$OPDLM" "${OPD[@]}" --parallel.tp=2 --rollout.top_p=0.9 \
  --run.out_dir=topp
expect_refusal rmce_teacher "loss.ce_source = teacher" "${MPIEXEC[@]}" -n 2 "$OPDLM" train --mode rm-ce \
  --model.teacher=teacher/model.h5 --model.tokenizer=tok.json --data.prompts=arith/conversion.jsonl \
  --loss.ce_source=teacher --parallel.tp=2 --run.out_dir=rmce_teacher
SLURM_NTASKS=4 expect_refusal slurm "SLURM_NTASKS" "$OPDLM" "${OPD[@]}" --run.out_dir=slurm
expect_refusal ar_np2 "OMPI_COMM_WORLD_SIZE" "${MPIEXEC[@]}" -n 2 "$OPDLM" train --mode ar --model.config=config.json \
  --model.tokenizer=tok.json --data.train=train.bin --optim.max_steps=2 --run.out_dir=ar_np2
echo "opd_dp: one process = DP 2 = DP 4 bit for bit, = TP 2 and TP 2 x DP 2 within 1e-6; deterministic mode:" \
  "one process = TP 2 = TP 2 x DP 2 = DP 4 bit for bit; 8 refusals"
