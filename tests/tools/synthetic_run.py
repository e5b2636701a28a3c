"""synthetic_run.py -- writes fake `opdlm train` run directories for the tests of tools/opdlm_logs.py.

A small simulator of the trainer's logging (src/train/opd_trainer.cpp, docs/logs.md): a clock, the
metrics_offset a checkpoint records before its `checkpoint` line, the cut on resume that appends the
cut-off lines to metrics.lost.jsonl (tagged lost_in_attempt / lost_by), the re-announced checkpoint
and `resume` lines, `stop` and `end`. The tests check the tool against numbers computed by hand, not
against this file. Python 3 stdlib only.
"""
import json
import os

STEP_TOKENS = 100       # training tokens per RL step
STEP_FLOPS = 1000.0     # each of the four FLOP counters grows by this per RL step
CKPT_S, PROBE_S = 0.5, 0.25


def step_s(k):
    """The step time of RL step k (seconds)."""
    return 1.0 + 0.1 * k


def loss(k):
    return 2.0 - 0.05 * k


class Trainer:
    """Writes RUN/metrics.jsonl like the trainer; one `attempt(...)` call per start."""

    def __init__(self, run, rl_steps=20, ckpt_every=2, probe_every=5, ranks=2, rollouts=True, loss_fn=loss):
        self.run, self.rl_steps, self.ckpt_every, self.probe_every = run, rl_steps, ckpt_every, probe_every
        self.loss_fn = loss_fn
        self.ranks, self.rollouts = ranks, rollouts
        os.makedirs(run, exist_ok=True)
        self.metrics = os.path.join(run, "metrics.jsonl")
        self.lost = os.path.join(run, "metrics.lost.jsonl")
        self.offsets = {}  # checkpoint step -> metrics byte offset
        self.n_attempts = 0

    def write(self, obj):
        obj = dict(obj, time=self.clock, attempt=self.attempt_no)
        with open(self.metrics, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def step_line(self, k):
        b = {"rollouts": 10 * k, "skipped_prompts": 0, "generated_tokens": 80 * k, "train_prompt_tokens": 40 * k,
             "train_response_tokens": 60 * k, "train_tokens": STEP_TOKENS * k, "rows": 8 * k, "loss_positions": 30 * k}
        b.update({key: STEP_FLOPS * k for key in ("rollout_flops", "teacher_flops", "student_forward_flops",
                                                   "student_backward_flops")})
        s = step_s(k)
        # rank r is (1 + 0.1 r) x rank 0's busy time; the last rank straggles on even steps
        busy = [s * (1 + 0.1 * r) for r in range(self.ranks)]
        if k % 2 == 0:
            busy[-1] *= 2
        return {"event": "step", "rl_step": k, "optimizer_steps": 2 * k, "loss": self.loss_fn(k), "grad_norm": 1.0 / k,
                "lr": 1e-3, "max_new_tokens": 8, "samples": 10, "rows": 8, "masked_fraction": 0.5,
                "elapsed_s": 0.0, "train_tokens_per_s": 0.0, "budget": b, "mean_response_len": 8.0, "eos_rate": 0.5,
                "rollout_tokens_per_forward": 1.5, "run_id": "synthetic0000001", "layout": {"tp": 1, "dp": self.ranks},
                "timings": {"step_s": s, "rollout_s": s / 4, "teacher_s": s / 4, "student_s": s / 4,
                            "optimizer_s": s / 8, "communication_s": s / 8},
                "busy_s_by_rank": busy, "flops": 4 * STEP_FLOPS, "mfu": None}

    def rollout_lines(self, k):
        out = []
        for i in range(2):
            pieces = ["1", "2", " +", " 3", " =", " 4", "\n", "<|endoftext|>"]
            out.append({"rl_step": k, "sample_id": 10 * (k - 1) + i, "prompt": f"12 + 3{i} =",
                        "prompt_ids": [5, 6, 7], "response_ids": [20 + j for j in range(8)], "response_pieces": pieces,
                        "step_map": [1, 1, 2, 3, 5, 4, 6, 6], "block_size": 4, "stopped_at_eos": True})
        return out

    def attempt(self, t0, die_after=None, stop_after=None, host="node01", job="4242"):
        """One start at clock t0: resumes from the last checkpoint it can see, trains until it dies after
        RL step die_after (no more lines), stops after stop_after (checkpoint + stop line), or ends."""
        self.attempt_no = self.n_attempts
        self.n_attempts += 1
        self.clock = t0
        start = max(self.offsets, default=0)
        if self.attempt_no > 0 and start > 0:
            off = self.offsets[start]
            with open(self.metrics, "rb") as f:
                data = f.read()
            cut = [json.loads(l) for l in data[off:].decode().splitlines() if l.strip()]
            with open(self.lost, "a") as f:
                for j in cut:
                    j["lost_in_attempt"] = j["attempt"]
                    j["lost_by"] = "restart"
                    f.write(json.dumps(j) + "\n")
            with open(self.metrics, "wb") as f:
                f.write(data[:off])
            self.offsets = {s: o for s, o in self.offsets.items() if s <= start}
            self.write({"event": "checkpoint", "rl_step": start, "path": f"{self.run}/checkpoints/step_{start:08d}"})
            self.write({"event": "resume", "run_id": "synthetic0000001", "from": f"ck{start}", "rl_step": start,
                        "optimizer_steps": 2 * start, "saved_layout": {"tp": 1, "dp": self.ranks}, "skipped": [],
                        "layout": {"tp": 1, "dp": self.ranks}, "host": host, "slurm_job_id": job})
        else:
            if self.attempt_no > 0:  # no checkpoint: the dead attempt's whole log is lost, moved aside
                with open(self.metrics) as f:
                    cut = [json.loads(line) for line in f if line.strip()]
                with open(self.lost, "a") as f:
                    for j in cut:
                        f.write(json.dumps(dict(j, lost_in_attempt=j["attempt"], lost_by="restart")) + "\n")
                os.replace(self.metrics, self.metrics + ".before_restart")
            self.write({"event": "start", "mode": "opd", "run_id": "synthetic0000001", "params": 12345, "prompts": 200,
                        "parallel": {"tp": 1, "dp": self.ranks, "rows_per_rank": 4, "deterministic_shards": 0},
                        "sampler": {"block_size": 4}, "config": "[run]\nout_dir = synthetic\n", "host": host,
                        "world_size": self.ranks, "slurm_job_id": job})
            self.probe(0)
        last_ckpt = start
        for k in range(start + 1, self.rl_steps + 1):
            self.clock += step_s(k)
            if self.rollouts and (k == 1 or k % 10 == 0):
                with open(os.path.join(self.run, "rollouts.jsonl"), "a") as f:
                    for r in self.rollout_lines(k):
                        f.write(json.dumps(r) + "\n")
            self.write(self.step_line(k))
            if k == die_after:
                return
            if self.probe_every and k % self.probe_every == 0 and k < self.rl_steps:
                self.probe(k)
            if self.ckpt_every and k % self.ckpt_every == 0 and k < self.rl_steps:
                self.checkpoint(k)
                last_ckpt = k
            if k == stop_after:
                if last_ckpt != k:
                    self.checkpoint(k)
                self.write({"event": "stop", "rl_step": k, "reason": "signal", "signal": 15, "ranks_signalled": 1,
                            "elapsed_s": self.clock - t0, "margin_s": 5.0, "checkpoint": f"ck{k}"})
                return
        if self.ckpt_every and last_ckpt != self.rl_steps:
            self.checkpoint(self.rl_steps)
        self.probe(self.rl_steps)
        self.write({"event": "save", "rl_step": self.rl_steps, "path": "model.h5"})
        self.write({"event": "end", "mode": "opd", "rl_steps": self.rl_steps, "optimizer_steps": 2 * self.rl_steps,
                    "train_tokens": STEP_TOKENS * self.rl_steps, "wall_s": self.clock - t0,
                    "final_loss": self.loss_fn(self.rl_steps)})

    def probe(self, k):
        self.clock += PROBE_S
        self.write({"event": "probe", "rl_step": k, "train_tokens": STEP_TOKENS * k, "own_state_kl": 0.5 / (1 + k),
                    "random_state_kl": 0.8 / (1 + k), "rows": 4})

    def checkpoint(self, k):
        self.offsets[k] = os.path.getsize(self.metrics)
        self.clock += CKPT_S
        self.write({"event": "checkpoint", "rl_step": k, "path": f"{self.run}/checkpoints/step_{k:08d}",
                    "seconds": CKPT_S})


def preempted_run(run):
    """The issue's scenario: attempt 0 dies after RL step 7 (last checkpoint 6), attempt 1 stops on a
    signal after step 12 (checkpoint 12), attempt 2 finishes at 20. Checkpoints every 2 steps."""
    t = Trainer(run)
    t.attempt(1000.0, die_after=7)
    t.attempt(2000.0, stop_after=12)
    t.attempt(3000.0)
    return t
