#!/usr/bin/env bash
# Trainer + CLI check: `opdlm tokenizer train` learns a 4k byte-level BPE on the KJV and part of the
# Python stdlib; then `opdlm tokenizer encode` and the two node references (HF tokenizers Rust and
# transformers.js, loading the trained file) must give the same ids on a sample, and
# `opdlm tokenizer decode` must give back what HF's decode gives.
# usage: train_ref_check.sh OPDLM_BINARY REPO_DIR      exit 0 pass, 1 fail, 77 skipped
set -euo pipefail
opdlm=$1
tokref=$2/tools/tokref
skip() { echo "SKIP: $*"; exit 77; }
[[ -d $tokref/node_modules/@anush008/tokenizers ]] || skip "$tokref/node_modules missing: run tools/install-deps.sh"
command -v node >/dev/null || skip "node not found"
command -v bible >/dev/null || skip "bible not found (apt-get install bible-kjv bible-kjv-text)"
[[ -f /usr/lib/python3.11/json/decoder.py ]] || skip "the Debian Python 3.11 stdlib is missing"

tmp=$(mktemp -d /tmp/opdlm_toktrain_XXXXXX)
trap 'rm -rf "$tmp"' EXIT
bible -l 100000 "Gen1:1-Rev22:21" > "$tmp/kjv.txt"
code=(/usr/lib/python3.11/json/*.py /usr/lib/python3.11/email/*.py /usr/lib/python3.11/textwrap.py)
"$opdlm" tokenizer train --input "$tmp/kjv.txt" "${code[@]}" --vocab-size 4096 --out "$tmp/tok.json"

# Sample: every 40th KJV line, the code files, and non-ASCII / special-token lines.
{
  awk 'NR % 40 == 0' "$tmp/kjv.txt"
  cat /usr/lib/python3.11/json/decoder.py /usr/lib/python3.11/textwrap.py /usr/lib/python3.11/shlex.py
  printf '%s\n' "caf$(printf '\xc3\xa9') na$(printf '\xc3\xaf')ve e$(printf '\xcc\x81') $(printf '\xe6\x9d\xb1\xe4\xba\xac') $(printf '\xf0\x9f\x98\x80')" \
    "<|im_start|>user" "say <|MASK|><|MASK|> then<|im_end|><|endoftext|>" "  I'LL don't   " "" "12345 + 678 = 13023"
} > "$tmp/sample.txt"
# Lines as JSON strings for the references (split on \n only, like getline).
node -e 'const t=require("fs").readFileSync(0,"utf8"); const l=t.split("\n"); if (t.endsWith("\n")) l.pop();
         process.stdout.write(l.map(s=>JSON.stringify(s)).join("\n")+"\n")' < "$tmp/sample.txt" > "$tmp/sample.jsonl"

"$opdlm" tokenizer encode --tokenizer "$tmp/tok.json" < "$tmp/sample.txt" > "$tmp/ours.txt"
node "$tokref/qwen3_rust_ref.js" --decode --tokenizer "$tmp/tok.json" < "$tmp/sample.jsonl" > "$tmp/rust.jsonl"
node "$tokref/qwen3_ref.js" --tokenizer "$tmp/tok.json" < "$tmp/sample.jsonl" > "$tmp/js.jsonl" 2> "$tmp/js.err"
to_ids='const l=require("fs").readFileSync(0,"utf8").split("\n").filter(x=>x.length);
        process.stdout.write(l.map(x=>JSON.parse(x).ids.join(" ")).join("\n")+"\n")'
node -e "$to_ids" < "$tmp/rust.jsonl" > "$tmp/rust.txt"
node -e "$to_ids" < "$tmp/js.jsonl" > "$tmp/js.txt"
node -e 'const l=require("fs").readFileSync(0,"utf8").split("\n").filter(x=>x.length);
         process.stdout.write(l.map(x=>JSON.stringify(JSON.parse(x).text)).join("\n")+"\n")' < "$tmp/rust.jsonl" > "$tmp/rust_text.jsonl"
"$opdlm" tokenizer decode --json --tokenizer "$tmp/tok.json" < "$tmp/ours.txt" > "$tmp/ours_text.jsonl"

lines=$(wc -l < "$tmp/sample.txt")
tokens=$(wc -w < "$tmp/ours.txt")
status=0
for ref in rust js; do
  if cmp -s "$tmp/ours.txt" "$tmp/$ref.txt"; then
    echo "ids: opdlm == $ref reference on $lines lines ($tokens tokens)"
  else
    echo "MISMATCH: opdlm vs $ref reference ids:"; diff "$tmp/ours.txt" "$tmp/$ref.txt" | head -20; status=1
  fi
done
# Node's JSON.stringify and nlohmann's dump escape alike for these texts (\n, \t, \", \\, \r).
if cmp -s "$tmp/ours_text.jsonl" "$tmp/rust_text.jsonl"; then
  echo "decode: opdlm == rust reference on $lines lines"
else
  echo "MISMATCH: decode"; diff "$tmp/ours_text.jsonl" "$tmp/rust_text.jsonl" | head -20; status=1
fi
exit $status
