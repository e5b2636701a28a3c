#!/usr/bin/env python3
"""eval_table.py -- one table from `opdlm eval --out` result JSONs (docs/eval.md), one row per model.

    tools/eval_table.py --row teacher=runs/qs/eval/teacher.json \
                        --row "OPD=runs/qs/eval/opd.json:runs/qs/opd/summary.json" ... \
                        [--reference teacher] [--json table.json]

A row is LABEL=RESULT[:TRAIN_SUMMARY]; TRAIN_SUMMARY is the one-line JSON `opdlm train` prints (its
train_tokens and wall_s go into the table). Columns: exact match per task (and multiple-choice
accuracy where the task has distractors), tokens per forward, KL(teacher||student) on the model's
own decoding states and on random-mask states, and, relative to --reference, the retention ratio
EM(row) / EM(reference) per task. Every figure is read from the files; nothing is recomputed.
"""
import argparse
import json
import os
import sys


def load(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"eval_table.py: cannot read {what} {path}: {e}")


def task_name(t):
    p = t["task"]
    parent = os.path.basename(os.path.dirname(p))
    return (parent + "/" if parent else "") + os.path.splitext(os.path.basename(p))[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", action="append", required=True, help="LABEL=RESULT.json[:TRAIN_SUMMARY.json]")
    ap.add_argument("--reference", help="label of the row retention is measured against")
    ap.add_argument("--json", help="also write the table as JSON here")
    a = ap.parse_args()

    rows = []
    for spec in a.row:
        if "=" not in spec:
            sys.exit(f"eval_table.py: --row {spec!r}: expected LABEL=RESULT.json[:SUMMARY.json]")
        label, files = spec.split("=", 1)
        res_path, _, sum_path = files.partition(":")
        res = load(res_path, "result")
        if res.get("format") != "opdlm-eval/1":
            sys.exit(f"eval_table.py: {res_path}: not an opdlm eval result (format {res.get('format')!r})")
        summ = load(sum_path, "train summary") if sum_path else {}
        rows.append(dict(label=label, result=res, summary=summ))

    tasks = []
    for r in rows:
        for t in r["result"]["tasks"]:
            if task_name(t) not in tasks:
                tasks.append(task_name(t))
    ref = next((r for r in rows if r["label"] == a.reference), None)
    if a.reference and ref is None:
        sys.exit(f"eval_table.py: --reference {a.reference!r} is not a row label")

    def by_task(r):
        return {task_name(t): t for t in r["result"]["tasks"]}

    out = []
    for r in rows:
        bt, res = by_task(r), r["result"]
        kl = res.get("state_kl") or {}
        row = dict(model=r["label"], mode=res["mode"], train_tokens=r["summary"].get("train_tokens"),
                   train_wall_s=r["summary"].get("wall_s"), kl_own=kl.get("own"), kl_random=kl.get("random"))
        tpf_num = tpf_den = 0
        for name in tasks:
            t = bt.get(name)
            if not t:
                continue
            row[f"EM {name}"] = t["exact_match"]
            if "mc_accuracy" in t:
                row[f"MC {name}"] = t["mc_accuracy"]
            tpf_num += t["generated_tokens"]
            tpf_den += t["forwards"]
            if ref is not None:
                rt = by_task(ref).get(name)
                if rt and rt["exact_match"] > 0:
                    row[f"ret {name}"] = t["exact_match"] / rt["exact_match"]
        row["TPF"] = tpf_num / tpf_den if tpf_den else None
        out.append(row)

    cols = ["model", "train_tokens"] + [c for c in dict.fromkeys(k for r in out for k in r)
                                        if c.startswith(("EM ", "MC ", "ret "))] + ["TPF", "kl_own", "kl_random"]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in out]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
