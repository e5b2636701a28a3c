#!/usr/bin/env bash
# make_seeds.sh OPDLM -- regenerates the committed seed corpora (tests/fuzz/corpus/<target>/) from
# real files that opdlm itself writes: a tiny BPE tokenizer, its token shard, a 1-layer model exported
# to safetensors with its config.json, a conversion run's prompts, config, checkpoint manifest and
# state meta. Run it when a format changes; the seeds are small (a few KB each).
set -euo pipefail
OPDLM=$(readlink -f "$1")
HERE=$(dirname "$(readlink -f "$0")")
C=$HERE/corpus
W=$(mktemp -d /tmp/opdlm_seeds.XXXXXX)
trap 'rm -rf "$W"' EXIT
cd "$W"
export OMP_NUM_THREADS=1
"$OPDLM" data arithmetic --out-dir arith --n-train 300 --n-eval 5 --n-conversion 20 --seed 1 --max-digits 2 >/dev/null
"$OPDLM" tokenizer train --input arith/train.txt --vocab-size 280 --out tok.json >/dev/null 2>&1
head -40 arith/train.txt >small.txt
"$OPDLM" data prepare --tokenizer tok.json --input small.txt --out shard.bin --append-eos >/dev/null
"$OPDLM" data prepare --tokenizer tok.json --input arith/train.txt --out train.bin --append-eos >/dev/null
read -r eos mask vocab < <(/usr/bin/python3 -c "
import json; t = json.load(open('tok.json')); ids = {a['content']: a['id'] for a in t['added_tokens']}
print(ids['<|endoftext|>'], ids['<|MASK|>'], max(ids.values()) + 1)")
cat >config.json <<JSON
{"vocab_size": $vocab, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
 "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "eos_token_id": $eos,
 "pad_token_id": $eos, "mask_token_id": $mask}
JSON
"$OPDLM" train --mode ar --model.config=config.json --model.tokenizer=tok.json --data.train=train.bin \
  --data.seq_len=16 --data.batch_size=4 --optim.max_steps=2 --optim.warmup_steps=1 --run.out_dir=teacher >/dev/null 2>&1
"$OPDLM" export-hf --model teacher/model.h5 --out hf >/dev/null
"$OPDLM" train --mode opd --model.teacher=teacher/model.h5 --model.tokenizer=tok.json \
  --data.prompts=arith/conversion.jsonl --data.prompts_per_step=4 --data.rows_per_update=4 \
  --rollout.max_new_tokens=4 --optim.rl_steps=2 --optim.warmup_steps=1 --checkpoint.every=1 --run.out_dir=opd >/dev/null 2>&1

rm -rf "$C"
mkdir -p "$C"/{safetensors,model_config,tokenizer_json,tokenizer_encode,config_ini,jsonl,token_shard,ckpt_manifest,ckpt_attrs}
cp hf/model.safetensors "$C/safetensors/tiny_export.safetensors"
cp hf/config.json "$C/model_config/tiny_export.json"
cp "$HERE/../cli/smoke.model.json" "$C/model_config/smoke.json"
cp tok.json "$C/tokenizer_json/tiny_bpe.json"
printf '3+4=7\n' >"$C/tokenizer_encode/arith.txt"
printf 'In the beginning God created the heaven and the earth.\n' >"$C/tokenizer_encode/kjv.txt"
printf 'def f(x):\n    return x ** 2  # ünïcödé — 日本語 🙂\n' >"$C/tokenizer_encode/code_unicode.txt"
printf '<|endoftext|>a<|MASK|>\xff\xfe bad utf-8' >"$C/tokenizer_encode/special_and_invalid.txt"
{ cat "$HERE/../../configs/opd/quickstart.ini"; printf '\n@@@\n--optim.lr=1e-3\n--parallel.tp=2\n'; } >"$C/config_ini/quickstart.txt"
head -5 arith/conversion.jsonl >"$C/jsonl/arith_conversion.jsonl"
cp shard.bin "$C/token_shard/small.bin"
cp opd/checkpoints/step_00000002/MANIFEST.json "$C/ckpt_manifest/real.json"
/usr/bin/python3 - "$C/ckpt_attrs/real_meta.bin" opd/checkpoints/step_00000002 "$OPDLM" <<'PY'
import json, subprocess, struct, sys
out, ckpt, opdlm = sys.argv[1:]
# The real state.h5 meta (its root attribute), then the attributes of a real parameter block.
dump = subprocess.run(["h5dump", "-w", "0", "-a", "/meta", f"{ckpt}/state.h5"], capture_output=True, text=True,
                      check=True).stdout
meta = json.loads(dump[dump.find('"{') + 1:dump.rfind('}"') + 1])  # h5dump prints the string unescaped
blob = json.dumps(meta).encode()
blob += b"\n@@@\n" + json.dumps(["param/w"]).encode() + b"\n@@@\n" + b"[2,3]" + b"\n@@@\n"
blob += struct.pack("<qq", -1, 0) + bytes([2, 3])
open(out, "wb").write(blob)
PY
mkdir -p "$HERE/regressions"
for t in "$C"/*; do mkdir -p "$HERE/regressions/$(basename "$t")"; done
du -sh "$C"/* | sed "s|$C/||"
