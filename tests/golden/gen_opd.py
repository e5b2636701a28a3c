"""gen_opd.py -- OPD training-row cases dumped by ../shared/bench/opd_ref.py (--dump), for
tests/parity/test_opd_parity.cpp: <out>/opd_case_tied.json and <out>/opd_case_untied.json, each with
its HF weight directories <case>_teacher/ and <case>_student/ (F32 safetensors). Every expected value
(row losses of every loss type, gradient norms, per-position log-probs) is float64 from PyTorch.
The .bin of this group holds only the seeds, so gen_all's bookkeeping stays uniform."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_attention import _import_refs  # noqa: E402

OUT_DIR = None  # set by gen_all.py


def build(w):
    opd_ref, _ = _import_refs()
    torch.set_num_threads(2)
    seeds = {"opd_case_tied": (True, 1234), "opd_case_untied": (False, 4321)}
    for name, (tied, seed) in seeds.items():
        r = opd_ref.dump(os.path.join(OUT_DIR, name + ".json"), tied=tied, seed=seed)
        if not r["ok"]:
            raise RuntimeError(f"opd_ref.dump({name}) failed its own re-check: {r}")
    w.add("seeds", torch.tensor([s for _, s in seeds.values()], dtype=torch.int32))
