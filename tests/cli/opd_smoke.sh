#!/usr/bin/env bash
# opd_smoke.sh -- the OPD issue's CI smoke run (direction only, study.md 5.9 "smoke" tier):
# from one tiny teacher (131k parameters, trained here for 400 steps on arithmetic + invented facts),
# OPD and rm-kl convert the same student for the same number of training tokens (12,000) with two
# seeds each. The state-KL probe (docs/opd.md) decodes 160 held-out arithmetic prompts every 4 RL
# steps; the statistic is the mean of the probes in the second half of the budget (single probes
# swing by 2x between neighbours), averaged over the seeds. Passes when OPD's KL on its own
# decoding states fell from the start and ends below rm-kl's.
# Block size 8 (8 steps per block): at b = 4 the two arms were within seed noise in our runs (late
# means 0.097/0.098/0.122 OPD vs 0.107/0.082/0.115 rm-kl over seeds 1-3); at b = 8 OPD was lower for
# every seed (0.046/0.115/0.091 vs 0.155/0.131/0.102). docs/opd.md has the table.
# Time: about 2-3 minutes on 2 cores.
# Usage: tests/cli/opd_smoke.sh OPDLM_BINARY [WORK_DIR]
set -euo pipefail
OPDLM=$(realpath "$1")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
AUTO_WORK=0
[[ $# -ge 2 ]] || AUTO_WORK=1
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
for seed in 1 2; do
  for mode in opd rm-kl; do
    "$OPDLM" train --mode "$mode" --config configs/opd/quickstart.ini \
      --model.teacher="$WORK/teacher/model.h5" --model.tokenizer="$WORK/data/tokenizer.json" \
      --data.prompts="$WORK/data/arith/conversion.jsonl" --eval.probe_prompts="$WORK/data/arith/eval_heldout.jsonl" \
      --eval.probe_limit=160 --eval.probe_every=4 --optim.max_train_tokens=12000 --optim.rl_steps=300 \
      --optim.lr=3e-4 --rollout.block_size=8 --rollout.steps_per_block=8 --run.seed=$seed \
      --run.out_dir="$WORK/$mode-$seed" > "$WORK/$mode-$seed.json" 2> "$WORK/$mode-$seed.log"
  done
done

# The converted student through the evaluation harness (docs/eval.md): the result JSON must hold
# the knobs, the hashes and every metric section.
"$OPDLM" eval --mode diffusion --model "$WORK/opd-1/model.h5" --teacher "$WORK/teacher/model.h5" \
  --tokenizer "$WORK/data/tokenizer.json" --tasks "$WORK/data/facts/eval.jsonl" "$WORK/data/arith/eval_heldout.jsonl" \
  --gen-ppl-tasks "$WORK/data/arith/eval_heldout.jsonl" --limit 24 --max-new-tokens 12 --mc-samples 2 \
  --block-size 8 --steps-per-block 8 \
  --out "$WORK/eval.json" > "$WORK/eval.txt" 2> "$WORK/eval.log"

python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
ev = json.load(open(f"{w}/eval.json"))
assert ev["format"] == "opdlm-eval/1" and ev["mode"] == "diffusion", ev.get("format")
assert len(ev["model"]["sha256"]) == 64 and len(ev["teacher"]["sha256"]) == 64
assert ev["decoding"]["strategy"] == "low_confidence_static" and ev["decoding"]["block_size"] == 8
for t in ev["tasks"]:
    assert t["n"] == 24 and len(t["sha256"]) == 64 and t["tokens_per_forward"] > 0, t
assert "mc_accuracy" in ev["tasks"][0], "the facts task has distractors"
assert ev["state_kl"]["rows"] > 0 and ev["state_kl"]["own"] >= 0, ev["state_kl"]
assert ev["gen_ppl"]["n"] > 0 and ev["gen_ppl"]["gen_ppl"] > 1 and ev["gen_ppl"]["unigram_entropy"] > 0, ev["gen_ppl"]
print("eval result JSON: ok (EM facts %.3f, arith %.3f, own-state KL %.3f)" % (
    ev["tasks"][0]["exact_match"], ev["tasks"][1]["exact_match"], ev["state_kl"]["own"]))
res = {}
for mode in ("opd", "rm-kl"):
    firsts, lates, tokens = [], [], []
    for seed in (1, 2):
        run = f"{w}/{mode}-{seed}"
        budget = json.load(open(f"{run}.json"))["train_tokens"]
        probes = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"probe"' in l]
        probes = [p for p in probes if p.get("own_state_kl") is not None]
        late = [p["own_state_kl"] for p in probes if p["train_tokens"] >= budget / 2]
        firsts.append(probes[0]["own_state_kl"])
        lates.append(sum(late) / len(late))
        tokens.append(budget)
        print(f"{mode:6s} seed {seed}: train_tokens={budget} own-state KL first {probes[0]['own_state_kl']:.4f}, "
              f"late mean {lates[-1]:.4f} over {len(late)} probes")
    res[mode] = dict(first=sum(firsts) / 2, late=sum(lates) / 2, tokens=tokens)
o, k = res["opd"], res["rm-kl"]
print(f"mean over seeds: OPD {o['first']:.4f} -> {o['late']:.4f}; rm-kl {k['first']:.4f} -> {k['late']:.4f}")
ok = True
if not o["late"] < o["first"]:
    print("FAIL: OPD's KL on its own decoding states did not fall"); ok = False
if not o["late"] < k["late"]:
    print("FAIL: OPD's KL on its own decoding states is not below rm-kl's"); ok = False
for a, b in zip(o["tokens"], k["tokens"]):
    if abs(a - b) > 0.1 * b:
        print("FAIL: the arms did not stop at comparable token budgets"); ok = False
print("opd_smoke:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
# A temporary work dir goes on success and stays for inspection on failure (set -e exits first).
[[ $AUTO_WORK == 1 ]] && rm -rf "$WORK"
exit 0
