#!/usr/bin/env python3
"""test_opdlm_logs_report.py -- `opdlm_logs.py plot` and `report` on a synthetic preempted run, and the
report rendered by headless Chromium.

Checks: plot writes the five PNGs the run has data for (and says the accuracy plot has none); the
report is one self-contained file (no http(s):// reference, no src/href other than data: URIs and
in-page anchors, every image inlined as a PNG data URI that decodes, HTML-escaped rollout text);
Chromium renders it to a screenshot that is not blank: many non-white pixels and saturated ones
(the plots' lines and the round-coloured rollout tokens). The screenshot is read back with
matplotlib (python3-matplotlib, already a dependency of the tool).
Exit 77 (ctest SKIP_RETURN_CODE) when chromium is not installed.

    python3 tests/tools/test_opdlm_logs_report.py     # exit 0 = pass, 77 = skipped
"""
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOOL = os.path.join(ROOT, "tools", "opdlm_logs.py")
sys.path.insert(0, HERE)
import synthetic_run  # noqa: E402


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def run(*args, timeout=60):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        fail(f"{' '.join(args)} exited {p.returncode}: {p.stderr[-2000:]}")
    return p


def main():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("SKIP: no chromium (tools/install-deps.sh installs it)")
        return 77
    d = tempfile.mkdtemp(prefix="opdlm_logs_report.")
    try:
        rd = os.path.join(d, "run")
        synthetic_run.preempted_run(rd)
        # A rollout piece with markup: the page must show it, not run it.
        with open(os.path.join(rd, "rollouts.jsonl"), "a") as f:
            f.write('{"rl_step": 20, "sample_id": 999, "prompt": "<b>x</b> & y", "response_ids": [1, 2], '
                    '"response_pieces": ["<script>", "&"], "step_map": [1, 1], "block_size": 2}\n')

        out = run("/usr/bin/python3", TOOL, "plot", rd, "--out", os.path.join(d, "plots")).stdout
        pngs = sorted(os.listdir(os.path.join(d, "plots")))
        if pngs != ["attempts.png", "kl.png", "loss.png", "step_time_by_rank.png", "throughput.png"]:
            fail(f"plot wrote {pngs}")
        if "accuracy.png: not written" not in out:
            fail(f"plot did not say the accuracy plot has no data: {out}")

        page_path = os.path.join(d, "report.html")
        run("/usr/bin/python3", TOOL, "report", rd, "--out", page_path, "--rollouts", "4")
        with open(page_path, encoding="utf-8") as f:
            page = f.read()
        if re.search(r"https?://", page):
            fail("the report references an http(s) URL: " + re.search(r".{40}https?://.{40}", page).group(0))
        refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
        if any(not (r.startswith("data:") or r.startswith("#")) for r in refs):
            fail(f"the report references files: {[r for r in refs if not r.startswith('data:')][:3]}")
        if "<link" in page or "@import" in page or "url(" in page:
            fail("the report loads a stylesheet or a URL from CSS")
        images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
        if len(images) != 5:
            fail(f"{len(images)} inlined images, expected 5 (loss, KL, throughput, per-rank, attempts)")
        for b in images:
            if not base64.b64decode(b).startswith(b"\x89PNG\r\n\x1a\n"):
                fail("an inlined image is not a PNG")
        if "<script>" in page or "&lt;script&gt;" not in page or "&lt;b&gt;x&lt;/b&gt; &amp; y" not in page:
            fail("rollout text is not HTML-escaped")
        for needle in ("goodput: 83.8%", "killed", "stopped (signal)", "RL step 20, sample 999", "title=\"position 5, block 1, round 4\""):
            if needle not in page:
                fail(f"the report lacks {needle!r}")

        shot = os.path.join(d, "report.png")
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={os.path.join(d, 'profile')}", "--hide-scrollbars", f"--screenshot={shot}",
               "--window-size=1200,2000", "file://" + page_path]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ, HOME=d))
        if p.returncode != 0 or not os.path.isfile(shot):
            fail(f"chromium exited {p.returncode}, screenshot {'missing' if not os.path.isfile(shot) else 'written'}: "
                 f"{p.stderr[-1500:]}")
        size = os.path.getsize(shot)
        if size < 50_000:
            fail(f"the screenshot is {size} bytes: blank?")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.image
        img = matplotlib.image.imread(shot)  # float RGB(A) in [0, 1], rows x columns x channels
        h, w = img.shape[:2]
        if (h, w) != (2000, 1200):
            fail(f"screenshot is {w}x{h}, expected 1200x2000")
        rgb = img[:, :, :3]
        nonwhite = float((rgb.min(axis=2) < 0.9).mean())
        saturated = int(((rgb.max(axis=2) - rgb.min(axis=2)) > 0.3).sum())
        if nonwhite < 0.03 or saturated < 2000:
            fail(f"the screenshot looks blank: {nonwhite:.1%} non-white pixels, {saturated} saturated")
        print(f"report: {len(page) // 1024} KiB, 5 inlined plots; chromium screenshot {size // 1024} KiB, "
              f"{nonwhite:.1%} non-white, {saturated} saturated pixels")
        return 0
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"kept {d}")


if __name__ == "__main__":
    sys.exit(main())
