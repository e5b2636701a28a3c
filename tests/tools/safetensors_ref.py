"""safetensors_ref.py -- an independent safetensors writer/reader (numpy + json + struct only; the
`safetensors` package is not installed) for the C++ reader/writer tests in tests/unit/test_safetensors.cpp.

  safetensors_ref.py write OUT_DIR
      OUT_DIR/py.safetensors: F32, F16 (all 65536 bit patterns), BF16 tensors, header keys in a
      different order than the data, no header padding, __metadata__ with two strings.
      OUT_DIR/py_expected.safetensors: the same tensors converted to F32 by numpy (F16 via
      numpy's own half -> float conversion, BF16 by shifting the bits into the upper half).
  safetensors_ref.py check FILE
      Parses FILE by hand, checks the format rules (8-byte length, JSON header, offsets tiling the
      data exactly) and prints "name dtype shape sha256(bytes)" per tensor, sorted by name.
"""
import hashlib
import json
import os
import struct
import sys

import numpy as np


def write_st(path, tensors, order, metadata=None, pad=False):
    """tensors: name -> (dtype string, shape, raw bytes); order: data order."""
    header, off, blobs = {}, 0, []
    if metadata is not None:
        header["__metadata__"] = metadata
    for name in order:
        dt, shape, raw = tensors[name]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    # header key order: reversed data order, so a reader must sort by offsets itself
    h = {k: header[k] for k in reversed(list(header.keys()))}
    hb = json.dumps(h).encode()
    if pad:
        hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


def cmd_write(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(1234)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    a[0, 0], a[0, 1], a[0, 2] = np.inf, -0.0, np.float32(1e-40)  # inf, signed zero, f32 subnormal
    f16_bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    bf16_bits = np.array([0x0000, 0x8000, 0x3F80, 0xC000, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x7F7F, 0x3EAA, 0x7F81],
                         dtype=np.uint16)
    tensors = {
        "a.f32": ("F32", a.shape, a.astype("<f4").tobytes()),
        "b.f16_all": ("F16", f16_bits.shape, f16_bits.astype("<u2").tobytes()),
        "c.bf16": ("BF16", bf16_bits.shape, bf16_bits.astype("<u2").tobytes()),
        "d.empty": ("F32", (0, 5), b""),
    }
    write_st(os.path.join(out, "py.safetensors"), tensors, ["b.f16_all", "a.f32", "d.empty", "c.bf16"],
             metadata={"format": "pt", "writer": "numpy"})
    f16_as_f32 = f16_bits.view(np.float16).astype(np.float32)  # numpy's conversion (keeps NaN payloads)
    bf16_as_f32 = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
    expected = {
        "a.f32": ("F32", a.shape, a.astype("<f4").tobytes()),
        "b.f16_all": ("F32", f16_bits.shape, f16_as_f32.astype("<f4").tobytes()),
        "c.bf16": ("F32", bf16_bits.shape, bf16_as_f32.astype("<f4").tobytes()),
        "d.empty": ("F32", (0, 5), b""),
    }
    write_st(os.path.join(out, "py_expected.safetensors"), expected, sorted(expected), pad=True)


SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def cmd_check(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    assert 8 + n <= len(data), "header length beyond the file"
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    assert (8 + n) % 8 == 0, "data section not 8-byte aligned"
    meta = header.pop("__metadata__", {})
    assert all(isinstance(v, str) for v in meta.values())
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items())
    pos = 0
    for b, e, k in spans:
        assert b == pos, f"{k}: offsets {b} != {pos}"
        count = int(np.prod(header[k]["shape"], dtype=np.int64))
        assert e - b == count * SIZES[header[k]["dtype"]], f"{k}: span/shape mismatch"
        pos = e
    assert pos == len(body), "trailing bytes"
    for k in sorted(header):
        v = header[k]
        b, e = v["data_offsets"]
        shape = "x".join(str(d) for d in v["shape"])
        print(k, v["dtype"], shape, hashlib.sha256(body[b:e]).hexdigest())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        cmd_write(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "check":
        cmd_check(sys.argv[2])
    else:
        sys.exit(__doc__)
