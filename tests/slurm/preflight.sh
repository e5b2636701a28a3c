#!/usr/bin/env bash
# preflight.sh -- the Slurm scripts' checks without Slurm (issue 8): slurm/lib/preflight.sh (argument
# and INI lookup, SLURM_TASKS_PER_NODE parsing, world/TP checks, the teacher hash, the shared run
# directory through fake per-node runners, the binary), and the argument errors and dry runs of
# slurm/submit.sh, slurm/opdlm.sbatch and jobs/qwen3_convert.sh. Every failure message must name
# the key, variable, option or file at fault. Needs bash, sha256sum and python3 only (~1 s).
set -euo pipefail
REPO=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
W=$(mktemp -d /tmp/opdlm_slurm_preflight.XXXXXX)
trap '[[ -n "${KEEP:-}" ]] || rm -rf "$W"' EXIT
cd "$W"
fail() { echo "FAIL: $*"; exit 1; }
n=0
# expect RC PATTERN COMMAND...: COMMAND exits RC and its output (stdout + stderr) matches PATTERN (grep -E)
expect() {
  local want=$1 pat=$2 rc=0 out
  shift 2
  out=$("$@" 2>&1) || rc=$?
  [[ $rc == "$want" ]] || fail "'$*' exited $rc, expected $want: $out"
  grep -qE -- "$pat" <<<"$out" || fail "'$*': output does not match /$pat/: $out"
  n=$((n + 1))
}
source "$REPO/slurm/lib/preflight.sh"

# ---- argument and INI lookup --------------------------------------------------------------------------
cat >c.ini <<'INI'
# comment
[run]
out_dir = runs/from_ini   
[parallel]
tp = 4
[model]
teacher=t.h5
INI
[[ $(opdlm_arg run.out_dir --mode opd --run.out_dir=a) == a ]] || fail "opdlm_arg --run.out_dir=a"
[[ $(opdlm_arg run.out_dir --run.out_dir a --run.out_dir=b) == b ]] || fail "opdlm_arg: the last occurrence wins"
[[ $(opdlm_arg run.out_dir --config c.ini) == runs/from_ini ]] || fail "opdlm_arg from [run] out_dir of --config (trailing blanks trimmed)"
[[ $(opdlm_arg parallel.tp --config=c.ini --parallel.tp=2) == 2 ]] || fail "opdlm_arg: the command line beats the INI"
[[ $(opdlm_arg model.teacher --config c.ini) == t.h5 ]] || fail "opdlm_arg: key=value without blanks"
[[ -z $(opdlm_arg checkpoint.every --config c.ini) ]] || fail "opdlm_arg: a missing key is empty"
[[ $(opdlm_arg mode --mode opd) == opd ]] || fail "opdlm_arg mode"
[[ $(opdlm_arg run.out_dir --config "$REPO/configs/opd/paper.ini") == runs/paper ]] || fail "opdlm_arg on configs/opd/paper.ini"
[[ $(expand_tasks_per_node "4(x2),3") == "4 4 3" ]] || fail "expand_tasks_per_node 4(x2),3"
[[ $(expand_tasks_per_node "8") == "8" ]] || fail "expand_tasks_per_node 8"
expand_tasks_per_node "4(y2)" >/dev/null && fail "expand_tasks_per_node accepted 4(y2)"
n=$((n + 10))

# ---- world, TP placement ------------------------------------------------------------------------------
expect 0 "TP 2 x DP 4" preflight_world 8 2
expect 1 "parallel.tp=4 does not divide SLURM_NTASKS=6" preflight_world 6 4
expect 1 "SLURM_NTASKS='' is not a positive integer" preflight_world "" 1
expect 1 "parallel.tp='x' is not a positive integer" preflight_world 4 x
expect 0 "TP groups of 4 ranks stay within a node" preflight_tp_nodes 4 "8(x2)"
expect 0 "WARNING: parallel.tp=4: TP groups would span nodes \(node 0: 6 tasks node 1: 2 tasks.*--ntasks-per-node a multiple of 4" \
  preflight_tp_nodes 4 "6,2"
expect 0 "WARNING: parallel.tp=8: TP groups would span nodes" preflight_tp_nodes 8 "4(x4)"

# ---- the teacher ----------------------------------------------------------------------------------------
echo weights >t.h5
sum=$(sha256sum t.h5 | cut -d' ' -f1)
expect 1 "no teacher: pass --model.teacher" preflight_teacher ""
expect 1 "teacher file model.teacher=nope.h5 does not exist" preflight_teacher nope.h5
expect 0 "teacher t.h5 sha256 $sum \(recorded; set OPDLM_TEACHER_SHA256" preflight_teacher t.h5
expect 0 "sha256 $sum matches OPDLM_TEACHER_SHA256" env OPDLM_TEACHER_SHA256="$sum" bash -c "source $REPO/slurm/lib/preflight.sh; preflight_teacher t.h5"
expect 1 "teacher t.h5 has sha256 $sum but OPDLM_TEACHER_SHA256 says 0{64}" \
  env OPDLM_TEACHER_SHA256="$(printf '0%.0s' {1..64})" bash -c "source $REPO/slurm/lib/preflight.sh; preflight_teacher t.h5"
sha256sum t.h5 >t.h5.sha256
expect 0 "matches t.h5.sha256" preflight_teacher t.h5
echo changed >t.h5
expect 1 "teacher t.h5 has sha256 [0-9a-f]{64} but t.h5.sha256 says $sum: the file changed" preflight_teacher t.h5
echo "not-a-hash t.h5" >t.h5.sha256
expect 1 "t.h5.sha256 does not hold a sha256" preflight_teacher t.h5
rm t.h5.sha256

# ---- the shared run directory, through fake per-node runners ---------------------------------------------
# RUNNER gets: sh -c SCRIPT _ TOKEN VALUE (one call = every node). Two nodes that see the file:
two_nodes() { "$@"; "$@"; }
# two nodes, the second with its own /tmp (it cannot see the token):
split_nodes() { "$@"; local a=("$@"); a[4]=/nonexistent/${a[4]##*/}; "${a[@]}"; }
one_node() { "$@"; }
expect 0 "run directory $W/run is visible from all 2 node\(s\)" preflight_shared_dir "$W/run" 2 two_nodes
expect 1 "run.out_dir=$W/run2 is not on a filesystem shared by all 2 node\(s\).*read back on 1 node\(s\).*BAD cannot read /nonexistent/" \
  preflight_shared_dir "$W/run2" 2 split_nodes
expect 1 "run.out_dir=$W/run3 is not on a filesystem shared by all 2 node\(s\).*read back on 1 node\(s\)" \
  preflight_shared_dir "$W/run3" 2 one_node
expect 1 "run.out_dir=$W/run4 is not on a filesystem shared" preflight_shared_dir "$W/run4" 1 false
[[ -z $(find "$W"/run* -name '.preflight.*') ]] || fail "preflight_shared_dir left its token files behind"
expect 1 "cannot create the run directory run.out_dir=/proc/x/y" preflight_shared_dir /proc/x/y 1 one_node
expect 1 "opdlm binary /nonexistent/opdlm is not an executable file.*set OPDLM=" preflight_binary /nonexistent/opdlm 1 one_node
expect 0 "opdlm binary /bin/true is executable on all 2 node" preflight_binary /bin/true 2 two_nodes

# ---- slurm/submit.sh and slurm/opdlm.sbatch without a cluster -------------------------------------------
S=$REPO/slurm/submit.sh
expect 2 "put the opdlm train arguments after '--'" "$S" -n 2 --run.out_dir=x
expect 2 "no run directory: pass --run.out_dir=DIR" "$S" -n 2 -- --mode opd
expect 2 "--chain 'x' is not a count" "$S" --chain x -- --run.out_dir=x
expect 2 "a chain of 1 is a plain job" "$S" --chain 1 -- --run.out_dir=x
expect 2 "--chain and --array exclude each other" "$S" --chain 2 --array 2 -- --run.out_dir=x
out=$("$S" --dry-run --chain 3 -n 4 --job-name=c -- --run.out_dir=r 2>&1)
[[ $(grep -c "OPDLM_REQUEUE=0 sbatch --parsable --no-requeue" <<<"$out") == 3 ]] || fail "submit.sh --chain 3: not 3 no-requeue links: $out"
grep -q -- "--dependency=afterany:\\\\<job1\\\\> --output=slurm-c-\\\\<job1\\\\>.log -n 4 --job-name=c $REPO/slurm/opdlm.sbatch --run.out_dir=r" <<<"$out" \
  || fail "submit.sh --chain 3: link 2 does not depend on link 1 (afterany) or share its log: $out"
grep -q -- "--dependency=afterany:\\\\<job2\\\\>" <<<"$out" || fail "submit.sh --chain 3: link 3 does not depend on link 2: $out"
expect 0 "--no-requeue --array=1-5%1 --output=slurm-%x-%A.log" "$S" --dry-run --array 5 -- --run.out_dir=r
expect 0 "^env OPDLM_ROOT=$REPO sbatch --parsable $REPO/slurm/opdlm.sbatch --run.out_dir=r" "$S" --dry-run -- --run.out_dir=r
n=$((n + 3))
expect 2 "not inside a Slurm job \(no SLURM_JOB_ID\)" env -u SLURM_JOB_ID bash "$REPO/slurm/opdlm.sbatch" --run.out_dir=r
expect 2 "OPDLM_LAUNCHER='x' must be srun or mpirun" env OPDLM_LAUNCHER=x bash "$REPO/slurm/opdlm.sbatch"
expect 2 "OPDLM_MAX_RESTARTS='-1' is not a non-negative integer" env OPDLM_MAX_RESTARTS=-1 bash "$REPO/slurm/opdlm.sbatch"
expect 2 "no run directory: pass --run.out_dir" env SLURM_JOB_ID=1 SLURM_NTASKS=1 bash "$REPO/slurm/opdlm.sbatch" --mode opd
expect 2 "remove --run.resume=x: this script passes --run.resume=auto itself" \
  env SLURM_JOB_ID=1 SLURM_NTASKS=1 bash "$REPO/slurm/opdlm.sbatch" --run.out_dir=r --run.resume=x
expect 2 "config file --config nope.ini does not exist" env SLURM_JOB_ID=1 bash "$REPO/slurm/opdlm.sbatch" --config nope.ini --run.out_dir=r

# ---- jobs/qwen3_convert.sh: argument checks and the dry run -------------------------------------------
Q=$REPO/jobs/qwen3_convert.sh
mkdir -p hf && echo '{"model_type": "qwen3"}' >hf/config.json && touch hf/tokenizer.json hf/model.safetensors
echo '{"prompt": "1+1="}' >p.jsonl
expect 2 "--hf DIR is required" "$Q" --prompts p.jsonl
expect 2 "--hf $W/nope is not a directory" "$Q" --hf nope --prompts p.jsonl
expect 2 "--prompts FILE.jsonl is required" "$Q" --hf hf
expect 2 "--prompts $W/nope.jsonl does not exist" "$Q" --hf hf --prompts nope.jsonl
expect 2 "--tp 3: must divide Qwen3's 8 KV heads" "$Q" --hf hf --prompts p.jsonl --tp 3
expect 2 "--tp 4 does not divide --np 2" "$Q" --hf hf --prompts p.jsonl --tp 4 --np 2
expect 2 "--dtype f16 must be f32 or bf16" "$Q" --hf hf --prompts p.jsonl --dtype f16
expect 2 "unknown argument '--bogus'" "$Q" --hf hf --prompts p.jsonl --bogus
mkdir -p hf2 && echo '{"model_type": "llama"}' >hf2/config.json && touch hf2/tokenizer.json hf2/model.safetensors
expect 2 "--hf $W/hf2/config.json: model_type is 'llama', not qwen3" "$Q" --hf hf2 --prompts p.jsonl
rm hf2/model.safetensors
expect 2 "--hf $W/hf2 has neither model.safetensors nor model.safetensors.index.json" "$Q" --hf hf2 --prompts p.jsonl
expect 0 "import-hf --from $W/hf --out $W/q/teacher.h5.tmp --dtype bf16" "$Q" --dry-run --hf hf --prompts p.jsonl --run q --dtype bf16
expect 0 "mpirun -np 4 --bind-to none .*train --mode opd --config $REPO/configs/opd/paper.ini --model.teacher=$W/q/teacher.h5 --model.tokenizer=$W/hf/tokenizer.json --data.prompts=$W/p.jsonl --parallel.tp=2 --checkpoint.every=5 --run.out_dir=$W/q/opd --optim.rl_steps=2 --run.resume=auto" \
  "$Q" --dry-run --hf hf --prompts p.jsonl --run q --np 4 --tp 2 -- --optim.rl_steps=2

echo "slurm_preflight: $n checks passed"
