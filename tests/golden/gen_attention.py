"""gen_attention.py -- PyTorch goldens for ops::attention_forward / attention_backward (GQA, masks).

Masks come from the shared references: opd_ref.build_training_mask for training rows and
torch_qwen3_ref.build_mask for causal / block-causal (positions shifted so the block grid starts at
the first response token, A 1), with the pad rule of B 1.5 applied. The reference is an explicit
softmax(scale Q K^T + mask) V in float64 with repeat_interleave'd kv heads, and autograd for a fixed
random dout. Per case "<name>.": inputs q k v dout (f32), outputs o lse dq dk dv (f64), scale (f64),
masks (i32 [n, 6]: kind 0 causal / 1 block_causal / 2 training, b, pad_left, prompt_len,
response_len, q_offset) and allowed (i32 [B, Tq, Tk], the boolean masks themselves).
"""

import torch

from golden_io import import_shared_refs  # noqa: E402

_import_refs = import_shared_refs  # (opd_ref, torch_qwen3_ref); gen_model and gen_opd import it from here


CAUSAL, BLOCK, TRAINING = 0, 1, 2


def _pad_rule(m, pad_left):
    """B 1.5: pad columns disallowed for every row; a row left with no key attends to itself."""
    m = m.clone()
    m[:, :pad_left] = False
    for r in (~m.any(dim=1)).nonzero().flatten().tolist():
        m[r, r] = True  # m is square over absolute positions
    return m


def _mask(refs, p, tq, tk):
    """Bool [tq, tk] for descriptor p = (kind, b, pad_left, P, L1, q_offset)."""
    opd_ref, tq_ref = refs
    kind, b, pad, P, L1, off = p
    if kind == TRAINING:
        return opd_ref.build_training_mask(P, L1, b, pad)
    L0 = pad + P
    qpos, kpos = torch.arange(off, off + tq), torch.arange(tk)
    if kind == CAUSAL:
        full = tq_ref.build_mask("causal", torch.arange(tk), kpos)
    else:
        s = (-L0) % b  # shift so that L0 (first response token) starts a block of the 0-aligned grid
        full = tq_ref.build_mask("block", torch.arange(tk) + s, kpos + s, b)
    # Apply the pad rule on the square [tk, tk] mask of absolute positions, then take the query rows.
    return _pad_rule(full, pad)[qpos]


def _case(w, refs, name, gen, B, Tq, Tk, Hq, Hkv, D, params):
    scale = D ** -0.5
    q = torch.rand(B, Tq, Hq, D, generator=gen) * 2 - 1
    k = torch.rand(B, Tk, Hkv, D, generator=gen) * 2 - 1
    v = torch.rand(B, Tk, Hkv, D, generator=gen) * 2 - 1
    dout = torch.rand(B, Tq, Hq, D, generator=gen) * 2 - 1
    masks = [_mask(refs, p, Tq, Tk) for p in params]
    allowed = torch.stack([masks[0 if len(masks) == 1 else i] for i in range(B)])  # [B, Tq, Tk]

    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    G = Hq // Hkv
    kr, vr = kd.repeat_interleave(G, dim=2), vd.repeat_interleave(G, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qd, kr) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Tq]
    o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), vr)
    (o * dout.double()).sum().backward()

    for key, t in [("q", q), ("k", k), ("v", v), ("dout", dout), ("o", o), ("lse", lse),
                   ("dq", qd.grad), ("dk", kd.grad), ("dv", vd.grad)]:
        w.add(f"{name}.{key}", t.detach())
    w.add(f"{name}.scale", torch.tensor([scale], dtype=torch.float64))
    w.add(f"{name}.masks", torch.tensor(params, dtype=torch.int32))
    w.add(f"{name}.allowed", allowed.to(torch.int32))


def build(w):
    refs = _import_refs()
    gen = torch.Generator().manual_seed(20240611)
    # (name, B, Tq, Tk, Hq, Hkv, D, [(kind, b, pad_left, P, L1, q_offset), ...])
    cases = [
        ("causal", 2, 9, 9, 6, 2, 12, [(CAUSAL, 1, 2, 0, 0, 0), (CAUSAL, 1, 0, 0, 0, 0)]),
        ("block", 2, 13, 13, 4, 1, 12, [(BLOCK, 4, 2, 5, 0, 0), (BLOCK, 3, 0, 7, 0, 0)]),
        ("decode", 2, 4, 15, 3, 3, 8, [(BLOCK, 4, 2, 5, 0, 11), (BLOCK, 4, 0, 3, 0, 11)]),
        # Training rows of one batch share L0 = 7 and L1 = 6 (N = 19); P 5 is not a multiple of b.
        ("training", 2, 19, 19, 6, 2, 10, [(TRAINING, 4, 2, 5, 6, 0), (TRAINING, 4, 0, 7, 6, 0)]),
        # One descriptor shared by both rows; b = 3, L1 = 7 ends with a partial block.
        ("training_b3", 2, 21, 21, 2, 2, 16, [(TRAINING, 3, 3, 4, 7, 0)]),
    ]
    for name, B, Tq, Tk, Hq, Hkv, D, params in cases:
        _case(w, refs, name, gen, B, Tq, Tk, Hq, Hkv, D, params)
    w.add("num_cases", torch.tensor([len(cases)], dtype=torch.int32))
