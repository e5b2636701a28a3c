"""golden_io.py -- writer for the golden files the C++ parity tests read (tests/support/test_util.cpp).

Format (little endian): b"OPDG", u32 version=1, u32 count, then per entry: u32 name_len, name (utf-8),
u8 dtype (0 f32, 1 f64, 3 i32), u32 ndim, i64 dims[ndim], raw row-major data.
Inputs are generated here with a fixed torch.Generator seed and written next to the expected outputs,
so the C++ side never needs to reproduce torch's random numbers.
"""
import os
import struct
import subprocess
import sys

import torch


def import_shared_refs():
    """Imports ../shared/bench's opd_ref and torch_qwen3_ref (the independent PyTorch references) and
    returns (opd_ref, torch_qwen3_ref). Looked up in $OPDLM_SHARED_BENCH, then beside this checkout
    (<repo>/../shared/bench), then beside the repository this one was cloned from, when that is a local
    path, so `git clone . /tmp/c && cd /tmp/c && bash .ci/run` finds it too."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tried = []
    if os.environ.get("OPDLM_SHARED_BENCH"):
        tried.append(os.environ["OPDLM_SHARED_BENCH"])
    tried.append(os.path.join(repo, "..", "shared", "bench"))
    try:
        origin = subprocess.run(["git", "-C", repo, "config", "--get", "remote.origin.url"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        origin = ""
    if origin and os.path.isdir(origin):
        tried.append(os.path.join(origin, "..", "shared", "bench"))
    for d in tried:
        d = os.path.abspath(d)
        if os.path.isfile(os.path.join(d, "opd_ref.py")) and os.path.isfile(os.path.join(d, "torch_qwen3_ref.py")):
            if d not in sys.path:
                sys.path.insert(0, d)
            import opd_ref  # noqa: E402
            import torch_qwen3_ref  # noqa: E402
            return opd_ref, torch_qwen3_ref
    raise FileNotFoundError("opd_ref.py / torch_qwen3_ref.py (../shared/bench) not found in: " +
                            ", ".join(os.path.abspath(d) for d in tried) + " (set OPDLM_SHARED_BENCH)")

_CODES = {torch.float32: 0, torch.float64: 1, torch.int32: 3}


class GoldenWriter:
    def __init__(self):
        self.entries = {}

    def add(self, name, t):
        t = torch.as_tensor(t).detach().contiguous()
        if t.dtype == torch.int64:
            t = t.to(torch.int32)
        if t.dtype not in _CODES:
            raise ValueError(f"{name}: unsupported dtype {t.dtype}")
        if name in self.entries:
            raise ValueError(f"duplicate golden entry {name}")
        self.entries[name] = t

    def save(self, path):
        with open(path, "wb") as f:
            f.write(b"OPDG")
            f.write(struct.pack("<II", 1, len(self.entries)))
            for name, t in self.entries.items():
                nb = name.encode()
                f.write(struct.pack("<I", len(nb)))
                f.write(nb)
                f.write(struct.pack("<BI", _CODES[t.dtype], t.dim()))
                for d in t.shape:
                    f.write(struct.pack("<q", d))
                f.write(t.numpy().tobytes())
