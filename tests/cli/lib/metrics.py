"""metrics.py -- read by the CLI tests: a run's metrics.jsonl as comparable lines."""
import json

# Fields that differ between equal runs: wall clock and timings, paths, the run id, the attempt, the
# host and job, the launch layout.
VOLATILE = ("elapsed_s", "train_tokens_per_s", "wall_s", "config", "parallel", "path", "run_id", "time", "attempt",
            "timings", "busy_s_by_rank", "mfu", "seconds", "host", "slurm_job_id", "layout", "world_size")


def lines(run_dir, skip_events=()):
    """Every metrics line of run_dir without the volatile fields, leaving out the given events."""
    out = []
    for line in open(f"{run_dir}/metrics.jsonl"):
        j = json.loads(line)
        if j["event"] in skip_events:
            continue
        for k in VOLATILE:
            j.pop(k, None)
        out.append(j)
    return out


def assert_close(ref, got, name, keys=("loss", "grad_norm", "own_state_kl", "random_state_kl", "final_loss",
                                        "probe_own_kl_first", "probe_own_kl_last", "probe_random_kl_last")):
    """The same lines, with `keys` within 1e-6 relative (absolute below 1) and everything else equal.

    Absolute below 1: these teachers and students nearly agree, so KLs of ~5e-4 are differences of
    f32 log-probs (~1e-7 absolute rounding each)."""
    assert len(ref) == len(got), f"{name}: {len(got)} metrics lines, expected {len(ref)}"
    for a, b in zip(ref, got):
        a, b = dict(a), dict(b)
        for k in keys:
            if a.get(k) is None:
                continue
            x, y = a.pop(k), b.pop(k)
            assert abs(x - y) <= 1e-6 * max(abs(x), 1.0), f"{name}: {k} {y} vs {x}"
        assert a == b, f"{name}: counts differ:\n{a}\n{b}"
