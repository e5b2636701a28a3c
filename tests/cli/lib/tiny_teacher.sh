# tiny_teacher.sh -- sourced by the CLI tests: make_tiny_teacher OPDLM builds, in the current folder,
# an arithmetic corpus (arith/: 3000 training lines, conversion prompts, held-out eval), a 300-id BPE
# tokenizer (tok.json), its token shard (train.bin) and a tiny Qwen3 teacher (2 layers, hidden 32,
# 4 heads, 2 KV heads) trained for 30 steps (teacher/model.h5); ~2 s.
make_tiny_teacher() {
  local opdlm=$1
  "$opdlm" data arithmetic --out-dir arith --n-train 3000 --n-eval 20 --n-conversion 200 --seed 1 --max-digits 2 >/dev/null
  "$opdlm" tokenizer train --input arith/train.txt --vocab-size 300 --out tok.json >/dev/null 2>&1
  "$opdlm" data prepare --tokenizer tok.json --input arith/train.txt --out train.bin --append-eos >/dev/null
  local eos mask vocab
  read -r eos mask vocab < <(/usr/bin/python3 -c "
import json; t = json.load(open('tok.json')); ids = {a['content']: a['id'] for a in t['added_tokens']}
print(ids['<|endoftext|>'], ids['<|MASK|>'], max(ids.values()) + 1)")
  cat > config.json <<JSON
{"vocab_size": $vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "eos_token_id": $eos,
 "pad_token_id": $eos, "mask_token_id": $mask}
JSON
  "$opdlm" train --mode ar --model.config=config.json --model.tokenizer=tok.json --data.train=train.bin \
    --data.seq_len=32 --data.batch_size=8 --optim.max_steps=30 --optim.warmup_steps=5 --optim.lr=3e-3 \
    --run.out_dir=teacher --run.log_every=10 >/dev/null 2>teacher.log
}
