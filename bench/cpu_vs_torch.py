#!/usr/bin/python3
"""
cpu_vs_torch.py -- side-by-side CPU benchmark: opdlm against the PyTorch reference.

Runs opdlm's `opdlm_bench_vs_torch` (A) and the reference `torch_qwen3_ref.py --blas openmp` (B)
interleaved in one time window -- A/B, then B/A, ... for every (mode, size) -- each run wrapped by
the reference's noise guard `scripts/clean_run.py`, and prints the opdlm/torch ratios.  Absolute
numbers drift by 12-30 % over tens of minutes on this shared 2-vCPU box (../shared/bench/BASELINES.md,
section "Noise"), so only ratios measured side by side are meaningful; expect +-10-15 % run-to-run
scatter at 2 threads even so (that is what the per-round min-max column shows).

Usage (from the repo root):
    bench/cpu_vs_torch.py --opdlm build-perf/bench/opdlm_bench_vs_torch
    bench/cpu_vs_torch.py --opdlm build-perf/bench/opdlm_bench_vs_torch --modes train --sizes medium
    bench/cpu_vs_torch.py --quick --no-clean          # smoke test: tiny only, 2 runs, 1 round, no noise guard

The opdlm binary should come from a Release build with -DOPDLM_NATIVE=ON (-march=native), e.g.
    cmake -S . -B build-perf -DCMAKE_BUILD_TYPE=Release -DOPDLM_NATIVE=ON && cmake --build build-perf \\
        --target opdlm_bench_vs_torch

Order: one opdlm sgemm run (the MFU peak), then per (mode, size) `--rounds` A/B pairs with the order
alternating (A/B, B/A, ...) to cancel drift, then a final sgemm run; the peak is the max of the two.

Expected run time (2 threads, default matrix: train tiny/small/medium, ar-/bd-decode tiny/small,
2 rounds): torch medium train is ~10 s per step (~75 s per process incl. warm-up), small ~1.4 s per
step; all together roughly 15 min on a quiet box, up to ~45 min when clean_run has to wait for the
box to go quiet (it waits for < 8 % load before every attempt) and retry disturbed attempts.
--quick --no-clean takes under a minute, --quick (all three modes, tiny) a few minutes.

Output: progress on stderr ("[cpu_vs_torch] ..."), the markdown table on stdout (and in --table FILE
if given); every annotated raw JSON line plus one final summary line appended to --out
(default bench/results/cpu_vs_torch.jsonl).  Exits 0 even when goals are missed (it is a benchmark,
not a test); exits 1 when a command fails or prints no JSON line.
"""
import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Goals, hard-coded from the issue: opdlm/torch tokens-per-second ratio at 2 threads, torch with
# --blas openmp (the tuned peer baseline), plus an absolute MFU goal for medium training.
GOALS = {
    ("train", "tiny"): 2.0,
    ("train", "small"): 1.3,
    ("train", "medium"): 1.2,
    ("bd-decode", "tiny"): 5.0,
    ("bd-decode", "small"): 3.0,
    ("ar-decode", "tiny"): 3.0,
    ("ar-decode", "small"): 3.0,
}
MFU_GOALS = {("train", "medium"): 0.70}

DEFAULT_SIZES = {"train": ["tiny", "small", "medium"], "ar-decode": ["tiny", "small"], "bd-decode": ["tiny", "small"]}
MODES = ("train", "ar-decode", "bd-decode")


def log(msg):
    print(f"[cpu_vs_torch] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def csv(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--opdlm", default="build/bench/opdlm_bench_vs_torch",
                    help="opdlm_bench_vs_torch binary (relative: to the cwd if it exists there, else to the repo root)")
    ap.add_argument("--ref-dir", default=str(REPO.parent / "shared" / "bench"),
                    help="reference bench dir holding torch_qwen3_ref.py and scripts/clean_run.py")
    ap.add_argument("--python", default="/usr/bin/python3", help="interpreter with torch (Debian python3-torch)")
    ap.add_argument("--modes", type=csv, default=list(MODES), help="comma list of train,ar-decode,bd-decode")
    ap.add_argument("--sizes", type=csv, default=None,
                    help="comma list; default train: tiny,small,medium, decode: tiny,small "
                         "(explicitly listed sizes run for every mode)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="A/B pairs per (mode, size) (default 2)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per process (default 7; 5 for medium)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs per process (default 2)")
    ap.add_argument("--tries", type=int, default=3, help="clean_run.py --tries")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu_vs_torch.jsonl"),
                    help="JSONL file to append raw lines + summary to")
    ap.add_argument("--table", help="also write the markdown table to this file")
    ap.add_argument("--no-clean", action="store_true", help="run commands directly, without clean_run.py")
    ap.add_argument("--from-jsonl", metavar="FILE",
                    help="run nothing: rebuild the table from the raw lines of one session in FILE "
                         "(--session, default the last one)")
    ap.add_argument("--session", help="with --from-jsonl: the session id (its start time, UTC)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: runs 2, warmup 1, rounds 1, sizes tiny (explicit flags still win)")
    a = ap.parse_args()
    for m in a.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (choose from {', '.join(MODES)})")
    a.runs_explicit = a.runs is not None
    if a.quick:
        a.runs = 2 if a.runs is None else a.runs
        a.warmup = 1 if a.warmup is None else a.warmup
        a.rounds = 1 if a.rounds is None else a.rounds
        a.sizes = ["tiny"] if a.sizes is None else a.sizes
    a.rounds = 2 if a.rounds is None else a.rounds
    a.warmup = 2 if a.warmup is None else a.warmup
    if a.rounds < 1 or a.threads < 1 or (a.runs is not None and a.runs < 1) or a.warmup < 0 or a.tries < 1:
        ap.error("--rounds, --threads, --runs, --tries must be >= 1 and --warmup >= 0")
    opdlm = Path(a.opdlm)
    if not opdlm.is_absolute():
        opdlm = (Path.cwd() / opdlm) if (Path.cwd() / opdlm).exists() else (REPO / opdlm)
    a.opdlm = opdlm.resolve()
    a.ref_dir = Path(a.ref_dir).resolve()
    return a


class Runner:
    def __init__(self, a):
        self.a = a
        self.session = utc_now()
        self.out = Path(a.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.examples = {}  # kind -> exact command line
        self.ref = a.ref_dir / "torch_qwen3_ref.py"
        self.clean_run = a.ref_dir / "scripts" / "clean_run.py"
        for p in [self.ref] + ([] if a.no_clean else [self.clean_run]):
            if not p.is_file():
                sys.exit(f"[cpu_vs_torch] missing {p} (see --ref-dir)")
        self.wait_for_binary()
        self.bin_mtime = a.opdlm.stat().st_mtime
        self.bin_changed = False

    def wait_for_binary(self, timeout=180):
        """The binary may be mid-rebuild (someone else's cmake): wait a little for it to reappear."""
        t0 = time.time()
        while not os.access(self.a.opdlm, os.X_OK):
            if time.time() - t0 > timeout:
                sys.exit(f"[cpu_vs_torch] opdlm binary {self.a.opdlm} not found / not executable (see --opdlm)")
            log(f"waiting for {self.a.opdlm} to appear ...")
            time.sleep(10)

    def runs_for(self, size):
        if self.a.runs is not None:
            return self.a.runs
        return 5 if size == "medium" else 7

    def opdlm_cmd(self, mode, size):
        return [str(self.a.opdlm), "--mode", mode, "--size", size, "--threads", str(self.a.threads),
                "--runs", str(self.runs_for(size)), "--warmup", str(self.a.warmup)]

    def torch_cmd(self, mode, size):
        return [self.a.python, str(self.ref), "--mode", mode, "--size", size, "--threads", str(self.a.threads),
                "--blas", "openmp", "--runs", str(self.runs_for(size)), "--warmup", str(self.a.warmup)]

    def wrap(self, cmd):
        if self.a.no_clean:
            return cmd
        return [self.a.python, str(self.clean_run), "--tries", str(self.a.tries), "--"] + cmd

    def run(self, kind, cmd, tags):
        """Run one (wrapped) command, return its parsed JSON line (annotated with tags); exit 1 on failure."""
        if kind == "opdlm" or kind == "sgemm":
            self.wait_for_binary()
            m = self.a.opdlm.stat().st_mtime
            if m != self.bin_mtime:
                log(f"WARNING: {self.a.opdlm} changed during the session (rebuilt?): results mix two binaries")
                self.bin_changed = True
                self.bin_mtime = m
        full = self.wrap(cmd)
        self.examples.setdefault(kind, shlex.join(full))
        what = f"{kind:5s} {tags.get('which', '')}" if kind == "sgemm" else f"{kind:5s} {tags['mode']} {tags['size']}"
        if "round" in tags:
            what += f" round {tags['round']}/{self.a.rounds}"
        log(f"start {what}")
        t0 = time.time()
        p = subprocess.run(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        dt = time.time() - t0
        lines = [l for l in p.stdout.splitlines() if l.strip().startswith("{")]
        if p.returncode != 0 or not lines:
            why = f"exit code {p.returncode}" if p.returncode != 0 else "no JSON line on stdout"
            tail = "\n".join(p.stderr.splitlines()[-30:])
            print(f"[cpu_vs_torch] FAILED ({why}) after {dt:.1f} s: {shlex.join(full)}\n"
                  f"--- stderr tail ---\n{tail}\n--- stdout tail ---\n{p.stdout[-2000:]}", file=sys.stderr, flush=True)
            sys.exit(1)
        for l in p.stderr.splitlines():  # relay the noise guard's verdicts
            if l.startswith("clean_run:"):
                log("  " + l)
        try:
            d = json.loads(lines[-1])
        except ValueError as e:
            print(f"[cpu_vs_torch] FAILED (bad JSON: {e}): {shlex.join(full)}\n{lines[-1][:2000]}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        d.update(harness="cpu_vs_torch", session=self.session, side=kind, wall_s=round(dt, 2), **tags)
        if self.a.no_clean:
            d.setdefault("run_cmd", shlex.join(cmd))
        with open(self.out, "a") as f:
            f.write(json.dumps(d) + "\n")
        val = d.get("gflops_best_median") if kind == "sgemm" else d.get("tokens_per_s_median")
        unit = "GFLOP/s" if kind == "sgemm" else "tok/s"
        noise = "" if self.a.no_clean else (
            f", clean={d.get('clean')} foreign={d.get('foreign_pct')}% runq_wait={d.get('runq_wait_pct')}%"
            f" attempts={d.get('attempts')}")
        log(f"done  {what} in {dt:.1f} s: {fmt(val) if isinstance(val, (int, float)) else val} {unit}{noise}")
        return d

    def sgemm(self, which):
        # 7 timed calls per shape (~2 s in all) unless --runs was given explicitly (--quick does not count)
        cmd = [str(self.a.opdlm), "--mode", "sgemm", "--threads", str(self.a.threads),
               "--runs", str(self.a.runs if self.a.runs_explicit else 7)]
        return self.run("sgemm", cmd, {"mode": "sgemm", "which": which})


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt(x):
    if x is None or x != x:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}"


def pct(x):
    return "–" if x is None or x != x else f"{100 * x:.0f} %"


def main():
    a = parse_args()
    if a.from_jsonl:
        return summarize(a, *from_jsonl(a))
    r = Runner(a)
    plan = []
    for mode in a.modes:
        for size in (a.sizes if a.sizes is not None else DEFAULT_SIZES[mode]):
            plan.append((mode, size))
    n_runs = 2 + 2 * a.rounds * len(plan)
    log(f"session {r.session}: {len(plan)} (mode, size) pairs x {a.rounds} rounds, {n_runs} processes, "
        f"threads={a.threads}, {'no clean_run' if a.no_clean else f'clean_run --tries {a.tries}'}; "
        f"opdlm={a.opdlm}, ref={r.ref}, raw lines -> {r.out}")
    t_start = time.time()

    sg = [r.sgemm("first")]
    rows = []
    for mode, size in plan:
        pairs = []
        for rnd in range(1, a.rounds + 1):
            order = ("opdlm", "torch") if rnd % 2 == 1 else ("torch", "opdlm")
            res = {}
            for slot, side in enumerate(order):
                cmd = r.opdlm_cmd(mode, size) if side == "opdlm" else r.torch_cmd(mode, size)
                res[side] = r.run(side, cmd, {"mode": mode, "size": size, "round": rnd,
                                              "order": "/".join(order), "slot": slot + 1})
            pairs.append(res)
        rows.append((mode, size, pairs))
    sg.append(r.sgemm("last"))
    info = dict(session=r.session, examples=r.examples, bin_mtime=r.bin_mtime, bin_changed=r.bin_changed,
                elapsed=time.time() - t_start, out=r.out)

    return summarize(a, rows, sg, info)


def from_jsonl(a):
    """(rows, sg, info) of one session's raw lines, as main() collects them."""
    lines = [json.loads(l) for l in open(a.from_jsonl) if l.strip().startswith("{")]
    lines = [d for d in lines if d.get("harness") == "cpu_vs_torch" and d.get("bench") != "cpu_vs_torch_summary"]
    sessions = [d["session"] for d in lines]
    if not sessions:
        sys.exit(f"[cpu_vs_torch] {a.from_jsonl}: no raw lines of cpu_vs_torch")
    session = a.session or sessions[-1]
    lines = [d for d in lines if d["session"] == session]
    if not lines:
        sys.exit(f"[cpu_vs_torch] {a.from_jsonl}: no lines of session {session} (have: {sorted(set(sessions))})")
    sg = [d for d in lines if d["side"] == "sgemm"]
    rows, pairs = [], {}
    for d in lines:
        if d["side"] in ("opdlm", "torch"):
            key = (d["mode"], d["size"])
            if key not in pairs:
                pairs[key] = {}
                rows.append((d["mode"], d["size"], []))
            pairs[key].setdefault(d["round"], {})[d["side"]] = d
    rows = [(m, z, [pairs[(m, z)][k] for k in sorted(pairs[(m, z)]) if len(pairs[(m, z)][k]) == 2]) for m, z, _ in rows]
    a.rounds = max(len(p) for _, _, p in rows)
    examples = {}
    for d in lines:
        examples.setdefault(d["side"], d.get("run_cmd", "?"))
    info = dict(session=session, examples=examples, bin_mtime=None, bin_changed=False,
                elapsed=sum(d.get("wall_s", 0) for d in lines), out=None)
    return rows, sg, info


def session_line(a, info):
    line = f"session {info['session']}, {a.rounds} round(s) per row (A/B then B/A), {info['elapsed'] / 60:.1f} min"
    if info["bin_mtime"] is None:
        return line + "."
    mtime = datetime.datetime.fromtimestamp(info["bin_mtime"]).isoformat(timespec="seconds")
    rebuilt = "; **it was rebuilt during the session: rows mix two binaries**" if info["bin_changed"] else ""
    return line + f"; opdlm binary {a.opdlm} (mtime {mtime}{rebuilt})."


def summarize(a, rows, sg, info):
    """The table (stdout, --table) and the summary line (appended to the raw file)."""
    peak_vals = [d.get("gflops_best_median") for d in sg]
    peak = max(v for v in peak_vals if v is not None)

    # ---- summary --------------------------------------------------------------------------------------
    summary_rows, met, total = [], 0, 0
    for mode, size, pairs in rows:
        o = [p["opdlm"]["tokens_per_s_median"] for p in pairs]
        t = [p["torch"]["tokens_per_s_median"] for p in pairs]
        ratios = [x / y for x, y in zip(o, t)]
        row = dict(mode=mode, size=size, opdlm_tok_s=med(o), torch_tok_s=med(t),
                   ratio=med(o) / med(t), round_ratios=ratios, pair_ratio=med(ratios), ratio_min=min(ratios),
                   ratio_max=max(ratios),
                   opdlm_tok_s_rounds=o, torch_tok_s_rounds=t)
        if mode == "train":
            og = med([p["opdlm"]["gflops_median"] for p in pairs])
            tg = med([p["torch"]["gflops_median"] for p in pairs])
            row.update(opdlm_gflops=og, torch_gflops=tg, opdlm_mfu=og / peak, torch_mfu=tg / peak)
            fo = pairs[0]["opdlm"].get("flops_per_step")
            ft = pairs[0]["torch"].get("flops_per_step")
            if fo and ft and abs(fo / ft - 1) > 1e-3:
                log(f"WARNING: train {size}: flops_per_step differs (opdlm {fo:.4g}, torch {ft:.4g})")
        if all(p[s].get("clean") is None for p in pairs for s in ("opdlm", "torch")):
            row["clean"] = None
        else:
            cl = [p[s].get("clean") is True for p in pairs for s in ("opdlm", "torch")]
            row["clean"] = all(cl)
            row["clean_count"] = f"{sum(cl)}/{len(cl)}"
            row["foreign_pct_max"] = max(p[s].get("foreign_pct", 0) for p in pairs for s in ("opdlm", "torch"))
        goal = GOALS.get((mode, size))
        if goal is not None:
            row["goal"] = goal
            # Met only if both the ratio of the medians and the median of the A/B pairs' ratios reach it.
            row["goal_met"] = min(row["ratio"], row["pair_ratio"]) >= goal
            total += 1
            met += row["goal_met"]
        mg = MFU_GOALS.get((mode, size))
        if mg is not None:
            row["mfu_goal"] = mg
            row["mfu_goal_met"] = row["opdlm_mfu"] >= mg
            total += 1
            met += row["mfu_goal_met"]
        summary_rows.append(row)

    hdr = ("| mode | size | opdlm tok/s | torch tok/s | ratio of medians | A/B pair ratios: median [min–max] "
           "| goal | met | opdlm MFU | torch MFU | clean |")
    lines = [hdr, "|" + "---|" * 11]
    for row in summary_rows:
        goal, metc = [], []
        if "goal" in row:
            goal.append(f"≥ {row['goal']:g}×")
            metc.append("yes" if row["goal_met"] else "**no**")
        if "mfu_goal" in row:
            goal.append(f"MFU ≥ {row['mfu_goal']:.0%}")
            metc.append(("yes" if row["mfu_goal_met"] else "**no**") + " (MFU)")
        rng = f"{row['ratio']:.2f}× | {row['pair_ratio']:.2f}× [{row['ratio_min']:.2f}–{row['ratio_max']:.2f}]"
        if row["clean"] is None:
            clean = "n/a"
        else:
            clean = "yes" if row["clean"] else f"**no** ({row['clean_count']})"
        lines.append(f"| {row['mode']} | {row['size']} | {fmt(row['opdlm_tok_s'])} | {fmt(row['torch_tok_s'])} "
                     f"| {rng} | {', '.join(goal) or '–'} | {', '.join(metc) or '–'} "
                     f"| {pct(row.get('opdlm_mfu'))} | {pct(row.get('torch_mfu'))} | {clean} |")
    elapsed = info["elapsed"]
    notes = []
    for mode, size, pairs in rows:
        po, pt = pairs[0]["opdlm"], pairs[0]["torch"]
        if mode != "train" and po.get("prefill_included") and "prefill_s_median" in pt:
            notes.append(f"{mode} {size}: opdlm's tok/s include the prompt prefill, torch's exclude it "
                         f"(prefill {pt['prefill_s_median'] * 1e3:.0f} ms, not counted) -- the ratio is conservative.")
        if mode == "bd-decode" and po.get("bd_commit") != pt.get("bd_commit"):
            notes.append(f"{mode} {size}: commit differs: opdlm '{po.get('bd_commit')}' "
                         f"({po.get('forwards')} forwards), torch '{pt.get('bd_commit')}' ({pt.get('forwards')} forwards).")
    if notes:
        lines += ["", "Notes:", ""] + [f"* {n}" for n in notes]
    lines += [
        "",
        f"sgemm peak (opdlm binary's OpenBLAS, {a.threads} threads, best median over shapes): "
        f"**{peak:.1f} GFLOP/s** (first {peak_vals[0]:.1f}, last {peak_vals[1]:.1f}); MFU = train GFLOP/s "
        f"(median over rounds) / peak.",
        f"goals met: {met} of {total} (a ratio goal counts as met when the ratio of the medians and the median "
        f"of the A/B pairs' ratios both reach it)",
        session_line(a, info),
        "",
        "Commands (one example of each):",
        "",
    ] + [f"* {k}: `{v}`" for k, v in info["examples"].items()]
    table = "\n".join(lines) + "\n"
    print(table, end="", flush=True)
    if a.table:
        Path(a.table).parent.mkdir(parents=True, exist_ok=True)
        Path(a.table).write_text(table)

    if info["out"] is None:  # --from-jsonl: nothing to append
        return 0
    summary = dict(bench="cpu_vs_torch_summary", harness="cpu_vs_torch", session=info["session"], date=utc_now(),
                   threads=a.threads, rounds=a.rounds, runs=a.runs, warmup=a.warmup, tries=a.tries,
                   clean_run=not a.no_clean, quick=a.quick, opdlm_bin=str(a.opdlm), ref_dir=str(a.ref_dir),
                   sgemm_peak_gflops=peak, sgemm_first_gflops=peak_vals[0], sgemm_last_gflops=peak_vals[1],
                   opdlm_bin_changed=info["bin_changed"], rows=summary_rows, goals_met=met, goals_total=total,
                   elapsed_s=round(elapsed, 1), commands=info["examples"])
    with open(info["out"], "a") as f:
        f.write(json.dumps(summary) + "\n")
    log(f"goals met: {met} of {total}; raw lines + summary appended to {info['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
