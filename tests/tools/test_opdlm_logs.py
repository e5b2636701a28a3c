#!/usr/bin/env python3
"""test_opdlm_logs.py -- tools/opdlm_logs.py summary / stitch / compare / rollouts on synthetic run directories.

The issue's preemption scenario (tests/tools/synthetic_run.py writes it like the trainer would):
attempt 0 dies after RL step 7 with its last checkpoint at 6, attempt 1 stops on a signal after
step 12 (checkpoint 12), attempt 2 finishes at 20; checkpoints every 2 steps, probes every 5. The
expected lost steps, goodput and checkpoint overhead are computed by hand below from the
simulator's clock rules, not by the tool's code. Also: a pending tail, an old uncut log, tokens to
a threshold, the rollout viewer, and errors that name the file, line and field.
Runs the tool as a subprocess with /usr/bin/python3; needs no third-party module.

    python3 tests/tools/test_opdlm_logs.py        # exit 0 = pass
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOOL = os.path.join(ROOT, "tools", "opdlm_logs.py")
sys.path.insert(0, HERE)
import synthetic_run  # noqa: E402

# ---- the hand computation of the preemption scenario --------------------------------------------
# Clock rules of the simulator: RL step k takes 1 + 0.1 k s (its step line is written at its end), a
# probe 0.25 s, a checkpoint save 0.5 s (its line, with "seconds": 0.5, at the end of the save).
# Attempt 0 starts at t = 1000: probe 0 (1000.25), steps 1..7 (sum 7 + 0.1 * 28 = 9.8 s), saves at
# 2, 4, 6 (1.5 s), probe at 5 (0.25 s): its last line (step 7) at 1011.8. Its checkpoint 6 line is at
# 1000.25 + (6 + 2.1) + 1.5 + 0.25 = 1010.1.
A0_WALL = 1011.8 - 1000.0
A0_SINCE_CKPT = 1011.8 - 1010.1
# Attempt 1 starts at t = 2000 (resume from 6): steps 7..12 (6 + 0.1 * 57 = 11.7 s), saves 8, 10, 12,
# probe 10; the stop line right after checkpoint 12: 2000 + 11.7 + 1.5 + 0.25.
A1_WALL = 11.7 + 1.5 + 0.25
# Attempt 2 starts at t = 3000 (resume from 12): steps 13..20 (8 + 0.1 * 132 = 21.2 s), saves 14, 16,
# 18 and the final 20, probes 15 and 20; the end line last.
A2_WALL = 21.2 + 4 * 0.5 + 2 * 0.25
ALLOCATED = A0_WALL + A1_WALL + A2_WALL                  # 48.95 s
COMMITTED = 20 + 0.1 * 210                               # steps 1..20, each once: 41.0 s
LOST_S = 1.0 + 0.1 * 7                                   # attempt 0's step 7
CKPT_SAVES = 3 + 3 + 4                                   # 2,4,6 | 8,10,12 | 14,16,18,20
GOODPUT = COMMITTED / ALLOCATED
CKPT_OVERHEAD = CKPT_SAVES * 0.5 / ALLOCATED


def tool(*args, ok=True):
    p = subprocess.run(["/usr/bin/python3", TOOL, *args], capture_output=True, text=True, timeout=60)
    if ok and p.returncode != 0:
        raise AssertionError(f"opdlm_logs {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


def tool_json(*args):
    return json.loads(tool(*args, "--json").stdout)


class Base(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="opdlm_logs_test.")
        self.addCleanup(shutil.rmtree, self.dir)

    def path(self, *p):
        return os.path.join(self.dir, *p)

    def assert_fails(self, args, *needles):
        p = tool(*args, ok=False)
        self.assertEqual(p.returncode, 1, f"expected exit 1: {p.stdout} {p.stderr}")
        for n in needles:
            self.assertIn(n, p.stderr)
        return p


class Preempted(Base):
    def setUp(self):
        super().setUp()
        self.run = self.path("run")
        synthetic_run.preempted_run(self.run)

    def test_stitch_numbers(self):
        j = tool_json("stitch", self.run)
        t, at = j["totals"], j["attempts"]
        self.assertEqual([a["status"] for a in at], ["killed", "stopped (signal)", "finished"])
        self.assertEqual([a["lost_steps"] for a in at], [1, 0, 0])
        self.assertEqual([(a["from_step"], a["last_step"]) for a in at], [(0, 7), (6, 12), (12, 20)])
        self.assertEqual([a["committed_steps"] for a in at], [6, 6, 8])
        self.assertEqual([a["checkpoint_saves"] for a in at], [3, 3, 4])
        self.assertAlmostEqual(at[0]["lost_step_s"], LOST_S, delta=1e-9)
        self.assertAlmostEqual(at[0]["since_checkpoint_s"], A0_SINCE_CKPT, delta=1e-9)
        for a, wall in zip(at, (A0_WALL, A1_WALL, A2_WALL)):
            self.assertAlmostEqual(a["wall_s"], wall, delta=1e-9)
        self.assertEqual((t["attempts"], t["preemptions"], t["lost_steps"]), (3, 2, 1))
        self.assertEqual((t["committed_steps"], t["first_step"], t["committed_step"], t["pending_steps"]), (20, 1, 20, 0))
        self.assertTrue(t["each_step_once"])
        self.assertEqual(t["duplicate_step_lines_in_log"], 0)  # the trainer cut the log on each resume
        self.assertAlmostEqual(t["allocated_s"], ALLOCATED, delta=1e-9)
        self.assertAlmostEqual(t["committed_step_s"], COMMITTED, delta=1e-9)
        self.assertAlmostEqual(t["goodput"], GOODPUT, delta=1e-9)
        self.assertAlmostEqual(t["lost_step_s"], LOST_S, delta=1e-9)
        self.assertEqual(t["checkpoint_saves"], CKPT_SAVES)
        self.assertAlmostEqual(t["checkpoint_overhead"], CKPT_OVERHEAD, delta=1e-9)

    def test_merged_curve_has_each_step_once(self):
        out = self.path("merged.jsonl")
        tool("stitch", self.run, "--out", out)
        with open(out) as f:
            lines = [json.loads(line) for line in f]
        steps = [j for j in lines if j["event"] == "step"]
        self.assertEqual([j["rl_step"] for j in steps], list(range(1, 21)))
        # Step 7 is the redo of attempt 1, not the lost line of attempt 0.
        self.assertEqual(next(j["attempt"] for j in steps if j["rl_step"] == 7), 1)
        self.assertEqual([j["rl_step"] for j in lines if j["event"] == "probe"], [0, 5, 10, 15, 20])
        self.assertFalse(any(k.startswith("_") for j in lines for k in j), "internal keys leaked into the output")

    def test_stitch_text(self):
        out = tool("stitch", self.run).stdout
        self.assertIn("goodput: 83.8%", out)  # 41.0 / 48.95
        self.assertIn("lost to preemptions: 1 RL step(s), 1.70 s of step time, 2 preemption(s)", out)
        self.assertIn("checkpoint overhead: 5.00 s in 10 save(s) = 10.2% of allocated", out)

    def test_summary(self):
        s = tool_json("summary", self.run)
        self.assertEqual((s["status"], s["rl_steps"], s["optimizer_steps"], s["train_tokens"]), ("finished", 20, 40, 2000))
        self.assertEqual((s["flops"], s["generated_tokens"], s["attempts"], s["lost_steps"]), (80000.0, 1600, 3, 1))
        self.assertEqual((s["checkpoint_saves"], s["last_committed_checkpoint"], s["layout"]), (10, 20, "TP 1 x DP 2"))
        self.assertAlmostEqual(s["final_loss"], 1.0, delta=1e-12)
        self.assertAlmostEqual(s["own_state_kl"], 0.5 / 21, delta=1e-12)
        self.assertAlmostEqual(s["tokens_per_s_step"], 2000 / COMMITTED, delta=1e-9)
        self.assertAlmostEqual(s["tokens_per_s_wall"], 2000 / ALLOCATED, delta=1e-9)
        # Rank 1 is 1.1 x rank 0 and doubled on even steps: it is the straggler.
        self.assertEqual(s["slowest_rank"], 1)
        text = tool("summary", self.run).stdout
        self.assertIn("goodput", text)
        self.assertIn("83.8%", text)

    def test_rollouts(self):
        out = tool("rollouts", self.run, "--step", "10", "--index", "1").stdout
        self.assertIn("RL step 10, sample 91: 8 response tokens, block size 4, 6 rounds", out)
        lines = out.splitlines()
        # pos 5 (" 4") is committed in round 4, before pos 4 (" =") in round 5
        self.assertIn(["5", "1", "4", "25", "4"], [l.split() for l in lines])
        per_round = lines[lines.index("per round (the response so far; _ = still masked)"):]
        self.assertTrue(any(l.split()[:3] == ["4", "1", "5:"] and l.endswith("12 + 3_ 4__") for l in per_round), per_round)
        self.assertTrue(any(l.split()[:2] == ["6", "1"] and "7:<|endoftext|>" in l for l in per_round), per_round)
        listing = tool("rollouts", self.run, "--list").stdout.split()
        self.assertEqual(listing[-6:], ["1", "2", "10", "2", "20", "2"])
        self.assert_fails(["rollouts", self.run, "--step", "3"], "no rollout of RL step 3", "1, 10, 20")


class Pending(Base):
    def test_tail_after_the_last_checkpoint_is_not_committed(self):
        run = self.path("run")
        synthetic_run.Trainer(run).attempt(1000.0, die_after=7)  # no later attempt yet
        j = tool_json("stitch", run)
        t, a = j["totals"], j["attempts"][0]
        self.assertEqual(a["status"], "running or killed")
        self.assertEqual((t["committed_steps"], t["pending_steps"], t["lost_steps"]), (6, 1, 0))
        self.assertAlmostEqual(t["goodput"], (6 + 0.1 * 21) / A0_WALL, delta=1e-9)


class FreshRestart(Base):
    def test_death_before_the_first_checkpoint_loses_everything(self):
        """Checkpoints every 4: attempt 0 dies after step 3 with none, attempt 1 starts over and finishes."""
        run = self.path("run")
        t = synthetic_run.Trainer(run, ckpt_every=4)
        t.attempt(1000.0, die_after=3)
        t.attempt(2000.0)
        j = tool_json("stitch", run)
        tt, at = j["totals"], j["attempts"]
        # Attempt 0: probe 0 (0.25 s) and steps 1..3 (3 + 0.1 * 6 s). Attempt 1: probes 0, 5, 10, 15, 20,
        # steps 1..20 (41 s), saves 4, 8, 12, 16, 20.
        wall0, wall1 = 0.25 + 3.6, 5 * 0.25 + 41.0 + 5 * 0.5
        self.assertEqual([(a["status"], a["lost_steps"], a["committed_steps"]) for a in at],
                         [("killed", 3, 0), ("finished", 0, 20)])
        self.assertAlmostEqual(at[0]["lost_step_s"], 3.6, delta=1e-9)
        self.assertAlmostEqual(at[0]["since_checkpoint_s"], wall0, delta=1e-9)  # no save: since its start
        self.assertAlmostEqual(tt["allocated_s"], wall0 + wall1, delta=1e-9)
        self.assertAlmostEqual(tt["goodput"], 41.0 / (wall0 + wall1), delta=1e-9)
        self.assertEqual((tt["committed_steps"], tt["first_step"], tt["preemptions"]), (20, 1, 1))


class Rollback(Base):
    def test_rollback_is_not_a_preemption(self):
        """A spike at step 4 rolls back to checkpoint 2 within attempt 0: the cut lines (the save of 2 and
        step 3) are roll-back losses, the re-announced checkpoint line is not a save."""
        run = self.path("run")
        os.makedirs(run)

        def step(k, t):
            return {"event": "step", "rl_step": k, "loss": 1.0, "budget": {"train_tokens": 10 * k},
                    "timings": {"step_s": 1.0}, "time": t, "attempt": 0}
        kept = [{"event": "start", "mode": "opd", "time": 0.0, "attempt": 0}, step(1, 1.0), step(2, 2.0),
                {"event": "checkpoint", "rl_step": 2, "path": "c2", "time": 4.5, "attempt": 0},
                {"event": "rollback", "rl_step": 4, "to_rl_step": 2, "time": 4.5, "attempt": 0},
                {"event": "skip_batch", "rl_step": 3, "time": 4.5, "attempt": 0},
                step(3, 5.5), step(4, 6.5),
                {"event": "checkpoint", "rl_step": 4, "path": "c4", "seconds": 0.5, "time": 7.0, "attempt": 0},
                {"event": "end", "rl_steps": 4, "time": 7.0, "attempt": 0}]
        lost = [{"event": "checkpoint", "rl_step": 2, "path": "c2", "seconds": 0.5, "time": 2.5, "attempt": 0},
                step(3, 3.5)]
        with open(os.path.join(run, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(j) + "\n" for j in kept)
        with open(os.path.join(run, "metrics.lost.jsonl"), "w") as f:
            f.writelines(json.dumps(dict(j, lost_in_attempt=0, lost_by="rollback")) + "\n" for j in lost)
        t = tool_json("stitch", run)["totals"]
        self.assertEqual((t["lost_steps"], t["rollback_lost_steps"], t["preemptions"]), (0, 1, 0))
        self.assertEqual((t["checkpoint_saves"], t["committed_steps"]), (2, 4))
        self.assertAlmostEqual(t["goodput"], 4.0 / 7.0, delta=1e-12)
        self.assertAlmostEqual(t["checkpoint_overhead"], 1.0 / 7.0, delta=1e-12)
        self.assertEqual(tool_json("summary", run)["events"], {"rollback": 1, "skip_batch": 1})


class OlderLog(Base):
    def test_uncut_log_without_stamps(self):
        """A log with no attempt/time fields that was not cut back on resume: steps 1..7, checkpoints 2, 4,
        6, then a resume at 6 and steps 7..10: the merged curve has each step once."""
        run = self.path("old")
        os.makedirs(run)
        lines = [{"event": "start", "mode": "opd", "run_id": "x", "params": 1, "parallel": {"tp": 1, "dp": 1}}]
        for k in range(1, 8):
            lines.append({"event": "step", "rl_step": k, "loss": 1.0 / k, "elapsed_s": k, "budget": {"train_tokens": 10 * k}})
            if k % 2 == 0:
                lines.append({"event": "checkpoint", "rl_step": k, "path": f"c{k}"})
        lines += [{"event": "checkpoint", "rl_step": 6, "path": "c6"}, {"event": "resume", "rl_step": 6}]
        for k in range(7, 11):
            lines.append({"event": "step", "rl_step": k, "loss": 1.0 / k, "elapsed_s": k - 6, "budget": {"train_tokens": 10 * k}})
        lines.append({"event": "end", "rl_steps": 10, "final_loss": 0.1})
        with open(os.path.join(run, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(j) + "\n" for j in lines)
        out = self.path("merged.jsonl")
        p = tool("stitch", run, "--json", "--out", out)
        t = json.loads(p.stdout)["totals"]
        with open(out) as f:
            self.assertEqual([json.loads(line)["rl_step"] for line in f], list(range(1, 11)))
        self.assertEqual((t["attempts"], t["superseded_lines"], t["committed_steps"], t["lost_steps"]), (2, 1, 10, 1))
        self.assertEqual(t["duplicate_step_lines_in_log"], 1)  # step 7 twice in the file, once in the curve
        self.assertIsNone(t["goodput"])  # no time stamps: not computable, not guessed
        self.assertIn("no 'attempt'/'time' fields", p.stderr)
        s = tool_json("summary", run)
        self.assertEqual((s["rl_steps"], s["status"], s["wall_s"]), (10, "finished", 7 + 4))


class Compare(Base):
    def test_tokens_to_threshold(self):
        a, b = self.path("opd"), self.path("rmkl")
        synthetic_run.Trainer(a).attempt(0.0)
        synthetic_run.Trainer(b, loss_fn=lambda k: 2.0 - 0.025 * k).attempt(0.0)
        j = tool_json("compare", a, b, "--threshold", "loss<=1.475", "--threshold", "own_state_kl<=0.6",
                      "--at", "1050,2000")
        ra, rb = j["runs"]
        # A: loss 2 - 0.05 k at 100 k tokens: 1.5 at k = 10, 1.45 at k = 11 -> 1.475 half way: 1050 tokens,
        # FLOPs 4 x 1000 x 10.5.
        ca = ra["thresholds"]["loss<=1.475"]
        self.assertTrue(ca["reached"])
        self.assertAlmostEqual(ca["tokens"], 1050.0, delta=1e-9)
        self.assertAlmostEqual(ca["flops"], 42000.0, delta=1e-6)
        self.assertFalse(rb["thresholds"]["loss<=1.475"]["reached"])  # B ends at 1.5
        first = ra["thresholds"]["own_state_kl<=0.6"]  # the probe at step 0 already has 0.5
        self.assertEqual((first["reached"], first["tokens"], first["at_first_point"]), (True, 0.0, True))
        self.assertAlmostEqual(ra["at"][0][1], 1.475, delta=1e-12)
        self.assertAlmostEqual(rb["at"][1][1], 1.5, delta=1e-12)
        f = tool_json("compare", a, "--x", "flops", "--metric", "own_state_kl")
        self.assertEqual([p[0] for p in f["runs"][0]["points"]], [0.0, 20000.0, 40000.0, 60000.0, 80000.0])
        text = tool("compare", a, b, "--labels", "OPD,RM-KL", "--threshold", "loss<=1.475").stdout
        self.assertIn("OPD", text)
        self.assertIn("not reached (> 2,000)", text)
        self.assert_fails(["compare", a, "--threshold", "loss=1"], "--threshold 'loss=1'")
        self.assert_fails(["compare", a, "--metric", "accuracy"], "metrics.jsonl: no committed step, probe or eval line has 'accuracy'")


class Errors(Base):
    def write_lines(self, name, lines, tail="\n"):
        run = self.path(name)
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "metrics.jsonl"), "w") as f:
            f.write("\n".join(lines) + tail)
        return run

    def good(self, k):
        return json.dumps({"event": "step", "rl_step": k, "loss": 1.0, "budget": {"train_tokens": k}})

    def test_missing_file(self):
        os.makedirs(self.path("empty"))
        self.assert_fails(["summary", self.path("empty")], os.path.join(self.path("empty"), "metrics.jsonl") + ": missing file")
        self.assert_fails(["stitch", self.path("nowhere")], self.path("nowhere") + ": not a directory")

    def test_malformed_line_named(self):
        run = self.write_lines("bad", [self.good(1), self.good(2), "{not json", self.good(3)])
        self.assert_fails(["stitch", run], os.path.join(run, "metrics.jsonl") + ":3: not a JSON line")

    def test_missing_field_named(self):
        run = self.write_lines("nofield", [self.good(1), json.dumps({"event": "step", "loss": 1.0})])
        self.assert_fails(["summary", run], "metrics.jsonl:2: 'step' line has no 'rl_step'")
        run = self.write_lines("noevent", [self.good(1), json.dumps({"rl_step": 2})])
        self.assert_fails(["summary", run], "metrics.jsonl:2: no 'event' field")

    def test_wrong_type_named(self):
        run = self.write_lines("type", [self.good(1), json.dumps({"event": "step", "rl_step": 2, "loss": "x",
                                                                  "budget": {"train_tokens": 2}})])
        self.assert_fails(["summary", run], "metrics.jsonl:2: 'step' line: 'loss' is \"x\", not a number")

    def test_lost_file_field_named(self):
        run = self.write_lines("lost", [self.good(1)])
        with open(os.path.join(run, "metrics.lost.jsonl"), "w") as f:
            f.write(self.good(2) + "\n")
        self.assert_fails(["stitch", run], "metrics.lost.jsonl:1: 'step' line has no 'lost_in_attempt'")

    def test_torn_last_line_is_a_warning(self):
        run = self.write_lines("torn", [self.good(1), self.good(2), '{"event": "step", "rl_st'], tail="")
        p = tool("stitch", run, "--json")
        self.assertIn("metrics.jsonl:3: skipped a torn last line", p.stderr)
        self.assertEqual(json.loads(p.stdout)["totals"]["pending_steps"], 2)  # no checkpoint: nothing committed

    def test_bad_rollout_named(self):
        run = self.write_lines("ro", [self.good(1)])
        r = {"rl_step": 1, "sample_id": 0, "response_ids": [1, 2, 3], "step_map": [1, 2], "block_size": 2}
        with open(os.path.join(run, "rollouts.jsonl"), "w") as f:
            f.write(json.dumps(dict(r, step_map=[1, 2, 2])) + "\n" + json.dumps(r) + "\n")
        self.assert_fails(["rollouts", run, "--step", "1", "--index", "0"],
                          "rollouts.jsonl:2: rollout: 'step_map' has 2 entries, 'response_ids' 3")


if __name__ == "__main__":
    unittest.main(verbosity=1)
