#!/usr/bin/env python3
"""test_study_report.py -- end-to-end check of tools/study_report.py on a fake run directory.

Builds a tiny jobs/reproduce.sh-shaped run dir (study.json, metrics.jsonl with milestone events and
budget step lines, opdlm-eval/1 result JSONs, tau results), runs the tool as a subprocess and checks
the best-LR pick, tokens to 95% of the teacher's EM (interpolated in log tokens, censored), the
token and FLOP efficiency factors, the retention at OPD's budget and a few criteria against values
derived by hand below. Also: a missing file is an error that names it. Python 3 stdlib only.

    python3 tests/tools/test_study_report.py        # exit 0 = pass
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "study_report.py")
ARITH, FACTS = "/d/arith/eval_heldout.jsonl", "/d/facts/eval.jsonl"
MILESTONES = [1000, 2000, 4000, 8000]
SEEDS = ["1", "2"]
TAUS = ["0.7", "0.9"]

# arm -> lr -> seed -> (arith EM per milestone, facts EM per milestone)
EM = {
    "opd": {
        "3e-4": {"1": ([0.2, 0.6, 1.0, 1.0], [1.0, 0.9, 0.8, 0.8]),
                 "2": ([0.5, 1.0, 1.0, 1.0], [1.0, 1.0, 0.9, 0.9])},
        "1e-3": {"1": ([0.1, 0.2, 0.4, 0.5], [1.0] * 4), "2": ([0.1, 0.2, 0.4, 0.5], [1.0] * 4)},
    },
    "rm-kl": {"3e-4": {"1": ([0.0, 0.1, 0.5, 1.0], [0.9, 0.8, 0.7, 0.7]),
                       "2": ([0.0, 0.0, 0.3, 0.9], [0.9, 0.8, 0.7, 0.6])}},
    "rm-ce-gold": {"3e-4": {"1": ([0.0, 0.5, 1.0, 1.0], [0.8, 0.6, 0.5, 0.4]),
                            "2": ([0.0, 0.0, 0.95, 1.0], [0.8, 0.6, 0.4, 0.4])}},
}
for _arm in ("rm-kl", "rm-ce-gold"):  # the worse LR of the sweep: evaluated, never picked
    EM[_arm]["1e-3"] = {s: ([0.0, 0.0, 0.0, 0.1], [0.5] * 4) for s in SEEDS}
# FLOPs per training token: (student fwd, student bwd, teacher, rollout)
FLOPS = {"opd": (2, 4, 3, 1), "rm-kl": (2, 4, 2, 0), "rm-ce-gold": (2, 4, 0, 0)}
KL = {"opd": (0.10, 0.30), "rm-kl": (0.20, 0.25), "rm-ce-gold": (0.50, 0.60)}  # own, random
TAU_FIG = {"opd": [(0.9, 1.5), (0.95, 1.2)], "rm-kl": [(0.8, 1.4), (0.9, 1.1)],
           "rm-ce-gold": [(0.7, 1.5), (0.9, 1.2)], "s0": [(0.0, 2.0), (0.0, 1.5)]}


def result(arith_em, facts_em, kl=(None, None), gen_ppl=5.0, entropy=2.0, tpf=1.0, mode="diffusion"):
    return {"format": "opdlm-eval/1", "mode": mode,
            "tasks": [{"task": FACTS, "n": 100, "exact_match": facts_em, "token_accuracy": facts_em,
                       "mc_accuracy": facts_em, "tokens_per_forward": tpf},
                      {"task": ARITH, "n": 100, "exact_match": arith_em, "token_accuracy": arith_em,
                       "tokens_per_forward": tpf}],
            "gen_ppl": {"gen_ppl": gen_ppl, "unigram_entropy": entropy},
            "state_kl": {"own": kl[0], "random": kl[1]} if kl[0] is not None else {"note": "n/a"}}


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def make_run(d):
    write(f"{d}/study.json", {"format": "opdlm-study/1", "arms": list(EM), "seeds": SEEDS, "lrs": ["3e-4", "1e-3"],
                              "milestones": MILESTONES, "max_tokens": 8000, "taus": TAUS, "eval_limit": 100,
                              "tasks": {"arith": ARITH, "facts": FACTS}})
    write(f"{d}/eval/ref/teacher.json", result(1.0, 1.0, gen_ppl=5.0, entropy=2.0, mode="ar"))
    write(f"{d}/eval/ref/s0.json", result(0.0, 0.5, kl=(5.0, 5.0), gen_ppl=500.0, entropy=1.0))
    for arm, lrs in EM.items():
        for lr, seeds in lrs.items():
            for seed, (arith, facts) in seeds.items():
                for m, a, f in zip(MILESTONES, arith, facts):
                    write(f"{d}/eval/{arm}/lr_{lr}/seed_{seed}/tokens_{m}.json",
                          result(a, f, kl=KL[arm], gen_ppl=5.2, entropy=1.9))
                if lr != "3e-4":
                    continue  # only the best LR's training files are read
                tdir = f"{d}/train/{arm}/lr_{lr}/seed_{seed}"
                fw, bw, te, ro = FLOPS[arm]
                lines = []
                for tok in range(500, 8001, 500):
                    lines.append({"event": "step", "budget": {
                        "train_tokens": tok, "student_forward_flops": fw * tok, "student_backward_flops": bw * tok,
                        "teacher_flops": te * tok, "rollout_flops": ro * tok}})
                    if tok in MILESTONES:
                        lines.append({"event": "milestone", "milestone": tok, "train_tokens": tok})
                lines.append({"event": "probe", "train_tokens": 0, "own_state_kl": 5.0, "random_state_kl": 5.0})
                lines.append({"event": "probe", "train_tokens": 8000, "own_state_kl": KL[arm][0],
                              "random_state_kl": KL[arm][1]})
                os.makedirs(tdir, exist_ok=True)
                with open(f"{tdir}/metrics.jsonl", "w") as f:
                    f.write("\n".join(json.dumps(x) for x in lines) + "\n")
                write(f"{tdir}/summary.json", {"train_tokens": 8000, "optimizer_steps": 100, "wall_s": 1.0})
                for x, (em, tpf) in zip(TAUS, TAU_FIG[arm]):
                    write(f"{d}/tau/{arm}/lr_{lr}/seed_{seed}/tau_{x}.json", result(em, 1.0, tpf=tpf))
    for x, (em, tpf) in zip(TAUS, TAU_FIG["s0"]):
        write(f"{d}/tau/s0/tau_{x}.json", result(em, 0.5, tpf=tpf))


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)


class StudyReport(unittest.TestCase):
    def setUp(self):
        self.d = tempfile.mkdtemp(prefix="study_report_test.")
        make_run(self.d)

    def tearDown(self):
        shutil.rmtree(self.d)

    def report(self):
        p = run_tool(self.d, "--bootstrap", "200")
        self.assertEqual(p.returncode, 0, p.stderr)
        with open(f"{self.d}/report.json") as f:
            r = json.load(f)
        with open(f"{self.d}/report.md") as f:
            md = f.read()
        return r, md

    def test_best_lr(self):
        p = run_tool(self.d, "--best-lr", "opd")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.strip(), "3e-4")  # final EM 1.0 vs 0.5

    def test_tokens_to_threshold_and_factors(self):
        r, md = self.report()
        self.assertAlmostEqual(r["threshold"]["arith_em"], 0.95)
        t = r["tokens_to_threshold"]
        # OPD seed 1: 0.6 @ 2000 -> 1.0 @ 4000; (0.95-0.6)/0.4 = 0.875 of the log step: 2000 * 2**0.875
        # OPD seed 2: 0.5 @ 1000 -> 1.0 @ 2000; 0.45/0.5 = 0.9: 1000 * 2**0.9
        opd1, opd2 = 2000 * 2 ** 0.875, 1000 * 2 ** 0.9
        self.assertAlmostEqual(t["opd"]["per_seed"][0]["tokens"], opd1, places=6)
        self.assertAlmostEqual(t["opd"]["per_seed"][1]["tokens"], opd2, places=6)
        opd = (opd1 + opd2) / 2
        self.assertTrue(t["opd"]["exact"])
        self.assertAlmostEqual(t["opd"]["tokens_lo"], opd, places=6)
        # rm-ce-gold seed 1: 0.5 @ 2000 -> 1.0 @ 4000: 2000 * 2**0.9; seed 2 reaches 0.95 exactly at 4000
        ce = (2000 * 2 ** 0.9 + 4000) / 2
        self.assertAlmostEqual(t["rm-ce-gold"]["tokens_lo"], ce, places=6)
        # rm-kl seed 1: 0.5 @ 4000 -> 1.0 @ 8000: 4000 * 2**0.9; seed 2 never reaches it (censored)
        kl = t["rm-kl"]
        self.assertEqual([p["kind"] for p in kl["per_seed"]], ["interpolated", "censored"])
        self.assertAlmostEqual(kl["per_seed"][0]["tokens"], 4000 * 2 ** 0.9, places=6)
        self.assertAlmostEqual(kl["tokens_lo"], (4000 * 2 ** 0.9 + 8000) / 2, places=6)
        self.assertEqual(kl["tokens_hi"], "inf")
        self.assertEqual(kl["n_reached"], 1)
        # best RM arm = rm-ce-gold (uncensored); token factor = ce / opd
        e = r["efficiency"]["tokens"]
        self.assertEqual(e["rm_arm"], "rm-ce-gold")
        self.assertAlmostEqual(e["lo"], ce / opd, places=6)
        self.assertAlmostEqual(e["hi"], ce / opd, places=6)
        # FLOPs are 10 (OPD) and 6 (rm-ce-gold) per token, linear: factor = 6 ce / (10 opd)
        f = r["efficiency"]["flops"]
        self.assertEqual(f["rm_arm"], "rm-ce-gold")
        self.assertAlmostEqual(f["lo"], 6 * ce / (10 * opd), places=6)
        self.assertIn(f"{ce / opd:.2f}x", md)
        crit = {c["id"]: c for c in r["criteria"]}
        self.assertEqual(crit["P1a"]["status"], "pass")
        self.assertEqual(crit["P1c"]["status"], "fail")  # 1.40 < 5

    def test_retention_and_kl(self):
        r, _ = self.report()
        opd = (2000 * 2 ** 0.875 + 1000 * 2 ** 0.9) / 2  # OPD's convergence budget
        self.assertAlmostEqual(r["retention"]["opd_budget_tokens"], opd, places=6)
        x = math.log2(opd / 2000)  # position between the 2000 and 4000 milestones in log2 tokens
        opd_facts = ((0.9 - 0.1 * x) + (1.0 - 0.1 * x)) / 2
        ce_facts = ((0.6 - 0.1 * x) + (0.6 - 0.2 * x)) / 2
        ra = r["retention"]["arms"]
        self.assertAlmostEqual(ra["opd"]["retention_at_opd_budget"], opd_facts, places=6)
        self.assertAlmostEqual(ra["rm-ce-gold"]["retention_at_opd_budget"], ce_facts, places=6)
        crit = {c["id"]: c for c in r["criteria"]}
        self.assertEqual(crit["P2a"]["status"], "pass")   # ~0.90 >= 0.9
        self.assertEqual(crit["P2b"]["status"], "pass")
        self.assertEqual(r["state_kl"]["matched_milestone"], 4000)  # first milestone >= ~2767
        self.assertEqual(crit["P3a"]["status"], "pass")   # own: 0.10 < 0.20
        self.assertEqual(crit["P3b"]["status"], "pass")   # random: 0.25 <= 0.30
        self.assertEqual(crit["P3c"]["status"], "pass")   # OPD (0.95, 1.2) and (0.9, 1.5) dominate
        self.assertEqual(crit["S2"]["status"], "pass")

    def test_degenerate_teacher(self):
        write(f"{self.d}/eval/ref/teacher.json", result(0.0, 1.0, mode="ar"))
        r, md = self.report()
        crit = {c["id"]: c for c in r["criteria"]}
        self.assertEqual(crit["P1a"]["status"], "not covered")
        self.assertEqual(crit["P1c"]["status"], "not covered")
        self.assertEqual(crit["S1"]["status"], "fail")
        self.assertIn("T's arithmetic EM is 0", md)
        write(f"{self.d}/eval/ref/teacher.json", result(1.0, 0.2, mode="ar"))  # T does not know the facts
        r, _ = self.report()
        crit = {c["id"]: c for c in r["criteria"]}
        for cid in ("P2a", "P2b", "P2c"):
            self.assertEqual(crit[cid]["status"], "not covered", cid)

    def test_missing_file_is_named(self):
        gone = f"{self.d}/eval/rm-kl/lr_3e-4/seed_2/tokens_4000.json"
        os.remove(gone)
        p = run_tool(self.d)
        self.assertEqual(p.returncode, 1)
        self.assertIn(gone, p.stderr)
        self.assertFalse(os.path.exists(f"{self.d}/report.md"))


if __name__ == "__main__":
    unittest.main()
