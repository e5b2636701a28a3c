#!/usr/bin/env bash
# ar_pipeline.sh OPDLM -- end-to-end check of the AR command-line path on a tiny arithmetic corpus:
# data arithmetic -> tokenizer train -> data prepare -> train --mode ar (pretrain, then SFT) ->
# generate -> score -> eval -> export-hf -> import-hf, asserting exit codes and outputs. ~20 s.
set -euo pipefail
OPDLM=$(readlink -f "$1")
W=$(mktemp -d /tmp/opdlm_ar_pipeline.XXXXXX)
trap 'rm -rf "$W"' EXIT
cd "$W"
fail() { echo "FAIL: $*"; exit 1; }

"$OPDLM" data arithmetic --out-dir arith --n-train 3000 --n-eval 20 --seed 1 --max-digits 1 >/dev/null
"$OPDLM" tokenizer train --input arith/train.txt --vocab-size 300 --out tok.json >/dev/null
"$OPDLM" data prepare --tokenizer tok.json --input arith/train.txt --out train.bin --append-eos >/dev/null
eos=$("$OPDLM" tokenizer encode --tokenizer tok.json <<< "<|endoftext|>")
vocab=$(/usr/bin/python3 -c "import json;t=json.load(open('tok.json'));print(max(a['id'] for a in t['added_tokens'])+1)")
cat > config.json <<JSON
{"vocab_size": $vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "eos_token_id": $eos, "pad_token_id": $eos}
JSON
"$OPDLM" train --mode ar --model.config=config.json --model.tokenizer=tok.json --data.train=train.bin \
  --data.eval=train.bin --data.seq_len=32 --data.batch_size=8 --optim.max_steps=40 --optim.warmup_steps=5 \
  --optim.lr=3e-3 --run.out_dir=run --run.log_every=10 --run.eval_windows=4 > train.json 2> train.log
grep -q '"steps":40' train.json || fail "pretraining summary: $(cat train.json)"
[[ $(grep -c '"event":"step"' run/metrics.jsonl) == 4 ]] || fail "expected 4 step records"

# SFT continues from the pretrained model on prompt/response records.
/usr/bin/python3 - <<'PY'
import json
with open("sft.jsonl", "w") as f:
    for i in range(30):
        f.write(json.dumps({"id": i, "prompt": f"{i % 7}+{i % 5}=", "response": str(i % 7 + i % 5)}) + "\n")
PY
"$OPDLM" train --mode ar --model.init=run/model.h5 --model.tokenizer=tok.json --data.sft=sft.jsonl \
  --data.seq_len=16 --data.batch_size=4 --optim.max_steps=10 --optim.warmup_steps=2 --run.out_dir=sft > sft.json 2>/dev/null
grep -q '"steps":10' sft.json || fail "SFT summary: $(cat sft.json)"

"$OPDLM" generate --mode ar --model run/model.h5 --prompt "3+4=" --max-new-tokens 4 > gen.jsonl
/usr/bin/python3 -c "import json;r=json.loads(open('gen.jsonl').readline());assert len(r['ids'])<=4 and 'text' in r, r"
"$OPDLM" generate --mode diffusion --model run/model.h5 --prompt "3+4=" --max-new-tokens 6 --block-size 2 --steps 2 > dgen.jsonl
/usr/bin/python3 -c "import json;r=json.loads(open('dgen.jsonl').readline());assert r['status']=='ok' and len(r['step_map'])==len(r['ids'])<=6 and r['forwards']['denoise']>0, r"
echo '{"id": "a", "text": "3+4=7"}' > score_in.jsonl
"$OPDLM" score --model run/model.h5 --input score_in.jsonl > score.jsonl
/usr/bin/python3 -c "
import json;r=json.loads(open('score.jsonl').readline())
assert r['tokens_scored']==len(r['ids'])-1 and all(x<=0 for x in r['logprobs']) and r['id']=='a', r"
"$OPDLM" eval --mode ar --model run/model.h5 --tasks arith/eval_seen.jsonl --max-new-tokens 4 --out items.jsonl > eval.txt
grep -q '"n":20,"task":"arith/eval_seen.jsonl"' eval.txt || fail "eval: $(cat eval.txt)"
[[ $(wc -l < items.jsonl) == 20 ]] || fail "eval items"

"$OPDLM" export-hf --model run/model.h5 --out hf >/dev/null
"$OPDLM" import-hf --from hf --out back.h5 >/dev/null
"$OPDLM" export-hf --model back.h5 --out hf2 >/dev/null
cmp hf/model.safetensors hf2/model.safetensors || fail "HF round trip is not bitwise"

# Bad inputs exit non-zero with the offending name in the message.
if "$OPDLM" train --mode ar --model.config=missing.json --data.train=train.bin --run.out_dir=x 2> err.txt; then
  fail "missing config accepted"; fi
grep -q "missing.json" err.txt || fail "error does not name the file: $(cat err.txt)"
if "$OPDLM" train --mode ar --model.config=config.json --data.train=train.bin --run.out_dir=x --optim.lr=abc 2> err.txt; then
  fail "bad value accepted"; fi
grep -q "optim.lr" err.txt || fail "error does not name the key: $(cat err.txt)"
echo "ar_pipeline: 1 passed, 0 failed"
