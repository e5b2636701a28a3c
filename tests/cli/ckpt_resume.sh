#!/usr/bin/env bash
# ckpt_resume.sh OPDLM [MPIEXEC...] -- crash-safe checkpoints and resume of `opdlm train` (issue 6).
# A 4-RL-step OPD run with a checkpoint after every step is the reference. Then:
#  - a rank dies (OPDLM_CKPT_FAULT) at each of the six phases of the step-3 save; `--run.resume=auto`
#    restarts from the newest committed checkpoint (step 2, or step 3 when only LATEST was left
#    behind) and ends bit for bit like the reference: every tensor's sha256 of model.h5, every
#    metrics line but wall-clock fields, and every dataset checksum of the final checkpoint (parameters
#    and AdamW moments);
#  - a resume on other layouts: DP 2 and DP 4 bit for bit; after a TP 2 rank dies mid-dataset, a
#    resume at TP 1 x DP 2 gives the same counts and losses within 1e-6 (relative; absolute below 1);
#  - a flipped byte in a committed checkpoint: `opdlm ckpt verify` exits 1 naming the dataset, an
#    explicit --run.resume of it is refused without touching the run's files, and `auto` falls back
#    to the previous checkpoint saying why; a truncated file is named with its size; a changed
#    teacher is refused; bad checkpoint/stop keys are refused naming the key. A tiny teacher (2 layers, hidden 32) is trained here; ~40 s.
set -euo pipefail
source "$(dirname "$(readlink -f "$0")")/lib/cli_test.sh" ckpt_resume "$@"

make_tiny_teacher "$OPDLM"

OPD=(train --mode opd --model.teacher=teacher/model.h5 --model.tokenizer=tok.json
  --data.prompts=arith/conversion.jsonl --data.prompts_per_step=10 --data.rows_per_update=8
  --rollout.max_new_tokens=8 --optim.rl_steps=4 --optim.lr=1e-3 --optim.warmup_steps=1
  --eval.probe_prompts=arith/eval_heldout.jsonl --eval.probe_limit=6 --eval.probe_every=2 --run.seed=3
  --checkpoint.every=1 --checkpoint.keep=3)
"$OPDLM" "${OPD[@]}" --run.out_dir=ref >ref.json 2>ref.log || fail "reference run: $(tail -3 ref.log)"
[[ $(cat ref/checkpoints/LATEST) == step_00000004 ]] || fail "LATEST is $(cat ref/checkpoints/LATEST), expected step_00000004"
[[ $(ls -d ref/checkpoints/step_* | wc -l) == 3 ]] || fail "checkpoint.keep=3 kept $(ls -d ref/checkpoints/step_* | wc -l)"
h5ls -r ref/checkpoints/step_00000004/shard_tp0.h5 >h5ls.out || fail "h5ls cannot read the shard file"
grep -q "adam_v/model.norm.weight" h5ls.out || fail "h5ls does not list the AdamW moments"

sums() { h5dump -A "$1" | grep -A10 'ATTRIBUTE "sha256"' | grep -o '"[0-9a-f]\{64\}"'; }
# Every dataset's XXH3-64 attribute, in h5dump's order (the parameters and AdamW moments of a checkpoint).
xxhs() { h5dump -A "$1" | grep -A12 'ATTRIBUTE "xxh3_64"' | grep -o '"[0-9a-f]\{16\}"'; }
[[ $(xxhs ref/checkpoints/step_00000004/shard_tp0.h5 | wc -l) -ge 30 ]] || fail "no dataset checksums read"
compare() {  # compare DIR bitwise|close: DIR's run against the reference
  local d=$1 how=$2
  if [[ $how == bitwise ]]; then
    diff <(sums ref/model.h5) <(sums "$d/model.h5") >/dev/null || fail "$d/model.h5 differs from the reference"
    diff <(xxhs ref/checkpoints/step_00000004/shard_tp0.h5) <(xxhs "$d/checkpoints/step_00000004/shard_tp0.h5") \
      >/dev/null || fail "$d: the final checkpoint's parameters or AdamW moments differ from the reference"
  fi
  /usr/bin/python3 - "$d" "$how" <<'PY'
import sys
from metrics import assert_close, lines
d, how = sys.argv[1], sys.argv[2]
ref, got = lines("ref", skip_events=("resume",)), lines(d, skip_events=("resume",))
assert sum(j["event"] == "step" for j in ref) == 4 and sum(j["event"] == "checkpoint" for j in ref) == 4
if how == "close":
    assert_close(ref, got, d)
else:
    assert ref == got, f"{d}: metrics differ from the reference"
PY
}
resumed_from() { grep -o 'resumed from [^ ]*' "$1" | sed 's/.*checkpoints\///'; }

# A rank dies at each phase of the step-3 save; the resume continues from the newest committed one.
for phase in before_data mid_dataset before_fsync before_manifest before_rename before_latest; do
  set +e
  OPDLM_CKPT_FAULT=0:$phase:3 "$OPDLM" "${OPD[@]}" --run.out_dir=$phase >$phase.json 2>$phase.crash.log
  rc=$?
  set -e
  [[ $rc == 86 ]] || fail "$phase: exit $rc, expected the injected crash (86): $(tail -2 $phase.crash.log)"
  [[ $(cat $phase/checkpoints/LATEST) == step_00000002 ]] || fail "$phase: LATEST moved to $(cat $phase/checkpoints/LATEST)"
  want=step_00000002
  [[ $phase == before_latest ]] && want=step_00000003  # renamed into place: committed, only LATEST is behind
  "$OPDLM" "${OPD[@]}" --run.out_dir=$phase --run.resume=auto >>$phase.json 2>$phase.log ||
    fail "$phase: resume failed: $(tail -3 $phase.log)"
  [[ $(resumed_from $phase.log) == "$want" ]] || fail "$phase: resumed from '$(resumed_from $phase.log)', expected $want"
  compare $phase bitwise
done
ls -a before_data/checkpoints >tmpdirs.out
grep -q '^\.tmp_' tmpdirs.out && fail "a dead save's temporary directory was not cleaned up"

# Other layouts: a one-process crash resumed at DP 2 and DP 4 (bitwise), and a TP 2 run whose rank 1
# dies mid-dataset resumed at TP 1 x DP 2 (TP changed: within 1e-6).
for n in 2 4; do
  rm -rf dp$n && mkdir dp$n
  set +e
  OPDLM_CKPT_FAULT=0:before_data:3 "$OPDLM" "${OPD[@]}" --run.out_dir=dp$n >/dev/null 2>dp$n.crash.log
  set -e
  "${MPIEXEC[@]}" -n $n "$OPDLM" "${OPD[@]}" --run.out_dir=dp$n --run.resume=auto >dp$n.json 2>dp$n.log ||
    fail "resume at DP $n: $(tail -3 dp$n.log)"
  [[ $(resumed_from dp$n.log) == step_00000002 ]] || fail "DP $n resumed from '$(resumed_from dp$n.log)'"
  compare dp$n bitwise
done
set +e
OPDLM_CKPT_FAULT=1:mid_dataset:3 "${MPIEXEC[@]}" -n 2 "$OPDLM" "${OPD[@]}" --parallel.tp=2 --run.out_dir=tp2 \
  >/dev/null 2>tp2.crash.log
rc=$?
set -e
[[ $rc != 0 ]] || fail "the TP 2 run survived its injected crash"
[[ -f tp2/checkpoints/step_00000002/shard_tp1.h5 ]] || fail "the TP 2 checkpoint has no shard of TP rank 1"
"${MPIEXEC[@]}" -n 2 "$OPDLM" "${OPD[@]}" --run.out_dir=tp2 --run.resume=auto >tp2.json 2>tp2.log ||
  fail "resume of a TP 2 checkpoint at DP 2: $(tail -3 tp2.log)"
[[ $(resumed_from tp2.log) == step_00000002 ]] || fail "TP 2 -> DP 2 resumed from '$(resumed_from tp2.log)'"
compare tp2 close

# A flipped byte in the newest checkpoint: verify names the dataset, an explicit resume is refused
# (nothing of the run touched), auto falls back to step 3 and saying why.
cp -r ref flip
f=flip/checkpoints/step_00000004/shard_tp0.h5
off=$(h5dump -p -H -d /adam_m/model.norm.weight "$f" | grep -o 'OFFSET [0-9]*' | awk '{print $2}')
[[ -n "$off" ]] || fail "no storage offset for /adam_m/model.norm.weight"
/usr/bin/python3 -c "
import sys; p, o = sys.argv[1], int(sys.argv[2]) + 3
b = bytearray(open(p, 'rb').read()); b[o] ^= 0x40; open(p, 'wb').write(b)" "$f" "$off"
if "$OPDLM" ckpt verify flip >verify.out 2>verify.err; then fail "ckpt verify accepted a flipped byte"; fi
grep -q "adam_m/model.norm.weight" verify.err || fail "ckpt verify did not name the dataset: $(cat verify.err)"
before=$(sums flip/model.h5 | sha256sum)
if "$OPDLM" "${OPD[@]}" --run.out_dir=flip --run.resume=flip/checkpoints/step_00000004 >/dev/null 2>explicit.err; then
  fail "an explicit resume of a corrupt checkpoint was accepted"
fi
grep -q "run.resume" explicit.err && grep -q "checksum mismatch" explicit.err || fail "explicit resume: $(cat explicit.err)"
[[ $(sums flip/model.h5 | sha256sum) == "$before" ]] || fail "a refused resume changed model.h5"
"$OPDLM" "${OPD[@]}" --run.out_dir=flip --run.resume=auto >/dev/null 2>flip.log || fail "auto resume: $(tail -3 flip.log)"
grep -q "skipped .*step_00000004.*checksum mismatch" flip.log || fail "auto resume did not say why it skipped step 4"
[[ $(resumed_from flip.log) == step_00000003 ]] || fail "auto resume used '$(resumed_from flip.log)'"
compare flip bitwise

# A truncated file is named with its size; a changed teacher is refused.
cp -r ref trunc
truncate -s -64 trunc/checkpoints/step_00000004/state.h5
if "$OPDLM" ckpt verify trunc/checkpoints/step_00000004 >/dev/null 2>trunc.err; then fail "verify accepted a truncation"; fi
grep -q "state.h5.*bytes" trunc.err || fail "verify did not name the truncated file: $(cat trunc.err)"
"$OPDLM" ckpt inspect ref >inspect.out || fail "ckpt inspect failed"
grep -q '"rl_step": 4' inspect.out || fail "ckpt inspect does not show the step"
cp teacher/model.h5 teacher2.h5 && printf 'x' >>teacher2.h5
if "$OPDLM" "${OPD[@]/--model.teacher=teacher\/model.h5/--model.teacher=teacher2.h5}" --run.out_dir=ref \
  --run.resume=auto >/dev/null 2>teacher.err; then
  fail "a resume with another teacher was accepted"
fi
grep -q "model.teacher" teacher.err && grep -q "sha256" teacher.err || fail "teacher refusal: $(cat teacher.err)"
# Bad checkpoint and stop keys: exit 1 naming the key, no run folder created.
PLAIN=()  # OPD without its checkpoint keys, so each bad value is the only one given
for a in "${OPD[@]}"; do [[ $a == --checkpoint.* ]] || PLAIN+=("$a"); done
for bad in checkpoint.keep=0 checkpoint.every=-2 run.time_limit=-1 run.resume=/nonexistent; do
  if "$OPDLM" "${PLAIN[@]}" --$bad --run.out_dir=badkey >/dev/null 2>badkey.err; then fail "--$bad was accepted"; fi
  grep -q "field ${bad%%=*}" badkey.err || fail "--$bad: the error does not name the key: $(cat badkey.err)"
  grep -q "more than once" badkey.err && fail "--$bad: refused as a duplicate, not for its value"
  [[ ! -e badkey ]] || fail "--$bad: created the run folder"
done
echo "ckpt_resume: 6 crash phases resumed bit for bit; DP 2, DP 4 bitwise; TP 2 -> DP 2 within 1e-6;" \
  "flip, truncation and teacher change caught"
