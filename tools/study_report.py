#!/usr/bin/env python3
"""study_report.py -- the offline analysis of a jobs/reproduce.sh run directory (docs/study.md).

    tools/study_report.py RUN                  # writes RUN/report.md and RUN/report.json
    tools/study_report.py RUN --best-lr ARM    # prints the LR this report picks for ARM (the job's tau sweep)
    tools/study_report.py RUN --out-md X --out-json Y --bootstrap 2000

Reads RUN/study.json (written by the job: arms, seeds, LRs, milestones, task files), then for every
arm / LR / seed RUN/train/ARM/lr_LR/seed_S/{metrics.jsonl,summary.json} and the milestone results
RUN/eval/ARM/lr_LR/seed_S/tokens_M.json, the references RUN/eval/ref/{teacher,s0}.json and the tau
sweep RUN/tau/{ARM/lr_LR/seed_S,s0}/tau_T.json. Every figure comes from those files; a missing or
unreadable file is an error naming it (exit 1). Python 3 standard library only.

Method (also stated in report.md):
  * best LR per arm: highest mean over seeds of held-out arithmetic EM at the final milestone; ties
    broken by the mean arithmetic EM over all milestones, then by the final token accuracy, then by
    the order of the LR list.
  * tokens to threshold (per seed): threshold = 0.95 x the teacher's arithmetic EM; the first
    milestone whose EM reaches it, linearly interpolated in log(tokens) from the milestone before
    (tokens = the counter at the checkpoint, from the `milestone` event); reached at the first
    milestone -> that count is an upper bound; never reached -> censored (> MAX_TOKENS).
  * FLOPs at a token count: student forward + backward + teacher + rollout FLOPs of the `budget`
    counters of metrics.jsonl, linearly interpolated in training tokens between step lines.
  * means over seeds with a percentile bootstrap 95% CI (resampling seeds; crude with 2-3 seeds).
"""
import argparse
import json
import math
import os
import random
import sys

ARM_LABEL = {"opd": "A (OPD)", "rm-ce-gold": "B (RM-CE, gold)", "rm-ce-teacher": "B' (RM-CE, teacher samples)",
             "rm-kl": "C (RM-KL)"}
RM_CE = ("rm-ce-gold", "rm-ce-teacher")
THRESHOLD = 0.95
INF = float("inf")


class ReportError(Exception):
    pass


# ---- files ----------------------------------------------------------------------------------------
def load_json(path):
    if not os.path.isfile(path):
        raise ReportError(f"missing file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {path}: {e}")


def load_jsonl(path):
    if not os.path.isfile(path):
        raise ReportError(f"missing file {path}")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise ReportError(f"{path}:{n}: not JSON: {e}")
    return out


def task_key(p):
    return os.path.basename(os.path.dirname(p)) + "/" + os.path.splitext(os.path.basename(p))[0]


def find_task(result, task_path, path):
    tasks = result.get("tasks")
    if not isinstance(tasks, list):
        raise ReportError(f"{path}: not an opdlm eval result (no tasks)")
    for t in tasks:
        if t.get("task") == task_path:
            return t
    for t in tasks:
        if task_key(t.get("task", "")) == task_key(task_path):
            return t
    raise ReportError(f"{path}: no result for task {task_path}")


def need(d, key, path):
    if key not in d:
        raise ReportError(f"{path}: missing key '{key}'")
    return d[key]


def eval_figures(res, study, path):
    """The figures of one full (milestone / reference) evaluation."""
    if res.get("format") != "opdlm-eval/1":
        raise ReportError(f"{path}: not an opdlm eval result (format {res.get('format')!r})")
    a = find_task(res, study["tasks"]["arith"], path)
    f = find_task(res, study["tasks"]["facts"], path)
    kl = res.get("state_kl") or {}
    gp = res.get("gen_ppl") or {}
    return {"arith_em": need(a, "exact_match", path), "arith_token_acc": a.get("token_accuracy"),
            "arith_tpf": a.get("tokens_per_forward"), "facts_em": need(f, "exact_match", path),
            "facts_mc": f.get("mc_accuracy"), "kl_own": kl.get("own"), "kl_random": kl.get("random"),
            "gen_ppl": gp.get("gen_ppl"), "entropy": gp.get("unigram_entropy"), "n_arith": a.get("n"),
            "n_facts": f.get("n")}


# ---- numerics -------------------------------------------------------------------------------------
def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def bootstrap_ci(xs, n_boot, seed=12345):
    """Percentile 95% CI of the mean, resampling the values (seeds) with replacement."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    if len(xs) == 1 or n_boot <= 0:
        return [xs[0], xs[0]] if len(xs) == 1 else [min(xs), max(xs)]
    rng = random.Random(seed)
    ms = sorted(sum(rng.choice(xs) for _ in xs) / len(xs) for _ in range(n_boot))
    return [ms[int(0.025 * (n_boot - 1))], ms[int(math.ceil(0.975 * (n_boot - 1)))]]


def bootstrap_ratio_ci(num, den, n_boot, seed=54321):
    """95% CI of mean(num)/mean(den), resampling each arm's seeds independently."""
    if not num or not den or n_boot <= 0:
        return None
    rng = random.Random(seed)
    rs = []
    for _ in range(n_boot):
        a = sum(rng.choice(num) for _ in num) / len(num)
        b = sum(rng.choice(den) for _ in den) / len(den)
        rs.append(a / b if b > 0 else INF)
    rs.sort()
    return [rs[int(0.025 * (n_boot - 1))], rs[int(math.ceil(0.975 * (n_boot - 1)))]]


def crossing(points, thr):
    """First crossing of thr by (tokens, value) points (ascending tokens), linear in log tokens.
    Returns (tokens, kind): kind 'interpolated', 'first' (reached at the first point: an upper
    bound) or 'censored' (never reached: tokens None)."""
    for i, (t, v) in enumerate(points):
        if v is not None and v >= thr:
            if i == 0:
                return t, "first"
            t0, v0 = points[i - 1]
            frac = (thr - v0) / (v - v0)
            return math.exp(math.log(t0) + frac * (math.log(t) - math.log(t0))), "interpolated"
    return None, "censored"


def interp_log(points, x):
    """Value at tokens x, linear in log tokens between (tokens, value) points, clamped at the ends."""
    pts = [(t, v) for t, v in points if v is not None]
    if not pts:
        return None
    if x <= pts[0][0]:
        return pts[0][1]
    for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
        if x <= t1:
            return v0 + (v1 - v0) * (math.log(x) - math.log(t0)) / (math.log(t1) - math.log(t0))
    return pts[-1][1]


def interp_lin(points, x):
    """Linear interpolation in x over ascending (x, y) points; past the last point: the last y."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


# ---- the run directory ----------------------------------------------------------------------------
class Study:
    def __init__(self, run, n_boot):
        self.run, self.n_boot = run, n_boot
        self.s = load_json(os.path.join(run, "study.json"))
        for k in ("arms", "seeds", "lrs", "milestones", "max_tokens", "taus", "tasks"):
            need(self.s, k, os.path.join(run, "study.json"))
        if "opd" not in self.s["arms"]:
            raise ReportError(f"{run}/study.json: arms {self.s['arms']} lack opd")
        self.milestones = sorted(int(m) for m in self.s["milestones"])
        self.max_tokens = int(self.s["max_tokens"])
        self._runs = {}

    def p(self, *parts):
        return os.path.join(self.run, *parts)

    def eval_path(self, arm, lr, seed, m):
        return self.p("eval", arm, f"lr_{lr}", f"seed_{seed}", f"tokens_{m}.json")

    def reference(self, name):
        path = self.p("eval", "ref", f"{name}.json")
        return eval_figures(load_json(path), self.s, path)

    def best_lr(self, arm):
        final = self.milestones[-1]
        scored = []
        for i, lr in enumerate(self.s["lrs"]):
            figs = [[eval_figures(load_json(self.eval_path(arm, lr, seed, m)), self.s, self.eval_path(arm, lr, seed, m))
                     for m in self.milestones] for seed in self.s["seeds"]]
            fin = mean([f[-1]["arith_em"] for f in figs])
            area = mean([mean([x["arith_em"] for x in f]) for f in figs])
            acc = mean([f[-1]["arith_token_acc"] for f in figs])
            scored.append({"lr": lr, "final_arith_em": fin, "mean_arith_em_over_milestones": area,
                           "final_arith_token_acc": acc, "order": i, "final_milestone": final})
        best = max(scored, key=lambda r: (r["final_arith_em"], r["mean_arith_em_over_milestones"],
                                          r["final_arith_token_acc"] if r["final_arith_token_acc"] is not None else -1,
                                          -r["order"]))
        return best["lr"], scored

    def seed_run(self, arm, lr, seed):
        key = (arm, lr, seed)
        if key in self._runs:
            return self._runs[key]
        d = self.p("train", arm, f"lr_{lr}", f"seed_{seed}")
        mpath, spath = os.path.join(d, "metrics.jsonl"), os.path.join(d, "summary.json")
        events = load_jsonl(mpath)
        summary = load_json(spath)
        stones = {e["milestone"]: e["train_tokens"] for e in events if e.get("event") == "milestone"}
        flops = [(0, 0.0)]
        for e in events:
            if e.get("event") == "step" and "budget" in e:
                b = e["budget"]
                try:
                    total = (b["student_forward_flops"] + b["student_backward_flops"] + b["teacher_flops"]
                             + b["rollout_flops"])
                    flops.append((b["train_tokens"], float(total)))
                except KeyError as k:
                    raise ReportError(f"{mpath}: step line without budget counter {k}")
        if len(flops) == 1:
            raise ReportError(f"{mpath}: no step line with budget counters")
        flops.sort()
        probes = [(e["train_tokens"], e.get("own_state_kl"), e.get("random_state_kl"))
                  for e in events if e.get("event") == "probe"]
        points = []
        for m in self.milestones:
            if m not in stones:
                raise ReportError(f"{mpath}: no milestone event for {m} tokens (the run stopped early?)")
            ep = self.eval_path(arm, lr, seed, m)
            fig = eval_figures(load_json(ep), self.s, ep)
            tok = stones[m]
            fig.update(milestone=m, tokens=tok, flops=interp_lin(flops, tok))
            points.append(fig)
        r = {"arm": arm, "lr": lr, "seed": seed, "points": points, "flops": flops, "probes": probes,
             "summary": summary, "dir": d}
        self._runs[key] = r
        return r


def interval_text(lo, hi, fmt):
    if lo == hi:
        return fmt(lo)
    if hi == INF and lo > 0:
        return "> " + fmt(lo)
    if lo <= 0 and hi < INF:
        return "<= " + fmt(hi)
    if lo <= 0 and hi == INF:
        return "undetermined"
    return f"{fmt(lo)} .. {fmt(hi)}"


def f3(x):
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def ftok(x):
    return "-" if x is None else ("inf" if x == INF else f"{x:,.0f}")


def fflop(x):
    return "-" if x is None else ("inf" if x == INF else f"{x:.3g}")


def fci(m, ci, fmt=f3):
    if m is None:
        return "-"
    return fmt(m) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci and ci[0] != ci[1] else "")


# ---- analysis -------------------------------------------------------------------------------------
def analyse(st):
    s, nb = st.s, st.n_boot
    arms, seeds = s["arms"], s["seeds"]
    teacher, s0 = st.reference("teacher"), st.reference("s0")
    thr = THRESHOLD * teacher["arith_em"]
    out = {"format": "opdlm-study-report/1", "run": st.run, "settings": {k: s.get(k) for k in (
        "arms", "seeds", "lrs", "max_tokens", "milestones", "eval_limit", "taus", "teacher", "data", "config")},
        "teacher": teacher, "s0": s0, "threshold": {"fraction": THRESHOLD, "arith_em": thr}}

    # best LR per arm
    best, lr_table = {}, {}
    for arm in arms:
        best[arm], lr_table[arm] = st.best_lr(arm)
    out["lr_selection"] = {"rule": "highest mean over seeds of held-out arithmetic EM at the final milestone; ties: "
                           "mean arithmetic EM over milestones, then final token accuracy, then LR list order",
                           "best": best, "table": lr_table}
    runs = {arm: [st.seed_run(arm, best[arm], seed) for seed in seeds] for arm in arms}

    # EM-vs-tokens curves (mean over seeds at each nominal milestone)
    curves = {}
    for arm in arms:
        rows = []
        for i, m in enumerate(st.milestones):
            pts = [r["points"][i] for r in runs[arm]]
            row = {"milestone": m, "tokens_mean": mean([p["tokens"] for p in pts]),
                   "flops_mean": mean([p["flops"] for p in pts])}
            for k in ("arith_em", "facts_em", "facts_mc", "kl_own", "kl_random", "gen_ppl", "entropy"):
                vals = [p[k] for p in pts]
                row[k] = mean(vals)
                if k in ("arith_em", "facts_em", "kl_own", "kl_random"):
                    row[k + "_ci"] = bootstrap_ci(vals, nb)
            rows.append(row)
        curves[arm] = rows
    out["curves"] = curves

    # tokens (and FLOPs) to threshold
    t2t = {}
    for arm in arms:
        per = []
        for r in runs[arm]:
            t, kind = crossing([(p["tokens"], p["arith_em"]) for p in r["points"]], thr)
            final_tok = r["points"][-1]["tokens"]
            if kind == "interpolated":
                lo = hi = t
            elif kind == "first":
                lo, hi = 0.0, float(t)
            else:
                lo, hi = float(st.max_tokens), INF
            flo = interp_lin(r["flops"], lo) if lo > 0 else 0.0
            fhi = interp_lin(r["flops"], hi) if hi < INF else INF
            point = t if t is not None else float(final_tok)
            per.append({"seed": r["seed"], "kind": kind, "tokens": t, "tokens_lo": lo, "tokens_hi": hi,
                        "flops_lo": flo, "flops_hi": fhi, "point_tokens": point})
        exact = all(p["kind"] == "interpolated" for p in per)
        e = {"per_seed": per, "exact": exact,
             "tokens_lo": mean([p["tokens_lo"] for p in per]),
             "tokens_hi": INF if any(p["tokens_hi"] == INF for p in per) else mean([p["tokens_hi"] for p in per]),
             "flops_lo": mean([p["flops_lo"] for p in per]),
             "flops_hi": INF if any(p["flops_hi"] == INF for p in per) else mean([p["flops_hi"] for p in per]),
             "n_reached": sum(p["kind"] != "censored" for p in per), "n": len(per),
             "point_tokens": mean([p["point_tokens"] for p in per])}
        e["tokens_ci"] = bootstrap_ci([p["tokens"] for p in per], nb) if exact else None
        e["flops_ci"] = bootstrap_ci([p["flops_lo"] for p in per], nb) if exact else None
        t2t[arm] = e
    out["tokens_to_threshold"] = t2t

    # efficiency factors: best RM arm / OPD, as intervals (censored / first-milestone bounds)
    rm_arms = [a for a in arms if a != "opd"]
    eff = {}
    for what in ("tokens", "flops"):
        if not rm_arms:
            eff[what] = None
            continue
        o = t2t["opd"]
        rm = min(rm_arms, key=lambda a: (t2t[a][what + "_hi"], t2t[a][what + "_lo"]))
        r = t2t[rm]
        lo = r[what + "_lo"] / o[what + "_hi"] if o[what + "_hi"] not in (0, INF) else 0.0
        hi = r[what + "_hi"] / o[what + "_lo"] if o[what + "_lo"] > 0 else INF
        ci = None
        if o["exact"] and r["exact"]:
            key = "tokens" if what == "tokens" else "flops_lo"
            ci = bootstrap_ratio_ci([p[key] for p in r["per_seed"]], [p[key] for p in o["per_seed"]], nb)
        eff[what] = {"rm_arm": rm, "lo": lo, "hi": hi, "ci": ci}
    out["efficiency"] = eff

    # retention (facts EM / teacher facts EM) at OPD's convergence budget and at each arm's own
    budget = t2t["opd"]["point_tokens"]
    tf = teacher["facts_em"]
    ret = {"opd_budget_tokens": budget, "opd_budget_kind": "exact" if t2t["opd"]["exact"] else "bound", "arms": {}}
    for arm in arms:
        at_b = [interp_log([(p["tokens"], p["facts_em"]) for p in r["points"]], budget) for r in runs[arm]]
        own = [interp_log([(p["tokens"], p["facts_em"]) for p in r["points"]], q["point_tokens"])
               for r, q in zip(runs[arm], t2t[arm]["per_seed"])]
        mc_b = [interp_log([(p["tokens"], p["facts_mc"]) for p in r["points"]], budget) for r in runs[arm]]
        ret["arms"][arm] = {
            "facts_em_at_opd_budget": mean(at_b), "facts_em_at_opd_budget_ci": bootstrap_ci(at_b, nb),
            "retention_at_opd_budget": mean(at_b) / tf if tf > 0 else None,
            "facts_em_at_own": mean(own), "retention_at_own": mean(own) / tf if tf > 0 else None,
            "own_converged": t2t[arm]["n_reached"] == t2t[arm]["n"],
            "facts_mc_at_opd_budget": mean(mc_b),
            "mc_retention_at_opd_budget": (mean(mc_b) / teacher["facts_mc"]
                                           if mean(mc_b) is not None and teacher["facts_mc"] else None)}
    ret["teacher_facts_em"] = tf
    out["retention"] = ret

    # state KL at matched tokens: the milestone at or after OPD's budget
    matched = next((m for m in st.milestones if m >= budget), st.milestones[-1])
    mi = st.milestones.index(matched)
    out["state_kl"] = {"matched_milestone": matched,
                       "arms": {a: {"own": curves[a][mi]["kl_own"], "random": curves[a][mi]["kl_random"]} for a in arms}}
    probe = {}
    for arm in arms:
        rows = []
        for i, m in enumerate(st.milestones):
            own, rnd = [], []
            for r in runs[arm]:
                tok = r["points"][i]["tokens"]
                if r["probes"]:
                    near = min(r["probes"], key=lambda q: abs(q[0] - tok))
                    own.append(near[1])
                    rnd.append(near[2])
            rows.append({"milestone": m, "own": mean(own), "random": mean(rnd)})
        first = mean([r["probes"][0][1] for r in runs[arm] if r["probes"]])
        probe[arm] = {"at_milestones": rows, "initial_own": first,
                      "series": {r["seed"]: r["probes"] for r in runs[arm]}}
    out["probe"] = probe

    # tau sweep
    taus = s["taus"]
    tau = {}

    def tau_fig(path):
        res = load_json(path)
        t = find_task(res, s["tasks"]["arith"], path)
        return need(t, "exact_match", path), need(t, "tokens_per_forward", path)

    for arm in arms:
        rows = []
        for x in taus:
            figs = [tau_fig(st.p("tau", arm, f"lr_{best[arm]}", f"seed_{seed}", f"tau_{x}.json")) for seed in seeds]
            ems = [f[0] for f in figs]
            rows.append({"tau": x, "em": mean(ems), "em_ci": bootstrap_ci(ems, nb), "tpf": mean([f[1] for f in figs])})
        static = {"em": curves[arm][-1]["arith_em"], "tpf": mean([r["points"][-1]["arith_tpf"] for r in runs[arm]])}
        tau[arm] = {"rows": rows, "static": static}
    s0rows = []
    for x in taus:
        em, tpf = tau_fig(st.p("tau", "s0", f"tau_{x}.json"))
        s0rows.append({"tau": x, "em": em, "em_ci": None, "tpf": tpf})
    tau["s0"] = {"rows": s0rows, "static": {"em": s0["arith_em"], "tpf": s0["arith_tpf"]}}
    out["tau_sweep"] = tau

    out["criteria"] = criteria(st, out, matched)
    return out


def criteria(st, out, matched):
    s = st.s
    arms = s["arms"]
    t, s0 = out["teacher"], out["s0"]
    t2t, eff, ret = out["tokens_to_threshold"], out["efficiency"], out["retention"]["arms"]
    mi = st.milestones.index(matched)
    opd_c = out["curves"]["opd"][mi]
    crit = []

    def add(cid, text, status, detail):
        crit.append({"id": cid, "criterion": text, "status": status, "detail": detail})

    o = t2t["opd"]
    degenerate = t["arith_em"] <= 0
    why_degenerate = "T's arithmetic EM is 0: the threshold is 0 and every checkpoint 'reaches' it"
    if degenerate:
        add("P1a", "OPD reaches >= 95% of T's ARITH EM (every seed, within MAX_TOKENS)", "not covered", why_degenerate)
    else:
        add("P1a", "OPD reaches >= 95% of T's ARITH EM (every seed, within MAX_TOKENS)",
            "pass" if o["n_reached"] == o["n"] else "fail",
            f"{o['n_reached']}/{o['n']} seeds reach EM >= {out['threshold']['arith_em']:.3f}")
    if t["gen_ppl"] and opd_c["gen_ppl"] is not None:
        r = opd_c["gen_ppl"] / t["gen_ppl"]
        add("P1b", "OPD gen-PPL within 10% of T's (at the matched milestone)",
            "pass" if abs(r - 1) <= 0.10 else "fail",
            f"ratio {r:.3f} at {matched:,} tokens; measured on arithmetic-prompt samples, not TEXT (no TEXT split)")
    else:
        add("P1b", "OPD gen-PPL within 10% of T's", "not covered", "no gen-PPL in the results")
    e = eff.get("tokens")
    if e is None or degenerate:
        add("P1c", "token efficiency factor (best RM / OPD) >= 5", "not covered",
            why_degenerate if degenerate else "no RM arm in ARMS")
    else:
        st_ = "pass" if e["lo"] >= 5 else ("fail" if e["hi"] < 5 else "inconclusive")
        det = f"factor {interval_text(e['lo'], e['hi'], lambda v: f'{v:.2f}')} (best RM arm {e['rm_arm']})"
        if o["point_tokens"] and st.max_tokens < 10 * o["point_tokens"]:
            det += f"; MAX_TOKENS is {st.max_tokens / o['point_tokens']:.1f}x OPD's budget, short of the 10x censoring horizon"
        add("P1c", "token efficiency factor (best RM / OPD) >= 5", st_, det)
    f = eff.get("flops")
    if f is not None:
        add("P1d", "FLOP efficiency factor (reported, no threshold)", "reported",
            f"factor {interval_text(f['lo'], f['hi'], lambda v: f'{v:.2f}')} (best RM arm {f['rm_arm']})")

    ra = ret["opd"]["retention_at_opd_budget"]
    why_facts = None
    if t["facts_em"] < 0.5:  # a teacher that does not know the facts has nothing to retain
        why_facts = f"T's facts EM is {t['facts_em']:.3f} (< 0.5): nothing to retain"
        ra = None
    if ra is None:
        add("P2a", "OPD FACT retention >= 0.9 at its convergence budget", "not covered",
            why_facts or "teacher facts EM is 0")
    else:
        add("P2a", "OPD FACT retention >= 0.9 at its convergence budget", "pass" if ra >= 0.9 else "fail",
            f"retention {ra:.3f} at {out['retention']['opd_budget_tokens']:,.0f} tokens")
    ce = [a for a in arms if a in RM_CE]
    if ra is None or not ce:
        add("P2b", "RM-CE retention lower than OPD's, at equal tokens and at its own convergence", "not covered",
            (why_facts or "teacher facts EM is 0") if ra is None else "no RM-CE arm in ARMS")
    else:
        ok, parts, censored = True, [], False
        for a in ce:
            eq, own = ret[a]["retention_at_opd_budget"], ret[a]["retention_at_own"]
            ok &= eq < ra and own < ret["opd"]["retention_at_own"]
            censored |= not ret[a]["own_converged"]
            parts.append(f"{a}: {eq:.3f} at equal tokens, {own:.3f} at own convergence"
                         + ("" if ret[a]["own_converged"] else " (not converged: final milestone)"))
        add("P2b", "RM-CE retention lower than OPD's, at equal tokens and at its own convergence",
            "pass" if ok else "fail",
            f"OPD {ra:.3f} / {ret['opd']['retention_at_own']:.3f}; " + "; ".join(parts)
            + ("; some RM-CE seeds never converged, so 'own convergence' is their final milestone" if censored else ""))
    if ra is None or "rm-kl" not in arms or not ce:
        add("P2c", "C between A and B, or near A (|C - A| <= 0.05)", "not covered",
            why_facts or "needs arms opd, rm-kl and an rm-ce arm and a teacher facts EM > 0")
    else:
        b = min(ce, key=lambda a: (t2t[a]["tokens_hi"], t2t[a]["tokens_lo"]))
        rb, rc = ret[b]["retention_at_opd_budget"], ret["rm-kl"]["retention_at_opd_budget"]
        ok = min(ra, rb) <= rc <= max(ra, rb) or abs(rc - ra) <= 0.05
        add("P2c", "C between A and B, or near A (|C - A| <= 0.05)", "pass" if ok else "fail",
            f"at OPD's budget: A {ra:.3f}, B ({b}) {rb:.3f}, C {rc:.3f}")

    kl = out["state_kl"]["arms"]
    if "rm-kl" not in arms:
        for cid, txt in (("P3a", "KL on own states: A < C"), ("P3b", "KL on random states: C <= A")):
            add(cid, txt, "not covered", "no rm-kl arm in ARMS")
    else:
        a, c = kl["opd"], kl["rm-kl"]
        if None in (a["own"], c["own"], a["random"], c["random"]):
            add("P3a", "KL on own states: A < C", "not covered", "no state KL in the results")
            add("P3b", "KL on random states: C <= A", "not covered", "no state KL in the results")
        else:
            add("P3a", "KL on own states: A < C (matched tokens)", "pass" if a["own"] < c["own"] else "fail",
                f"at {matched:,} tokens: A {a['own']:.4f}, C {c['own']:.4f}")
            add("P3b", "KL on random states: C <= A (matched tokens)", "pass" if c["random"] <= a["random"] else "fail",
                f"at {matched:,} tokens: A {a['random']:.4f}, C {c['random']:.4f}")
    in_range = [x for x in s["taus"] if 0.7 <= float(x) <= 0.95]
    others = [x for x in arms if x != "opd"]
    if not in_range or not others:
        add("P3c", "A's accuracy-vs-TPF frontier dominates B's and C's for tau in [0.7, 0.95]", "not covered",
            "no tau in [0.7, 0.95]" if not in_range else "no other arm")
    else:
        sweep = out["tau_sweep"]
        pts = {arm: [(r["em"], r["tpf"]) for r in sweep[arm]["rows"] if r["tau"] in in_range] for arm in arms}
        bad = []
        for x in others:
            for em, tpf in pts[x]:
                label = f"{x} (EM {em:.3f}, TPF {tpf:.3f})"
                if not any(ae >= em and at >= tpf for ae, at in pts["opd"]) and label not in bad:
                    bad.append(label)
        add("P3c", "A's accuracy-vs-TPF frontier dominates B's and C's for tau in [0.7, 0.95]",
            "pass" if not bad else "fail",
            f"taus {', '.join(in_range)}; means over seeds; weak dominance"
            + ("" if not bad else "; not dominated: " + ", ".join(bad)))

    add("S1", "S0 far below T on ARITH (S0 EM <= 0.5 x T EM, T EM > 0)",
        "pass" if t["arith_em"] > 0 and s0["arith_em"] <= 0.5 * t["arith_em"] else "fail",
        f"S0 {s0['arith_em']:.3f}, T {t['arith_em']:.3f}")
    add("S2", "T EM >= 0.95 on FACTS and >= 0.90 on ARITH",
        "pass" if t["facts_em"] >= 0.95 and t["arith_em"] >= 0.90 else "fail",
        f"facts {t['facts_em']:.3f}, arith {t['arith_em']:.3f}")
    if t["entropy"] and opd_c["entropy"] is not None:
        r = opd_c["entropy"] / t["entropy"]
        add("S3", "entropy of A's samples within 10% of T's (no collapse)", "pass" if abs(r - 1) <= 0.10 else "fail",
            f"ratio {r:.3f} at {matched:,} tokens (arithmetic-prompt samples)")
    else:
        add("S3", "entropy of A's samples within 10% of T's", "not covered", "no gen-PPL samples in the results")
    return crit


NOT_COVERED = [
    "gen-PPL and entropy on TEXT (data/quickstart has no TEXT split; arithmetic-prompt samples stand in, P1b/S3)",
    "per-fact teacher-forced log-prob drop (C2's second retention measure)",
    "teacher agreement (share of greedy tokens equal to T's)",
    "mask-pattern statistics of the visited states (C3)",
    "wall-clock tok/s with and without the block KV cache",
    "the NELBO likelihood bound on held-out TEXT",
    "arm D (MDLM full-attention conversion) and the top-k=16 KL variant of A",
    "the 10x-OPD-budget censoring horizon when MAX_TOKENS < 10x OPD's tokens-to-threshold",
]


# ---- markdown -------------------------------------------------------------------------------------
def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def markdown(st, r):
    s, arms = st.s, st.s["arms"]
    L = lambda a: ARM_LABEL.get(a, a)  # noqa: E731
    t, s0 = r["teacher"], r["s0"]
    md = [f"# Reproduction study report: `{st.run}`", ""]
    md.append(f"Settings: arms {', '.join(arms)}; seeds {' '.join(s['seeds'])}; LR sweep {' '.join(s['lrs'])}; "
              f"MAX_TOKENS {st.max_tokens:,}; milestones {', '.join(f'{m:,}' for m in st.milestones)}; "
              f"eval limit {s.get('eval_limit')} records per task; teacher `{s.get('teacher')}`; data `{s.get('data')}`; "
              f"config `{s.get('config')}`. Figures are means over seeds with a bootstrap 95% CI over seeds in "
              f"brackets (crude with {len(s['seeds'])} seeds). Generated by tools/study_report.py from the files under "
              f"the run directory.")
    if len(s["seeds"]) < 3:
        md.append(f"\n**Fewer seeds than pre-registered** ({len(s['seeds'])} < 3): read every pass/fail as indicative.")
    md += ["", "## References", ""]
    md.append(table(["model", "arith EM", "facts EM", "facts MC", "TPF", "KL own", "KL random", "gen-PPL", "entropy"],
                    [[n, f3(x["arith_em"]), f3(x["facts_em"]), f3(x["facts_mc"]), f3(x["arith_tpf"]), f3(x["kl_own"]),
                      f3(x["kl_random"]), f3(x["gen_ppl"]), f3(x["entropy"])]
                     for n, x in (("T (teacher, AR)", t), ("S0 (teacher weights as DLM, untrained)", s0))]))
    md.append(f"\nThreshold for C1: {THRESHOLD:.0%} of T's arithmetic EM = **{r['threshold']['arith_em']:.3f}**. "
              "gen-PPL: samples of the arithmetic held-out prompts at temperature 1, scored by T.")
    if t["arith_em"] <= 0:
        md.append("\n**T's arithmetic EM is 0**: the C1 threshold is degenerate (every checkpoint reaches it), so "
                  "tokens-to-threshold, the efficiency factors and the 'convergence budget' below carry no "
                  "information about C1; the pipeline figures (curves, KL, retention ratios) are still computed.")

    ls = r["lr_selection"]
    md += ["", "## LR selection", "", f"Best LR per arm: {ls['rule']}. Every other section uses the best LR. "
           "Cells: final arithmetic EM (mean EM over milestones; final token accuracy), means over seeds.", ""]
    md.append(table(["arm"] + [f"lr {lr}" for lr in s["lrs"]] + ["best"],
                    [[L(a)] + [f"{f3(x['final_arith_em'])} ({f3(x['mean_arith_em_over_milestones'])}; "
                               f"{f3(x['final_arith_token_acc'])})" for x in ls["table"][a]] + [ls["best"][a]]
                     for a in arms]))

    md += ["", "## C1: held-out arithmetic EM vs training tokens", ""]
    md.append(table(["milestone"] + [L(a) for a in arms],
                    [[f"{m:,}"] + [fci(r["curves"][a][i]["arith_em"], r["curves"][a][i]["arith_em_ci"]) for a in arms]
                     for i, m in enumerate(st.milestones)]))
    md.append("\nCumulative FLOPs at each milestone (student fwd+bwd + teacher + rollouts, mean over seeds):\n")
    md.append(table(["milestone"] + [L(a) for a in arms],
                    [[f"{m:,}"] + [fflop(r["curves"][a][i]["flops_mean"]) for a in arms]
                     for i, m in enumerate(st.milestones)]))

    md += ["", "### Tokens to 95% of T's arithmetic EM", ""]
    md.append("Per seed: first crossing, linear in log(tokens) between milestones; `<=` reached at the first "
              f"milestone (an upper bound); `censored` never reached (> {st.max_tokens:,}).\n")
    rows = []
    for a in arms:
        e = r["tokens_to_threshold"][a]
        ps = ", ".join(f"s{p['seed']}: " + ({"interpolated": ftok(p["tokens"]), "first": "<= " + ftok(p["tokens"]),
                                              "censored": "censored"}[p["kind"]]) for p in e["per_seed"])
        tok = interval_text(e["tokens_lo"], e["tokens_hi"], ftok)
        if e["tokens_ci"]:
            tok += f" [{ftok(e['tokens_ci'][0])}, {ftok(e['tokens_ci'][1])}]"
        rows.append([L(a), ps, tok, interval_text(e["flops_lo"], e["flops_hi"], fflop), f"{e['n_reached']}/{e['n']}"])
    md.append(table(["arm", "per seed (tokens)", "mean tokens", "mean FLOPs", "seeds reached"], rows))
    for what in ("tokens", "flops"):
        e = r["efficiency"].get(what)
        if e:
            txt = interval_text(e["lo"], e["hi"], lambda v: f"{v:.2f}x")
            ci = f" [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}]" if e["ci"] else ""
            md.append(f"\nEfficiency factor in {what} (best RM arm = {L(e['rm_arm'])}, the RM arm with the fewest "
                      f"{what} to threshold) / OPD: **{txt}**{ci}")

    rt = r["retention"]
    md += ["", "## C2: facts retention (student facts EM / T's facts EM)", ""]
    md.append(f"OPD's convergence budget: {rt['opd_budget_tokens']:,.0f} tokens"
              + ("" if rt["opd_budget_kind"] == "exact" else " (a bound: some OPD seed is censored or reached the "
                 "threshold at the first milestone)")
              + f". T's facts EM {f3(rt['teacher_facts_em'])}. Values between milestones: linear in log(tokens); "
              "'own convergence' = each seed's own tokens-to-threshold (its final milestone when censored).\n")
    md.append(table(["arm", "facts EM @ OPD budget", "retention @ OPD budget", "MC retention @ OPD budget",
                     "facts EM @ own conv.", "retention @ own conv."],
                    [[L(a), fci(x["facts_em_at_opd_budget"], x["facts_em_at_opd_budget_ci"]),
                      f3(x["retention_at_opd_budget"]), f3(x["mc_retention_at_opd_budget"]), f3(x["facts_em_at_own"]),
                      f3(x["retention_at_own"]) + ("" if x["own_converged"] else " (not converged)")]
                     for a, x in rt["arms"].items()]))
    md.append("\nFacts EM vs tokens:\n")
    md.append(table(["milestone"] + [L(a) for a in arms],
                    [[f"{m:,}"] + [fci(r["curves"][a][i]["facts_em"], r["curves"][a][i]["facts_em_ci"]) for a in arms]
                     for i, m in enumerate(st.milestones)]))

    md += ["", "## C3: KL(T || S) on own vs random-mask states", ""]
    md.append(f"From the milestone evaluations (states of the evaluation decodes of both tasks). Matched milestone "
              f"for P3: **{r['state_kl']['matched_milestone']:,}** tokens (the first milestone at or after OPD's "
              "convergence budget).\n")
    md.append(table(["milestone"] + [f"{L(a)} own / random" for a in arms],
                    [[f"{m:,}"] + [f"{f3(r['curves'][a][i]['kl_own'])} / {f3(r['curves'][a][i]['kl_random'])}"
                                   for a in arms] for i, m in enumerate(st.milestones)]))
    md.append("\nTraining-time probe (held-out arithmetic prompts, the probe nearest each milestone):\n")
    md.append(table(["milestone"] + [f"{L(a)} own / random" for a in arms],
                    [["0 (S0)"] + [f3(r["probe"][a]["initial_own"]) + " / -" for a in arms]]
                    + [[f"{m:,}"] + [f"{f3(r['probe'][a]['at_milestones'][i]['own'])} / "
                                     f"{f3(r['probe'][a]['at_milestones'][i]['random'])}" for a in arms]
                       for i, m in enumerate(st.milestones)]))

    md += ["", "## Accuracy vs tokens per forward (tau sweep, final checkpoint, best LR)", ""]
    md.append("`low_confidence_dynamic` at each tau; cells are arithmetic EM / TPF (means over seeds); `static` is the "
              "milestone evaluation (4 steps per block).\n")
    sweep = r["tau_sweep"]
    md.append(table(["model", "static"] + [f"tau {x}" for x in s["taus"]],
                    [[L(a) if a != "s0" else "S0", f"{f3(sweep[a]['static']['em'])} / {f3(sweep[a]['static']['tpf'])}"]
                     + [f"{f3(x['em'])} / {f3(x['tpf'])}" for x in sweep[a]["rows"]] for a in arms + ["s0"]]))

    md += ["", "## Pre-registered criteria (study.md 5.8)", ""]
    md.append(table(["id", "criterion", "status", "detail"],
                    [[c["id"], c["criterion"], f"**{c['status']}**", c["detail"]] for c in r["criteria"]]))
    md += ["", "Not covered by this study's data:", ""] + [f"- {x}" for x in r["not_covered"]]

    md += ["", "## Runs (best LR)", ""]
    rows = []
    hz = s.get("horizon", {})
    for a in arms:
        for seed in s["seeds"]:
            run = st.seed_run(a, r["lr_selection"]["best"][a], seed)
            sm = run["summary"]
            ms = hz.get(a, {}).get("max_steps")
            rows.append([L(a), seed, r["lr_selection"]["best"][a], ftok(sm.get("train_tokens")),
                         f"{sm.get('optimizer_steps')} / {ms}" if ms else str(sm.get("optimizer_steps")),
                         f3(sm.get("wall_s"))])
    md.append(table(["arm", "seed", "lr", "train tokens", "optimizer steps / cosine horizon", "train s"], rows))
    md.append("\nThe cosine horizon comes from a calibration run per arm (RUN/calib); steps past it run at the LR floor.")
    return "\n".join(md) + "\n"


def clean(x):
    """JSON without Infinity: inf -> the string 'inf'."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the run directory of jobs/reproduce.sh (holds study.json)")
    ap.add_argument("--best-lr", metavar="ARM", help="print the LR picked for ARM and exit")
    ap.add_argument("--out-md", help="default RUN/report.md")
    ap.add_argument("--out-json", help="default RUN/report.json")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    a = ap.parse_args()
    try:
        st = Study(a.run, a.bootstrap)
        if a.best_lr:
            if a.best_lr not in st.s["arms"]:
                raise ReportError(f"arm {a.best_lr!r} is not in {a.run}/study.json (arms {st.s['arms']})")
            print(st.best_lr(a.best_lr)[0])
            return 0
        r = analyse(st)
        r["not_covered"] = NOT_COVERED
        md = markdown(st, r)
    except ReportError as e:
        print(f"study_report.py: {e}", file=sys.stderr)
        return 1
    out_md = a.out_md or os.path.join(a.run, "report.md")
    out_json = a.out_json or os.path.join(a.run, "report.json")
    with open(out_md, "w") as f:
        f.write(md)
    with open(out_json, "w") as f:
        json.dump(clean(r), f, indent=1)
    print(f"wrote {out_md} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
