#!/usr/bin/python3
"""opdlm_logs.py -- offline analysis of `opdlm train` run directories, for a login node after the job.

    tools/opdlm_logs.py summary RUN [RUN...] [--json]        the first table: steps, tokens, time, throughput,
                                                             final metrics, checkpoints, restarts
    tools/opdlm_logs.py stitch RUN [--json] [--out FILE]     the attempts of a preempted run: committed steps
                                                             (each once), goodput, work lost per preemption,
                                                             checkpoint overhead; --out writes the merged curve
    tools/opdlm_logs.py compare RUN... [--x tokens|flops] [--metric loss] [--at X,...]
                                [--threshold 'own_state_kl<=0.05']... [--json]
                                                             a metric against training tokens or FLOPs for several
                                                             runs; tokens (and FLOPs) to a threshold
    tools/opdlm_logs.py plot RUN... --out DIR                PNGs: loss, state KL, accuracy, throughput, per-rank
                                                             step-time percentiles, attempt timeline
    tools/opdlm_logs.py rollouts RUN|FILE [--step N] [--index K] [--list]
                                                             a saved rollout token by token with the denoising
                                                             round that committed each token, and per round
    tools/opdlm_logs.py report RUN --out report.html         one self-contained HTML page (inline CSS, PNGs as
                                                             data URIs, no external URL): summary, attempts,
                                                             plots, a few rollouts

Reads RUN/metrics.jsonl (the committed history: the trainer cuts it back to the checkpoint on every
resume), RUN/metrics.lost.jsonl (the lines those cuts removed, tagged with "lost_in_attempt" and
"lost_by" = restart | rollback) and RUN/rollouts.jsonl. The contract and every definition below are
in docs/logs.md. Every figure comes from those files; a missing or malformed file is an error that
names the file and line (and the field), exit 1. A torn last line (a writer killed mid-line) is
skipped with a warning.

Definitions (docs/logs.md):
  * attempt: one start of the trainer in RUN (the "attempt" field). Its allocated wall time runs from
    its start/resume line to its last line in either file. This under-counts: queueing, the launch and
    the model/data loading before the start line, and the time between its last line and its death
    are not in the logs.
  * committed step: a step line of metrics.jsonl at or before the last committed checkpoint (or any
    step of a run that wrote its `end` line). Steps after it are "pending": the next resume loses them.
  * committed compute = sum over committed step lines of timings.step_s (the RL step's wall time on
    rank 0: rollouts, teacher, student, optimizer; not the probe, model saves or checkpoint saves).
  * goodput = committed compute / allocated wall time (sum over attempts).
  * work lost per preemption: per attempt, the step lines lost_by "restart" (its steps after its last
    committed checkpoint), their step seconds, and the time from its last checkpoint (or its start) to
    its last line.
  * checkpoint overhead = sum of the `seconds` of every checkpoint save (in both files) / allocated.

Libraries: the Python 3 standard library for reading and every number; Debian's python3-matplotlib
(Agg backend, no display) for the PNGs and python3-jinja2 (autoescaping) for the HTML page. Both are
imported only by `plot` and `report`, so the text tools run on any Python 3.9+.
"""
import argparse
import base64
import collections
import datetime
import io
import json
import math
import os
import re
import sys

WARNINGS = []
FLOP_KEYS = ("rollout_flops", "teacher_flops", "student_forward_flops", "student_backward_flops")
# Events whose count the summary reports (what went wrong or was noteworthy).
NOTABLE = ("nonfinite", "spike", "rollback", "skip_batch", "skip", "hang", "milestone")


class LogError(Exception):
    pass


def warn(msg):
    if msg not in WARNINGS:
        WARNINGS.append(msg)


# ---- reading ---------------------------------------------------------------------------------------
class Rec(dict):
    """One JSON line, remembering where it came from (for error messages)."""
    __slots__ = ("file", "line")

    @property
    def where(self):
        return f"{self.file}:{self.line}"

    @property
    def event(self):
        return self["event"]


def read_jsonl(path, required=True, need_event=True):
    """The JSON objects of a JSONL file as Recs. Missing and required, unreadable, or a bad line: LogError."""
    if not os.path.exists(path):
        if required:
            raise LogError(f"{path}: missing file")
        return []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror}")
    chunks = data.split(b"\n")
    torn_tail = not data.endswith(b"\n")  # the last chunk has no newline: possibly cut mid-write
    out = []
    for n, raw in enumerate(chunks, 1):
        if not raw.strip():
            continue
        last = n == len(chunks)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            if last and torn_tail:
                warn(f"{path}:{n}: skipped a torn last line (the writer was killed mid-line)")
                continue
            raise LogError(f"{path}:{n}: not a JSON line: {e}")
        if not isinstance(obj, dict):
            raise LogError(f"{path}:{n}: not a JSON object")
        if need_event and not isinstance(obj.get("event"), str):
            raise LogError(f"{path}:{n}: no 'event' field")
        r = Rec(obj)
        r.file, r.line = path, n
        out.append(r)
    return out


def get_path(rec, dotted):
    """rec["a"]["b"] for "a.b", or None when any part is absent."""
    v = rec
    for part in dotted.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def num(rec, field, required=False, integer=False):
    """A numeric field (dotted path) of a line; None when absent or null unless required. Wrong type: LogError."""
    v = get_path(rec, field)
    if v is None:
        if required:
            raise LogError(f"{rec.where}: '{rec.event}' line has no '{field}'")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        kind = "an integer" if integer else "a number"
        raise LogError(f"{rec.where}: '{rec.event}' line: '{field}' is {json.dumps(v)[:40]}, not {kind}")
    return v


def rl_step(rec):
    return num(rec, "rl_step", required=True, integer=True)


class Run:
    """A run directory: its metrics, lost lines and (lazily) the stitched view."""

    def __init__(self, path, label=None):
        if not os.path.isdir(path):
            raise LogError(f"{path}: not a directory (expected a run directory, RUN = --run.out_dir)")
        self.path = os.path.normpath(path)
        self.label = label or os.path.basename(os.path.abspath(self.path))
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        self.lost_path = os.path.join(self.path, "metrics.lost.jsonl")
        self.lines = read_jsonl(self.metrics_path)
        if not self.lines:
            raise LogError(f"{self.metrics_path}: empty (no metrics line)")
        self.lost = read_jsonl(self.lost_path, required=False)
        for r in self.lost:
            num(r, "lost_in_attempt", required=True, integer=True)
        if os.path.exists(self.metrics_path + ".before_restart") and not self.lost:
            warn(f"{self.metrics_path}.before_restart exists but {self.lost_path} does not: the work of that "
                 "restart is not counted as lost (a log from a trainer before docs/logs.md's lost lines)")
        self.start = next((r for r in self.lines if r.event == "start"), None)
        if self.start is not None and self.start.get("mode") == "ar":
            raise LogError(f"{self.start.where}: the log of an AR-mode run (--mode ar); these tools read the "
                           "conversion modes' logs (opd, rm-kl, rm-ce)")
        self.timed = self._assign_attempts()
        self._stitched = None

    def _assign_attempts(self):
        """Gives every line an integer '_attempt'; True when the log has the time/attempt stamps."""
        stamped = any("attempt" in r for r in self.lines)
        if stamped:
            for recs in (self.lines, self.lost):
                prev = 0
                for r in recs:
                    if "attempt" in r:
                        prev = num(r, "attempt", integer=True)
                    else:
                        warn(f"{r.where}: '{r.event}' line has no 'attempt' (taken from the line before)")
                    r["_attempt"] = prev
                    num(r, "time")  # type check
            missing = [r for r in self.lines + self.lost if r.get("time") is None]
            if missing:
                warn(f"{missing[0].where}: '{missing[0].event}' line has no 'time'"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            return True
        # An older log: one attempt per start/resume line; no times, no lost lines.
        a = -1
        for r in self.lines:
            if r.event in ("start", "resume"):
                a += 1
            r["_attempt"] = max(a, 0)
        for r in self.lost:
            r["_attempt"] = r["lost_in_attempt"]
        warn(f"{self.metrics_path}: no 'attempt'/'time' fields (a log from an older trainer): attempts come from "
             "start/resume lines; goodput, lost work and wall times need the stamps")
        return False

    def stitched(self):
        if self._stitched is None:
            self._stitched = Stitched(self)
        return self._stitched


def step_seconds(rec):
    return num(rec, "timings.step_s")


def flops_of(rec):
    """Cumulative FLOPs of a step line's budget (all four counters), None if any is missing."""
    vals = [num(rec, "budget." + k) for k in FLOP_KEYS]
    return None if any(v is None for v in vals) else float(sum(vals))


def tokens_of(rec):
    if rec.event == "step":
        return num(rec, "budget.train_tokens", required=True)
    return num(rec, "train_tokens")


class Stitched:
    """The committed history of a run and its attempts (docs/logs.md, "stitch")."""

    def __init__(self, run):
        self.run = run
        kept, probes, evals = {}, {}, []
        self.dropped = []     # step lines a later resume line superseded (a log that was not cut back)
        self.replaced = 0     # duplicate step lines with no resume between them (the later one is kept)
        raw = [rl_step(r) for r in run.lines if r.event == "step"]
        self.raw_duplicates = len(raw) - len(set(raw))
        for r in run.lines:
            ev = r.event
            back = None
            if ev == "resume":
                back = rl_step(r)
            elif ev == "rollback":
                back = num(r, "to_rl_step", required=True, integer=True)
            elif ev == "start" and kept:
                back = 0
            if back is not None:
                for s in [s for s in kept if s > back]:
                    self.dropped.append(kept.pop(s))
                for s in [s for s in probes if s > back]:
                    probes.pop(s)
                evals = [e for e in evals if (num(e, "rl_step", integer=True) or 0) <= back]
            elif ev == "step":
                s = rl_step(r)
                tokens_of(r)
                if s in kept:
                    self.replaced += 1
                    del kept[s]
                kept[s] = r
            elif ev == "probe":
                probes[rl_step(r)] = r
            elif ev == "eval":
                evals.append(r)
        self.end = next((r for r in reversed(run.lines) if r.event == "end"), None)
        ckpts = [rl_step(r) for r in run.lines if r.event == "checkpoint"]
        if self.end is not None:
            self.committed_step = max(kept, default=0)
        else:
            self.committed_step = max(ckpts, default=0)
        steps = sorted(kept)
        self.curve = [kept[s] for s in steps if s <= self.committed_step]
        self.pending = [kept[s] for s in steps if s > self.committed_step]
        self.probes = [probes[s] for s in sorted(probes) if s <= self.committed_step]
        self.evals = [e for e in evals if (num(e, "rl_step", integer=True) or 0) <= self.committed_step]
        # Steps each logged line stands for (run.log_every > 1 logs every k-th step).
        prev = 0
        self.covers = {}
        for r in self.curve:
            s = rl_step(r)
            self.covers[s] = s - prev
            prev = s
        self.estimated = any(c != 1 for c in self.covers.values())
        self.gaps = self.committed_step - len(self.curve) if self.curve else 0
        self.saves = self._checkpoint_saves()
        self.attempts = self._attempts()
        self.totals = self._totals()

    def _checkpoint_saves(self):
        """Checkpoint lines that are saves: not the re-announcement written just before a resume/rollback line."""
        saves = []
        for recs in (self.run.lines, self.run.lost):
            for i, r in enumerate(recs):
                if r.event != "checkpoint":
                    continue
                nxt = recs[i + 1] if i + 1 < len(recs) else None
                if nxt is not None and nxt.event in ("resume", "rollback"):
                    continue
                rl_step(r)
                num(r, "seconds")
                saves.append(r)
        return saves

    def _attempts(self):
        run = self.run
        ids = sorted({r["_attempt"] for r in run.lines} | {r["_attempt"] for r in run.lost}
                     | {r["lost_in_attempt"] for r in run.lost})
        committed_by, lines_of = collections.defaultdict(list), collections.defaultdict(list)
        for r in self.curve:
            committed_by[r["_attempt"]].append(r)
        for r in run.lines + run.lost:
            lines_of[r["_attempt"]].append(r)
        out = []
        for a in ids:
            mine = lines_of[a]
            opener = next((r for r in mine if r.event in ("start", "resume")), None)
            times = [r["time"] for r in mine if r.get("time") is not None]
            t_open = None
            basis = "start/resume line"
            if opener is not None and num(opener, "slurm_job_start_time") is not None:
                t_open, basis = float(opener["slurm_job_start_time"]), "SLURM job start"
            elif opener is not None and opener.get("time") is not None:
                t_open = opener["time"]
            elif times:
                t_open, basis = min(times), "first line (no start/resume line)"
            t_last = max(times) if times else None
            end = next((r for r in mine if r.event == "end"), None)
            stop = next((r for r in mine if r.event == "stop"), None)
            if end is not None:
                status = "finished"
            elif stop is not None:
                status = "stopped (" + str(stop.get("reason", "?")) + ")"
            elif a != ids[-1]:
                status = "killed"
            else:
                status = "running or killed"
            steps_all = [rl_step(r) for r in mine if r.event == "step"]
            lost = [r for r in run.lost if r["lost_in_attempt"] == a and r.event == "step"]
            lost_restart = [r for r in lost if r.get("lost_by", "restart") != "rollback"]
            lost_rollback = [r for r in lost if r.get("lost_by") == "rollback"]
            dropped = [r for r in self.dropped if r["_attempt"] == a]  # an uncut log's superseded steps
            lost_restart += dropped
            saves = [r for r in self.saves if r["_attempt"] == a]
            save_times = [r["time"] for r in saves if r.get("time") is not None]
            last_safe = max(save_times) if save_times else t_open
            committed = committed_by.get(a, [])
            committed_s = self._sum_step_s(committed, weighted=True)
            pending = [r for r in self.pending if r["_attempt"] == a]
            ckpt_s = [num(r, "seconds") for r in saves]
            rec = {
                "attempt": a,
                "host": opener.get("host") if opener else None,
                "slurm_job_id": (opener.get("slurm_job_id") or None) if opener else None,
                "from_step": (rl_step(opener) if opener.event == "resume" else 0) if opener else None,
                "last_step": max(steps_all, default=None),
                "status": status,
                "start_time": t_open,
                "start_basis": basis,
                "end_time": t_last,
                "wall_s": (t_last - t_open) if t_open is not None and t_last is not None else None,
                "committed_steps": len(committed),
                "committed_step_s": committed_s,
                "pending_steps": len(pending),
                "lost_steps": len(lost_restart),
                "lost_step_s": self._sum_step_s(lost_restart),
                "rollback_lost_steps": len(lost_rollback),
                "rollback_lost_step_s": self._sum_step_s(lost_rollback),
                "last_checkpoint_step": max((rl_step(r) for r in saves), default=None),
                "since_checkpoint_s": (t_last - last_safe) if t_last is not None and last_safe is not None else None,
                "checkpoint_saves": len(saves),
                "checkpoint_s": sum(ckpt_s) if ckpt_s and all(v is not None for v in ckpt_s) else (0.0 if not ckpt_s else None),
            }
            out.append(rec)
        return out

    def _sum_step_s(self, recs, weighted=False):
        total = 0.0
        for r in recs:
            s = step_seconds(r)
            if s is None:
                return None
            total += s * (self.covers.get(rl_step(r), 1) if weighted else 1)
        return total

    def _totals(self):
        at = self.attempts
        walls = [a["wall_s"] for a in at]
        allocated = sum(walls) if walls and all(w is not None for w in walls) else None
        committed_s = self._sum_step_s(self.curve, weighted=True)
        ckpts = [a["checkpoint_s"] for a in at]
        ckpt_s = sum(ckpts) if all(c is not None for c in ckpts) else None
        preempted = [a for a in at if a["status"] != "finished" and a is not at[-1]]

        def ratio(x, y):
            return x / y if x is not None and y not in (None, 0) else None
        steps = [rl_step(r) for r in self.curve]
        return {
            "attempts": len(at),
            "preemptions": len(preempted),
            "committed_steps": len(self.curve),
            "committed_step": self.committed_step,
            "first_step": steps[0] if steps else None,
            "each_step_once": len(steps) == len(set(steps)) and steps == sorted(steps),
            # step lines of metrics.jsonl for an RL step logged before (0 when the trainer cut the log)
            "duplicate_step_lines_in_log": self.raw_duplicates,
            "missing_steps": self.gaps,
            "pending_steps": len(self.pending),
            "committed_step_s": committed_s,
            "compute_estimated": self.estimated,
            "allocated_s": allocated,
            "goodput": ratio(committed_s, allocated),
            "lost_steps": sum(a["lost_steps"] for a in at),
            "lost_step_s": None if any(a["lost_step_s"] is None for a in at) else sum(a["lost_step_s"] for a in at),
            "rollback_lost_steps": sum(a["rollback_lost_steps"] for a in at),
            "checkpoint_saves": len(self.saves),
            "checkpoint_s": ckpt_s,
            "checkpoint_overhead": ratio(ckpt_s, allocated),
            "superseded_lines": len(self.dropped),
            "replaced_duplicates": self.replaced,
        }


# ---- formatting ------------------------------------------------------------------------------------
def fmt_s(s):
    if s is None:
        return "n/a"
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    t = int(round(s))
    if t < 3600:
        return f"{t // 60}m{t % 60:02d}s"
    return f"{t // 3600}h{t % 3600 // 60:02d}m{t % 60:02d}s"


def fmt_n(x, digits=4):
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1e6 or a < 1e-3:
        return f"{x:.3e}"
    if a >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt_pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(rows, header):
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def clean(obj):
    """JSON-safe (no NaN/inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def percentile(xs, q):
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    f = int(math.floor(k))
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


# ---- summary ---------------------------------------------------------------------------------------
def rank_times(st):
    """Per world rank p50/p90/max of step_time_by_rank (or busy_s_by_rank) over committed steps."""
    field = None
    for name in ("step_time_by_rank", "busy_s_by_rank"):
        if any(name in r for r in st.curve):
            field = name
            break
    if field is None:
        return None
    per = collections.defaultdict(list)
    for r in st.curve:
        v = r.get(field)
        if v is None:
            continue
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise LogError(f"{r.where}: 'step' line: '{field}' is not a list of numbers")
        for i, x in enumerate(v):
            per[i].append(float(x))
    ranks = sorted(per)
    rows = [{"rank": i, "p50": percentile(per[i], 50), "p90": percentile(per[i], 90), "max": max(per[i]),
             "n": len(per[i])} for i in ranks]
    p50s = [x["p50"] for x in rows]
    med = percentile(p50s, 50)
    slow = max(rows, key=lambda x: x["p50"]) if rows else None
    return {"field": field, "ranks": rows,
            "slowest_rank": slow["rank"] if slow else None,
            "slowest_over_median": (slow["p50"] / med) if slow and med else None}


def summarize(run):
    st = run.stitched()
    t = st.totals
    last = st.curve[-1] if st.curve else (st.pending[-1] if st.pending else None)
    start = run.start or {}
    par = start.get("parallel") or {}
    layout = last.get("layout") if last is not None and isinstance(last.get("layout"), dict) else par
    probe = next((p for p in reversed(st.probes) if p.get("own_state_kl") is not None), None)
    tokens = tokens_of(last) if last is not None else None
    flops = flops_of(last) if last is not None else None
    hosts = sorted({a["host"] for a in st.attempts if a["host"]})
    jobs = [a["slurm_job_id"] for a in st.attempts if a["slurm_job_id"]]
    mfus = [num(r, "mfu") for r in st.curve if num(r, "mfu") is not None]
    wall = t["allocated_s"]
    wall_basis = "sum of attempts (start/resume line to last line)"
    if wall is None:  # an older log: the longest elapsed_s of each attempt
        per = collections.defaultdict(float)
        for r in run.lines:
            e = num(r, "elapsed_s")
            if e is not None:
                per[r["_attempt"]] = max(per[r["_attempt"]], e)
        wall = sum(per.values()) if per else None
        wall_basis = "sum over attempts of the last elapsed_s (no time stamps)"
    latest = None
    latest_path = os.path.join(run.path, "checkpoints", "LATEST")
    if os.path.isfile(latest_path):
        with open(latest_path) as f:
            latest = f.read().strip()
    events = collections.Counter(r.event for r in run.lines)
    final_status = st.attempts[-1]["status"] if st.attempts else None
    rt = rank_times(st)
    final_loss = num(st.end, "final_loss") if st.end is not None else (num(last, "loss") if last is not None else None)
    s = collections.OrderedDict()
    s["run"] = run.path
    s["run_id"] = start.get("run_id") or (last.get("run_id") if last is not None else None)
    s["mode"] = start.get("mode")
    s["params"] = start.get("params")
    s["layout"] = f"TP {layout.get('tp', 1)} x DP {layout.get('dp', 1)}" if layout else None
    s["hosts"] = ", ".join(hosts) if hosts else None
    s["slurm_jobs"] = ", ".join(dict.fromkeys(str(j) for j in jobs)) if jobs else None
    s["status"] = final_status
    s["rl_steps"] = st.committed_step if st.curve else 0
    s["pending_steps"] = t["pending_steps"]
    s["optimizer_steps"] = num(last, "optimizer_steps") if last is not None else None
    s["train_tokens"] = tokens
    s["generated_tokens"] = num(last, "budget.generated_tokens") if last is not None else None
    s["rollouts"] = num(last, "budget.rollouts") if last is not None else None
    s["flops"] = flops
    s["wall_s"] = wall
    s["wall_basis"] = wall_basis
    s["step_s"] = t["committed_step_s"]
    s["tokens_per_s_wall"] = tokens / wall if tokens is not None and wall else None
    s["tokens_per_s_step"] = tokens / t["committed_step_s"] if tokens is not None and t["committed_step_s"] else None
    s["rollout_tokens_per_forward"] = num(last, "rollout_tokens_per_forward") if last is not None else None
    s["mfu_mean"] = sum(mfus) / len(mfus) if mfus else None
    s["final_loss"] = final_loss
    s["final_grad_norm"] = num(last, "grad_norm") if last is not None else None
    s["final_eos_rate"] = num(last, "eos_rate") if last is not None else None
    s["final_mean_response_len"] = num(last, "mean_response_len") if last is not None else None
    s["probe_step"] = rl_step(probe) if probe else None
    s["own_state_kl"] = num(probe, "own_state_kl") if probe else None
    s["random_state_kl"] = num(probe, "random_state_kl") if probe else None
    s["checkpoint_saves"] = t["checkpoint_saves"]
    s["last_committed_checkpoint"] = max((rl_step(r) for r in run.lines if r.event == "checkpoint"), default=None)
    s["latest"] = latest
    s["attempts"] = t["attempts"]
    s["preemptions"] = t["preemptions"]
    s["lost_steps"] = t["lost_steps"]
    s["goodput"] = t["goodput"]
    s["checkpoint_overhead"] = t["checkpoint_overhead"]
    s["events"] = {k: events[k] for k in NOTABLE if events[k]}
    s["ranks"] = len(rt["ranks"]) if rt else None
    s["slowest_rank"] = rt["slowest_rank"] if rt else None
    s["slowest_rank_p50_over_median"] = rt["slowest_over_median"] if rt else None
    return s


def summary_rows(s):
    """(label, value) pairs for the text and HTML tables."""
    ev = ", ".join(f"{k} {v}" for k, v in s["events"].items()) or "none"
    rows = [
        ("run", s["run"]), ("run id", s["run_id"] or "n/a"), ("mode", s["mode"] or "n/a"),
        ("parameters", fmt_n(s["params"])), ("layout", s["layout"] or "n/a"),
        ("hosts", s["hosts"] or "n/a"), ("Slurm jobs", s["slurm_jobs"] or "none"),
        ("status", s["status"] or "n/a"),
        ("RL steps (committed)", fmt_n(s["rl_steps"]) + (f" (+{s['pending_steps']} pending)" if s["pending_steps"] else "")),
        ("optimizer steps", fmt_n(s["optimizer_steps"])),
        ("training tokens", fmt_n(s["train_tokens"])), ("generated tokens", fmt_n(s["generated_tokens"])),
        ("rollouts", fmt_n(s["rollouts"])), ("FLOPs (rollout+teacher+student)", fmt_n(s["flops"])),
        ("wall time (allocated)" if s["goodput"] is not None or s["wall_s"] is None
         else "wall time (elapsed_s; no time stamps)", fmt_s(s["wall_s"])), ("step time (committed)", fmt_s(s["step_s"])),
        ("training tokens / s (wall)", fmt_n(s["tokens_per_s_wall"])),
        ("training tokens / s (step time)", fmt_n(s["tokens_per_s_step"])),
        ("rollout tokens / forward", fmt_n(s["rollout_tokens_per_forward"])),
        ("MFU (mean)", fmt_pct(s["mfu_mean"])),
        ("final loss", fmt_n(s["final_loss"])), ("final grad norm", fmt_n(s["final_grad_norm"])),
        ("final EOS rate", fmt_n(s["final_eos_rate"])), ("final mean response length", fmt_n(s["final_mean_response_len"])),
        (f"state KL own / random (probe at step {s['probe_step']})" if s["probe_step"] is not None else "state KL own / random",
         f"{fmt_n(s['own_state_kl'])} / {fmt_n(s['random_state_kl'])}"),
        ("checkpoint saves", fmt_n(s["checkpoint_saves"])),
        ("last committed checkpoint", ("step " + str(s["last_committed_checkpoint"]) if s["last_committed_checkpoint"] is not None
                                       else "none") + (f" (LATEST: {s['latest']})" if s["latest"] else "")),
        ("attempts / preemptions", f"{s['attempts']} / {s['preemptions']}"),
        ("lost RL steps", fmt_n(s["lost_steps"])),
        ("goodput", fmt_pct(s["goodput"])), ("checkpoint overhead", fmt_pct(s["checkpoint_overhead"])),
        ("events", ev),
    ]
    if s["slowest_rank"] is not None and s["slowest_rank_p50_over_median"] is not None and (s.get("ranks") or 0) > 1:
        rows.append(("slowest rank (p50 / median p50)", f"rank {s['slowest_rank']} ({s['slowest_rank_p50_over_median']:.2f}x)"))
    return rows


def cmd_summary(args):
    runs = [Run(p) for p in args.runs]
    out = [summarize(r) for r in runs]
    if args.json:
        print(json.dumps(clean(out if len(out) > 1 else out[0]), indent=1))
        return
    for i, s in enumerate(out):
        if i:
            print()
        print(table(summary_rows(s), ["", runs[i].label]))


# ---- stitch ----------------------------------------------------------------------------------------
def attempt_rows(st):
    rows = []
    for a in st.attempts:
        rows.append([a["attempt"], a["host"] or "-", a["slurm_job_id"] or "-",
                     "-" if a["from_step"] is None else a["from_step"],
                     "-" if a["last_step"] is None else a["last_step"], a["status"], fmt_s(a["wall_s"]),
                     a["committed_steps"], fmt_s(a["committed_step_s"]), a["lost_steps"], fmt_s(a["lost_step_s"]),
                     fmt_s(a["since_checkpoint_s"]), a["checkpoint_saves"], fmt_s(a["checkpoint_s"])])
    return rows


ATTEMPT_HEADER = ["attempt", "host", "job", "from", "to", "ended", "wall", "committed", "step time",
                  "lost", "lost time", "since ckpt", "ckpts", "ckpt time"]


def stitch_lines(st):
    t = st.totals
    first = t["first_step"]
    out = [
        f"committed: {t['committed_steps']} RL step lines"
        + (f" ({first}..{t['committed_step']}, each once)" if t["committed_steps"] else "")
        + (f", {t['missing_steps']} steps not logged (run.log_every > 1)" if t["missing_steps"] else "")
        + f", {fmt_s(t['committed_step_s'])} of step time" + (" (estimated from logged steps)" if t["compute_estimated"] else ""),
        f"allocated: {fmt_s(t['allocated_s'])} over {t['attempts']} attempt(s) (each from its start/resume line to its "
        "last line: queueing, launch and loading before the start line are not counted)",
        f"goodput: {fmt_pct(t['goodput'])} (committed step time / allocated)",
        f"lost to preemptions: {t['lost_steps']} RL step(s), {fmt_s(t['lost_step_s'])} of step time, "
        f"{t['preemptions']} preemption(s)",
        f"checkpoint overhead: {fmt_s(t['checkpoint_s'])} in {t['checkpoint_saves']} save(s) = "
        f"{fmt_pct(t['checkpoint_overhead'])} of allocated",
    ]
    if t["rollback_lost_steps"]:
        out.append(f"lost to roll-backs: {t['rollback_lost_steps']} RL step(s)")
    if t["pending_steps"]:
        out.append(f"pending: {t['pending_steps']} RL step(s) after the last committed checkpoint (step "
                   f"{t['committed_step']}); a resume redoes them")
    if t["superseded_lines"] or t["replaced_duplicates"]:
        out.append(f"merged: {t['superseded_lines']} step line(s) superseded by a later resume, "
                   f"{t['replaced_duplicates']} duplicate(s) replaced (a log that was not cut back on resume)")
    return out


def cmd_stitch(args):
    run = Run(args.run)
    st = run.stitched()
    if args.out:
        with open(args.out, "w") as f:
            merged = sorted(st.curve + st.probes + st.evals,
                            key=lambda r: (num(r, "rl_step", integer=True) or 0, r.event != "step"))
            for r in merged:
                f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")
    if args.json:
        print(json.dumps(clean({"run": run.path, "totals": st.totals, "attempts": st.attempts,
                                "warnings": WARNINGS}), indent=1))
        return
    print(f"run {run.path} (run id {(run.start or {}).get('run_id', 'n/a')})")
    print(table(attempt_rows(st), ATTEMPT_HEADER))
    print()
    print("\n".join(stitch_lines(st)))


# ---- compare ---------------------------------------------------------------------------------------
def metric_points(run, metric):
    """[(tokens, flops, value)] of a metric over the committed history, sorted by tokens."""
    st = run.stitched()
    for recs, kind in ((st.curve, "step"), (st.probes, "probe"), (st.evals, "eval")):
        if any(get_path(r, metric) is not None for r in recs):
            break
    else:
        raise LogError(f"{run.metrics_path}: no committed step, probe or eval line has '{metric}'")
    flops_at = {}
    for r in st.curve:
        flops_at[rl_step(r)] = flops_of(r)
    flops_at.setdefault(0, 0.0)
    step_pts = [(tokens_of(r), flops_of(r)) for r in st.curve]
    pts = []
    for r in recs:
        y = num(r, metric)
        if y is None:
            continue
        x = tokens_of(r)
        if x is None:
            raise LogError(f"{r.where}: '{r.event}' line has no 'train_tokens'")
        if kind == "step":
            f = flops_of(r)
        else:
            s = num(r, "rl_step", integer=True)
            f = flops_at.get(s) if s is not None else None
            if f is None:
                f = interp([(a, b) for a, b in step_pts if b is not None], x)
        pts.append((float(x), f, float(y)))
    pts.sort(key=lambda p: p[0])
    return pts


def interp(pts, x):
    """Linear interpolation of y at x in [(x, y)] sorted by x; None outside."""
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


THRESH = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|<|>)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")


def parse_threshold(text):
    m = THRESH.match(text)
    if not m:
        raise LogError(f"--threshold '{text}': expected METRIC<=VALUE or METRIC>=VALUE (e.g. own_state_kl<=0.05)")
    return m.group(1), m.group(2), float(m.group(3))


def crossing(pts, op, value):
    """The first (tokens, flops) at which the metric satisfies `op value`, linearly interpolated from the
    point before; {"reached": False} if never. pts: [(tokens, flops, y)]."""
    ok = {"<=": lambda y: y <= value, "<": lambda y: y < value, ">=": lambda y: y >= value, ">": lambda y: y > value}[op]
    for i, (t, f, y) in enumerate(pts):
        if not ok(y):
            continue
        if i == 0:
            return {"reached": True, "tokens": t, "flops": f, "at_first_point": True}
        t0, f0, y0 = pts[i - 1]
        frac = (value - y0) / (y - y0) if y != y0 else 1.0
        frac = min(max(frac, 0.0), 1.0)
        fl = f0 + frac * (f - f0) if f is not None and f0 is not None else None
        return {"reached": True, "tokens": t0 + frac * (t - t0), "flops": fl, "at_first_point": False}
    return {"reached": False, "tokens": pts[-1][0] if pts else None, "flops": pts[-1][1] if pts else None}


def compare(runs, metric, x, at, thresholds):
    xi = 0 if x == "tokens" else 1
    out = []
    for run in runs:
        pts = metric_points(run, metric)
        if x == "flops" and any(p[1] is None for p in pts):
            raise LogError(f"{run.metrics_path}: a step line has no budget FLOP counters ({', '.join(FLOP_KEYS)})")
        series = [(p[xi], p[2]) for p in pts]
        ys = [p[2] for p in pts]
        th = {}
        for text in thresholds:
            m, op, v = parse_threshold(text)
            tp = pts if m == metric else metric_points(run, m)
            th[text] = crossing(tp, op, v)
        out.append({"run": run.path, "label": run.label, "mode": (run.start or {}).get("mode"),
                    "points": series, "final_x": series[-1][0] if series else None,
                    "final": ys[-1] if ys else None, "min": min(ys) if ys else None, "max": max(ys) if ys else None,
                    "thresholds": th})
    if at is None:  # four evenly spaced budgets up to the smallest run's last x: all runs compared alike
        common = min((r["final_x"] for r in out if r["final_x"] is not None), default=None)
        at = [common * k / 4 for k in (1, 2, 3, 4)] if common else []
    for r in out:
        r["at"] = [[a, interp(r["points"], a)] for a in at]
    return {"metric": metric, "x": x, "at": at, "runs": out}


def cmd_compare(args):
    runs = [Run(p, label) for p, label in zip(args.runs, (args.labels or "").split(",") if args.labels else [None] * len(args.runs))]
    at = [float(v) for v in args.at.split(",")] if args.at else None
    res = compare(runs, args.metric, args.x, at, args.threshold or [])
    if args.json:
        res["warnings"] = WARNINGS
        print(json.dumps(clean(res), indent=1))
        return
    xname = "training tokens" if args.x == "tokens" else "FLOPs"
    print(f"{args.metric} against {xname}")
    rows = [[r["label"], r["mode"] or "-", len(r["points"]), fmt_n(r["final_x"]), fmt_n(r["final"]), fmt_n(r["min"])]
            + [fmt_n(v) for _, v in r["at"]] for r in res["runs"]]
    print(table(rows, ["run", "mode", "points", "last " + args.x, "final", "min"]
                + [f"@{fmt_n(a)}" for a in res["at"]]))
    if args.threshold:
        print()
        print("to threshold (tokens / FLOPs; interpolated linearly from the point before the crossing)")
        rows = []
        for r in res["runs"]:
            row = [r["label"]]
            for text in args.threshold:
                c = r["thresholds"][text]
                if c["reached"]:
                    pre = "<= " if c["at_first_point"] else ""
                    row.append(f"{pre}{fmt_n(c['tokens'])} / {fmt_n(c['flops'])}")
                else:
                    row.append(f"not reached (> {fmt_n(c['tokens'])})")
            rows.append(row)
        print(table(rows, ["run"] + args.threshold))


# ---- plots -----------------------------------------------------------------------------------------
def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise LogError(f"plots need python3-matplotlib (tools/install-deps.sh): {e}")
    return plt


def png(fig):
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def fig_metric(runs, metrics, title, ylabel, logy=False):
    """One line per run (and per metric, dashed for the second): metric against training tokens."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    styles = ["-", "--", ":", "-."]
    drawn = 0
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for j, m in enumerate(metrics):
            try:
                pts = metric_points(run, m)
            except LogError:
                continue
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[2] for p in pts], styles[j % 4], color=color, marker="." if len(pts) < 40 else None,
                    label=f"{run.label}: {m}" if len(runs) > 1 else m)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def accuracy_metrics(run):
    names = set()
    for r in run.stitched().evals:
        for k, v in r.items():
            if any(w in k for w in ("accuracy", "exact_match")) and isinstance(v, (int, float)) and not isinstance(v, bool):
                names.add(k)
    return sorted(names)


def throughput_points(run):
    """(tokens, training tokens per second of step time) per committed step; falls back on the trainer's
    attempt-local train_tokens_per_s when the steps have no timings."""
    st = run.stitched()
    pts, prev_tokens = [], 0.0
    for r in st.curve:
        tok = tokens_of(r)
        s = step_seconds(r)
        if s:
            pts.append((tok, (tok - prev_tokens) / (s * st.covers.get(rl_step(r), 1))))
        elif num(r, "train_tokens_per_s") is not None:
            pts.append((tok, num(r, "train_tokens_per_s")))
        prev_tokens = tok
    return pts


def fig_throughput(runs):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    drawn = 0
    for i, run in enumerate(runs):
        pts = throughput_points(run)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", lw=1, label=run.label)
        drawn += 1
        if len(runs) == 1:  # attempt boundaries
            for r in run.lines:
                if r.event == "resume":
                    t = next((tokens_of(c) for c in run.stitched().curve if rl_step(c) >= rl_step(r)), None)
                    if t is not None:
                        ax.axvline(t, color="grey", ls=":", lw=1)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training tokens / s of step time")
    ax.set_title("throughput (dotted: resumes)" if len(runs) == 1 else "throughput")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def fig_rank_times(run):
    rt = rank_times(run.stitched())
    if rt is None or not rt["ranks"]:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ranks = [x["rank"] for x in rt["ranks"]]
    for key, mk in (("p50", "o"), ("p90", "s"), ("max", "^")):
        ax.plot(ranks, [x[key] for x in rt["ranks"]], marker=mk if len(ranks) <= 32 else None,
                ls="-" if len(ranks) > 1 else "", label=key)
    ax.set_xlabel("world rank")
    if len(ranks) <= 32:
        ax.set_xticks(ranks)
    ax.set_ylabel("seconds per RL step")
    what = "step time" if rt["field"] == "step_time_by_rank" else "busy time (outside collectives)"
    ax.set_title(f"{run.label}: per-rank {what}, over {rt['ranks'][0]['n']} steps")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def fig_attempts(run):
    """Where each attempt's allocated time went: committed step time, step time lost to the preemption
    (or pending), checkpoint saves, and the rest (start-up after the start line, probes, model saves)."""
    st = run.stitched()
    at = [a for a in st.attempts if a["wall_s"] is not None]
    if not at:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.5 * len(at)))
    parts = (("committed steps", "C2"), ("lost / pending steps", "C3"), ("checkpoint saves", "k"), ("other", "0.8"))
    for a in at:
        pend = st._sum_step_s([r for r in st.pending if r["_attempt"] == a["attempt"]]) or 0.0
        vals = [a["committed_step_s"] or 0.0, (a["lost_step_s"] or 0.0) + pend, a["checkpoint_s"] or 0.0]
        vals.append(max(a["wall_s"] - sum(vals), 0.0))
        left = 0.0
        for (name, color), v in zip(parts, vals):
            ax.barh(a["attempt"], v, left=left, color=color, height=0.6, label=name if a is at[0] else None)
            left += v
        ax.text(left, a["attempt"], f"  {a['status']}, lost {a['lost_steps']} step(s)", va="center", fontsize=8)
    ax.set_yticks([a["attempt"] for a in at])
    ax.set_ylabel("attempt")
    ax.invert_yaxis()
    ax.set_xlabel("seconds of the attempt (start/resume line to last line)")
    ax.set_xlim(right=max(a["wall_s"] for a in at) * 1.45 + 1e-9)
    ax.set_title(f"{run.label}: attempts; goodput {fmt_pct(st.totals['goodput'])}, "
                 f"checkpoint overhead {fmt_pct(st.totals['checkpoint_overhead'])}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.6 / ((1.2 + 0.5 * len(at)) * 0.77)), ncol=4, frameon=False)
    ax.grid(alpha=0.3, axis="x")
    return png(fig)


def figures(runs):
    """[(file name, title, PNG bytes or None)] for `plot` and `report`."""
    out = [("loss.png", "loss", fig_metric(runs, ["loss"], "training loss", "loss")),
           ("kl.png", "state KL (probe)", fig_metric(runs, ["own_state_kl", "random_state_kl"],
                                                     "state-KL probe (solid: own states, dashed: random states)", "KL",
                                                     logy=True))]
    acc = sorted({m for r in runs for m in accuracy_metrics(r)})
    out.append(("accuracy.png", "accuracy", fig_metric(runs, acc, "accuracy", "accuracy") if acc else None))
    out.append(("throughput.png", "throughput", fig_throughput(runs)))
    for run in runs:
        sfx = "" if len(runs) == 1 else "_" + re.sub(r"[^\w.-]", "_", run.label)
        out.append((f"step_time_by_rank{sfx}.png", f"per-rank step time ({run.label})", fig_rank_times(run)))
        out.append((f"attempts{sfx}.png", f"attempts ({run.label})", fig_attempts(run)))
    return out


def cmd_plot(args):
    runs = [Run(p) for p in args.runs]
    os.makedirs(args.out, exist_ok=True)
    for name, title, data in figures(runs):
        if data is None:
            print(f"{name}: not written (no data for {title} in the logs)")
            continue
        path = os.path.join(args.out, name)
        with open(path, "wb") as f:
            f.write(data)
        print(path)


# ---- rollouts --------------------------------------------------------------------------------------
def load_rollouts(path):
    """The rollouts of RUN/rollouts.jsonl (or a file of that shape), each checked."""
    f = os.path.join(path, "rollouts.jsonl") if os.path.isdir(path) else path
    recs = read_jsonl(f, need_event=False)
    for r in recs:
        for k in ("rl_step", "sample_id"):
            v = r.get(k)
            if not isinstance(v, int) or isinstance(v, bool):
                raise LogError(f"{r.where}: rollout has no integer '{k}'")
        for k in ("response_ids", "step_map"):
            v = r.get(k)
            if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise LogError(f"{r.where}: rollout: '{k}' is not a list of integers")
        if len(r["step_map"]) != len(r["response_ids"]):
            raise LogError(f"{r.where}: rollout: 'step_map' has {len(r['step_map'])} entries, "
                           f"'response_ids' {len(r['response_ids'])}")
        pieces = r.get("response_pieces")
        if pieces is not None and (not isinstance(pieces, list) or len(pieces) != len(r["response_ids"])
                                   or not all(isinstance(p, str) for p in pieces)):
            raise LogError(f"{r.where}: rollout: 'response_pieces' is not a list of {len(r['response_ids'])} strings")
        bs = r.get("block_size")
        if bs is not None and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 1):
            raise LogError(f"{r.where}: rollout: 'block_size' is {json.dumps(bs)}, not a positive integer")
    return f, recs


def pick_rollout(path, recs, step, index):
    if not recs:
        raise LogError(f"{path}: no rollouts")
    steps = sorted({r["rl_step"] for r in recs})
    if step is None:
        step = steps[-1]
    mine = [r for r in recs if r["rl_step"] == step]
    if not mine:
        raise LogError(f"{path}: no rollout of RL step {step} (steps with rollouts: {', '.join(map(str, steps))})")
    if not 0 <= index < len(mine):
        raise LogError(f"{path}: RL step {step} has {len(mine)} rollout(s); --index {index} is out of range")
    return mine[index]


def pieces_of(r):
    return r.get("response_pieces") or [f"<{t}>" for t in r["response_ids"]]


def show(piece):
    """A token piece made visible on one line (newlines, tabs, leading/trailing spaces)."""
    return json.dumps(piece, ensure_ascii=False)[1:-1]


def rollout_rounds(r):
    """[(round, [(position, block, piece)])] in round order."""
    bs = r.get("block_size")
    by = collections.defaultdict(list)
    for pos, (rnd, pc) in enumerate(zip(r["step_map"], pieces_of(r))):
        by[rnd].append((pos, pos // bs if bs else None, pc))
    return sorted(by.items())


def rollout_text(r):
    out = [f"RL step {r['rl_step']}, sample {r['sample_id']}: {len(r['response_ids'])} response tokens, "
           f"block size {r.get('block_size', 'n/a')}, {len(set(r['step_map']))} rounds"
           + (", stopped at EOS" if r.get("stopped_at_eos") else "")]
    if r.get("prompt") is not None:
        out.append(f"prompt: {show(r['prompt'])}")
    out.append("response: " + show("".join(pieces_of(r))))
    out.append("")
    out.append("token by token (round = the denoising round that committed it)")
    bs = r.get("block_size")
    rows = [[pos, pos // bs if bs else "-", rnd, tid, show(pc)]
            for pos, (rnd, tid, pc) in enumerate(zip(r["step_map"], r["response_ids"], pieces_of(r)))]
    out.append(table(rows, ["pos", "block", "round", "id", "piece"]))
    out.append("")
    out.append("per round (the response so far; _ = still masked)")
    n = len(r["response_ids"])
    shown = ["_"] * n
    rows = []
    for rnd, toks in rollout_rounds(r):
        for pos, _, pc in toks:
            shown[pos] = show(pc) or "\u00b7"
        blocks = sorted({b for _, b, _ in toks if b is not None})
        new = " ".join(f"{pos}:{show(pc)}" for pos, _, pc in toks)
        rows.append([rnd, ",".join(map(str, blocks)) or "-", new, "".join(shown) if n <= 80 else ""])
    out.append(table(rows, ["round", "block", "committed (pos:piece)", "so far" if n <= 80 else ""]))
    return "\n".join(out)


def cmd_rollouts(args):
    path, recs = load_rollouts(args.run)
    if args.list:
        counts = collections.Counter(r["rl_step"] for r in recs)
        print(table([[s, c] for s, c in sorted(counts.items())], ["rl_step", "rollouts"]))
        return
    print(rollout_text(pick_rollout(path, recs, args.step, args.index)))


# ---- report ----------------------------------------------------------------------------------------
REPORT_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>opdlm run {{ label }}</title>
<style>
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
th { background: #f2f2f2; }
.kv td:first-child { color: #555; }
.figs { display: flex; flex-wrap: wrap; gap: 0.6em; }
.figs img { max-width: calc(50% - 0.6em); height: auto; border: 1px solid #eee; }
.cols { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.note { color: #666; font-size: 0.85em; }
.warn { color: #a40; }
.tokens { font-family: monospace; line-height: 2.3em; white-space: pre-wrap; }
.tok { padding: 1px 2px; border-radius: 3px; margin-right: 1px; }
.tok sub { font-size: 0.65em; color: #333; }
.blk { border-left: 2px solid #888; margin-left: 3px; padding-left: 2px; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
</style></head><body>
<h1>opdlm run <code>{{ label }}</code></h1>
<p class="note">{{ path }} &middot; made {{ made }} by tools/opdlm_logs.py from metrics.jsonl, metrics.lost.jsonl and rollouts.jsonl</p>
{% if warnings %}<ul class="warn">{% for w in warnings %}<li>{{ w }}</li>{% endfor %}</ul>{% endif %}
<h2>Summary</h2>
<div class="cols">{% for half in summary %}<table class="kv">{% for k, v in half %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>{% endfor %}</div>
<h2>Attempts (stitch)</h2>
<table><tr>{% for h in attempt_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in attempts %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
<ul>{% for l in stitch %}<li>{{ l }}</li>{% endfor %}</ul>
<p class="note">Goodput = committed step time / allocated wall time. Allocated = the sum over attempts of the time from
the attempt's start/resume line to its last line; queueing, launch and loading before the start line are not in the
logs, so goodput is an upper bound. Definitions: docs/logs.md.</p>
<h2>Plots</h2>
<div class="figs">{% for title, data in figures %}<img alt="{{ title }}" title="{{ title }}" src="data:image/png;base64,{{ data }}">{% endfor %}</div>
{% if missing_figures %}<p class="note">No data for: {{ missing_figures | join(", ") }}.</p>{% endif %}
<h2>Rollouts</h2>
{% if rollouts %}<p class="note">Each token is coloured by the denoising round that committed it (blue: early,
red: late), with the round as a subscript; a grey bar starts each block. {{ rollout_note }}</p>
{% for r in rollouts %}
<h3>RL step {{ r.rl_step }}, sample {{ r.sample_id }} <span class="note">({{ r.n }} token{{ "s" if r.n != 1 }}, {{ r.rounds }} round{{ "s" if r.rounds != 1 }}, block size {{ r.block_size }})</span></h3>
{% if r.prompt is not none %}<p><b>prompt</b> <code>{{ r.prompt }}</code></p>{% endif %}
<div class="tokens">{% for t in r.tokens %}<span class="tok{% if t.block_start %} blk{% endif %}" style="background: {{ t.color }}" title="position {{ t.pos }}, block {{ t.block }}, round {{ t.round }}">{{ t.text }}<sub>{{ t.round }}</sub></span>{% endfor %}</div>
<details{% if r.rounds <= 12 %} open{% endif %}><summary>per round: the positions committed</summary>
<table><tr><th>round</th><th>committed (position:piece)</th></tr>{% for rnd, toks in r.by_round %}<tr><td>{{ rnd }}</td><td><code>{{ toks }}</code></td></tr>{% endfor %}</table></details>
{% endfor %}{% else %}<p class="note">{{ rollout_note }}</p>{% endif %}
{% if config %}<h2>Configuration</h2><details><summary>the resolved configuration of the start line</summary><pre>{{ config }}</pre></details>{% endif %}
</body></html>
"""


def round_color(rnd, lo, hi):
    frac = 0.0 if hi == lo else (rnd - lo) / (hi - lo)
    return f"hsl({int(round(230 * (1 - frac)))}, 75%, 82%)"


def visible(piece):
    """A piece for the page: newline as a return arrow, other control characters escaped, empty as a dot."""
    out = "".join("\u21b5" if c == "\n" else (f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in piece)
    return out or "\u00b7"


def rollout_view(r):
    rounds = r["step_map"]
    lo, hi = (min(rounds), max(rounds)) if rounds else (0, 0)
    bs = r.get("block_size")
    toks = []
    for pos, (rnd, pc) in enumerate(zip(rounds, pieces_of(r))):
        toks.append({"pos": pos, "round": rnd, "block": pos // bs if bs else "n/a",
                     "block_start": bool(bs) and pos % bs == 0 and pos > 0,
                     "text": visible(pc), "color": round_color(rnd, lo, hi)})
    by_round = [(rnd, "  ".join(f"{pos}:{show(pc)}" for pos, _, pc in t)) for rnd, t in rollout_rounds(r)]
    return {"rl_step": r["rl_step"], "sample_id": r["sample_id"], "prompt": r.get("prompt"), "n": len(rounds),
            "rounds": len(set(rounds)), "block_size": bs if bs else "n/a", "tokens": toks, "by_round": by_round}


def report_rollouts(run, n):
    path = os.path.join(run.path, "rollouts.jsonl")
    if not os.path.exists(path):
        return [], "No rollouts.jsonl in the run directory (run.sample_rollouts = 0, or a trainer without it)."
    _, recs = load_rollouts(path)
    if not recs or n <= 0:
        return [], "rollouts.jsonl has no rollout."
    steps = sorted({r["rl_step"] for r in recs})
    # The first sampled step's first rollout (the student as it started) and the longest ones of the
    # last sampled step (the most denoising order to see), for contrast.
    last = [r for r in recs if r["rl_step"] == steps[-1]]
    picked = sorted(last, key=lambda r: -len(r["response_ids"]))[:max(n - 1, 1)]
    if len(steps) > 1 and n > 1:
        picked = [next(r for r in recs if r["rl_step"] == steps[0])] + picked
    return [rollout_view(r) for r in picked[:n]], f"Shown: {min(n, len(picked))} of {len(recs)} saved rollouts (RL steps {steps[0]} to {steps[-1]})."


def halves(rows):
    k = (len(rows) + 1) // 2
    return [rows[:k], rows[k:]]


def build_report(run, n_rollouts):
    try:
        import jinja2
    except ImportError as e:
        raise LogError(f"the report needs python3-jinja2 (tools/install-deps.sh): {e}")
    s = summarize(run)
    st = run.stitched()
    figs = figures([run])
    rollouts, note = report_rollouts(run, n_rollouts)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(REPORT_TEMPLATE).render(
        label=run.label, path=os.path.abspath(run.path),
        made=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        summary=halves(summary_rows(s)), attempt_header=ATTEMPT_HEADER, attempts=attempt_rows(st), stitch=stitch_lines(st),
        figures=[(t, base64.b64encode(d).decode("ascii")) for _, t, d in figs if d is not None],
        missing_figures=[t for _, t, d in figs if d is None], rollouts=rollouts, rollout_note=note,
        config=(run.start or {}).get("config"), warnings=list(WARNINGS))
    return page


def cmd_report(args):
    run = Run(args.run)
    page = build_report(run, args.rollouts)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"{args.out}: {len(page) // 1024} KiB, self-contained (open it from the file system)")


# ---- main ------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(prog="opdlm_logs.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Definitions and the metrics contract: docs/logs.md")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("summary", help="the first table of a run")
    a.add_argument("runs", nargs="+", metavar="RUN")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_summary)
    a = sub.add_parser("stitch", help="attempts, committed steps, goodput, lost work, checkpoint overhead")
    a.add_argument("run", metavar="RUN")
    a.add_argument("--json", action="store_true")
    a.add_argument("--out", metavar="FILE", help="write the merged committed curve (step, probe, eval lines) as JSONL")
    a.set_defaults(fn=cmd_stitch)
    a = sub.add_parser("compare", help="a metric against tokens or FLOPs for several runs; tokens to a threshold")
    a.add_argument("runs", nargs="+", metavar="RUN")
    a.add_argument("--x", choices=("tokens", "flops"), default="tokens")
    a.add_argument("--metric", default="loss", help="a step, probe or eval field (dotted for nested): loss, "
                   "own_state_kl, random_state_kl, grad_norm, eos_rate, ... (default loss)")
    a.add_argument("--at", help="comma-separated x values to read the metric at (default: 1/4..4/4 of the "
                   "shortest run)")
    a.add_argument("--threshold", action="append", metavar="METRIC<=VALUE",
                   help="first tokens/FLOPs at which METRIC reaches VALUE (<=, <, >=, >); repeatable")
    a.add_argument("--labels", help="comma-separated names for the runs (default: directory names)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_compare)
    a = sub.add_parser("plot", help="PNG plots")
    a.add_argument("runs", nargs="+", metavar="RUN")
    a.add_argument("--out", required=True, metavar="DIR")
    a.set_defaults(fn=cmd_plot)
    a = sub.add_parser("rollouts", help="a saved rollout's denoising order, token by token")
    a.add_argument("run", metavar="RUN|FILE")
    a.add_argument("--step", type=int, help="RL step (default: the last with rollouts)")
    a.add_argument("--index", type=int, default=0, help="which rollout of that step (default 0)")
    a.add_argument("--list", action="store_true", help="list the RL steps with saved rollouts")
    a.set_defaults(fn=cmd_rollouts)
    a = sub.add_parser("report", help="one self-contained HTML page")
    a.add_argument("run", metavar="RUN")
    a.add_argument("--out", required=True, metavar="FILE")
    a.add_argument("--rollouts", type=int, default=3, help="rollouts to show (default 3)")
    a.set_defaults(fn=cmd_report)
    args = p.parse_args(argv)
    if args.cmd == "compare" and args.labels and len(args.labels.split(",")) != len(args.runs):
        p.error(f"--labels has {len(args.labels.split(','))} names for {len(args.runs)} runs")
    try:
        args.fn(args)
    except LogError as e:
        print(f"opdlm_logs: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    finally:
        for w in WARNINGS:  # stderr, so that --json output stays clean
            print(f"opdlm_logs: warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
