#!/usr/bin/python3
"""gen_all.py -- runs every tests/golden/gen_<group>.py and writes <out>/<group>.bin.

Each gen module defines `build(w: GoldenWriter)`: it makes inputs with a seeded torch.Generator,
runs the PyTorch reference (forward and autograd backward, float64 unless stated), and adds both.
Used by the ctest fixture `golden`; regenerate by hand with
    /usr/bin/python3 tests/golden/gen_all.py --out build/golden
"""
import argparse
import glob
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_io import GoldenWriter  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="one group name (gen_<group>.py)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "gen_*.py"))):
        group = os.path.basename(path)[4:-3]
        if group == "all" or (a.only and group != a.only):
            continue
        spec = importlib.util.spec_from_file_location("gen_" + group, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.OUT_DIR = a.out  # groups that write whole files (gen_opd) put them beside the .bin
        w = GoldenWriter()
        mod.build(w)
        w.save(os.path.join(a.out, group + ".bin"))
        print(f"golden: {group}: {len(w.entries)} tensors -> {a.out}/{group}.bin")


if __name__ == "__main__":
    main()
