#!/usr/bin/env bash
# data_facts_split.sh: `opdlm data facts --conversion-entities`: the conversion and eval files split
# the facts by entity, train.txt does not depend on the split, the manifest counts agree, and a bad
# value (or seed) exits non-zero naming the flag without creating the output folder.
# Usage: tests/cli/data_facts_split.sh OPDLM
set -euo pipefail
OPDLM=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$OPDLM" data facts --out-dir "$WORK/none" --n-facts 60 --repeats 2 --seed 5 > /dev/null
"$OPDLM" data facts --out-dir "$WORK/split" --n-facts 60 --repeats 2 --seed 5 --conversion-entities 20 > /dev/null
cmp "$WORK/none/train.txt" "$WORK/split/train.txt"  # the teacher learns every fact either way

python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
def records(path):
    rows = [json.loads(l) for l in open(path)]
    assert "_header" in rows[0], path
    return rows[0]["_header"], rows[1:]
_, full = records(f"{w}/none/eval.jsonl")
_, none_conv = records(f"{w}/none/conversion.jsonl")
assert none_conv == [], "no conversion records without --conversion-entities"
hdr, ev = records(f"{w}/split/eval.jsonl")
chdr, conv = records(f"{w}/split/conversion.jsonl")
assert hdr["conversion_entities"] == 20 and chdr["conversion_entities"] == 20
conv_entities = {r["meta"]["entity"] for r in conv}
eval_entities = {r["meta"]["entity"] for r in ev}
assert len(conv_entities) == 20, len(conv_entities)
assert not conv_entities & eval_entities, "an entity is in both files"
assert conv_entities | eval_entities == {r["meta"]["entity"] for r in full}
assert len(ev) + len(conv) == len(full)
by_id = {r["id"]: r for r in full}
for r in conv:
    assert r["split"] == "conversion" and r["response"] == r["gold"] == by_id[r["id"]]["gold"], r
    assert r["prompt"] == by_id[r["id"]]["prompt"], r
for r in ev:
    assert r == by_id[r["id"]], r  # eval items are unchanged, only fewer
m = json.load(open(f"{w}/split/manifest.json"))
assert (m["conversion_entities"], m["conversion_items"], m["eval_items"]) == (20, len(conv), len(ev)), m
print(f"ok: {len(conv)} conversion facts of 20 entities, {len(ev)} eval facts of {len(eval_entities)}")
PY

# A bad value names the flag, exits non-zero and creates nothing.
if "$OPDLM" data facts --out-dir "$WORK/bad" --n-facts 60 --conversion-entities 60 2> "$WORK/err.txt"; then
  echo "FAIL: --conversion-entities 60 of 60 accepted" >&2; exit 1
fi
grep -q -- "--conversion-entities" "$WORK/err.txt" || { echo "FAIL: error does not name the flag:" >&2; cat "$WORK/err.txt" >&2; exit 1; }
[[ ! -e $WORK/bad ]] || { echo "FAIL: a failing run created its output folder" >&2; exit 1; }
echo "ok: bad --conversion-entities rejected: $(head -n 1 "$WORK/err.txt")"

# A seed outside [0, 2^32) is refused the same way by both generators (one check, seed_flag).
for cmd in facts arithmetic; do
  if "$OPDLM" data $cmd --out-dir "$WORK/badseed" --seed -1 2> "$WORK/err.txt"; then
    echo "FAIL: data $cmd --seed -1 accepted" >&2; exit 1
  fi
  grep -q -- "--seed must be in" "$WORK/err.txt" || { echo "FAIL: data $cmd: error does not name --seed:" >&2; cat "$WORK/err.txt" >&2; exit 1; }
  [[ ! -e $WORK/badseed ]] || { echo "FAIL: data $cmd created its output folder" >&2; exit 1; }
done
echo "ok: --seed -1 rejected by data facts and data arithmetic"
