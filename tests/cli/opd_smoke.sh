#!/usr/bin/env bash
# opd_smoke.sh -- the OPD issue's CI smoke run (direction only, study.md 5.9 "smoke" tier):
# from one tiny teacher (about 100k parameters, trained here on arithmetic + invented facts), OPD and
# rm-kl convert the same student for the same number of training tokens; OPD's teacher KL on its own
# decoding states (the state-KL probe on held-out arithmetic prompts) must fall during training and
# end below rm-kl's. Prints both runs' figures. Time: about 2-4 minutes on 2 cores.
# Usage: tests/cli/opd_smoke.sh OPDLM_BINARY [WORK_DIR]
set -euo pipefail
OPDLM=$(realpath "$1")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${2:-$(mktemp -d /tmp/opdlm_opd_smoke.XXXXXX)}
mkdir -p "$WORK"
cd "$ROOT"
export OMP_WAIT_POLICY=passive

# Data: the quickstart recipe at a smaller size.
OPDLM="$OPDLM" N_FACTS=100 REPEATS=20 N_ARITH=30000 N_EVAL=200 N_CONV=1000 \
  jobs/data/make_quickstart_corpus.sh "$WORK/data" > "$WORK/data.log"

# Teacher: 2 layers, hidden 64.
"$OPDLM" train --mode ar --config configs/teacher/quickstart.ini --model.config=tests/cli/smoke.model.json \
  --model.tokenizer="$WORK/data/tokenizer.json" --data.train="$WORK/data/train.bin" \
  --optim.max_steps=400 --optim.warmup_steps=40 --optim.lr=3e-3 --run.log_every=100 --run.save_every=0 \
  --run.eval_every=0 --run.out_dir="$WORK/teacher" > "$WORK/teacher.json" 2> "$WORK/teacher.log"

# OPD and rm-kl at the same token budget, same prompts, same probe.
for mode in opd rm-kl; do
  "$OPDLM" train --mode "$mode" --config configs/opd/quickstart.ini \
    --model.teacher="$WORK/teacher/model.h5" --model.tokenizer="$WORK/data/tokenizer.json" \
    --data.prompts="$WORK/data/arith/conversion.jsonl" --eval.probe_prompts="$WORK/data/arith/eval_heldout.jsonl" \
    --eval.probe_limit=48 --eval.probe_every=0 --optim.max_train_tokens=6000 --optim.rl_steps=100 \
    --optim.lr=1e-3 --run.out_dir="$WORK/$mode" > "$WORK/$mode.json" 2> "$WORK/$mode.log"
done

python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
r = {m: json.load(open(f"{w}/{m}.json")) for m in ("opd", "rm-kl")}
for m, s in r.items():
    print(f"{m:6s} train_tokens={s['train_tokens']:6d} rl_steps={s['rl_steps']:3d} "
          f"own-state KL {s['probe_own_kl_first']:.4f} -> {s['probe_own_kl_last']:.4f}  "
          f"random-state KL {s['probe_random_kl_last']:.4f}")
o, k = r["opd"], r["rm-kl"]
ok = True
if not o["probe_own_kl_last"] < o["probe_own_kl_first"]:
    print("FAIL: OPD's KL on its own decoding states did not fall"); ok = False
if not o["probe_own_kl_last"] < k["probe_own_kl_last"]:
    print("FAIL: OPD's KL on its own decoding states is not below rm-kl's"); ok = False
if abs(o["train_tokens"] - k["train_tokens"]) > 0.1 * k["train_tokens"]:
    print("FAIL: the arms did not stop at comparable token budgets"); ok = False
print("opd_smoke:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
