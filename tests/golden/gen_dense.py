"""gen_dense.py -- PyTorch references for the dense CPU ops (matmul/linear, embedding, RMSNorm, RoPE,
SwiGLU), read by tests/parity/test_dense_parity.cpp.

Inputs are float32 from a seeded torch.Generator; references (forward and autograd gradients for a
fixed random upstream gradient) are computed in float64 from those same float32 values. RMSNorm and
RoPE come from the shared references (torch_qwen3_ref.RMSNorm, opd_ref.rope_from_pos +
torch_qwen3_ref.apply_rope), found by golden_io.import_shared_refs.
"""

import torch
import torch.nn.functional as F

from golden_io import import_shared_refs  # noqa: E402


def _shared_bench():
    opd_ref, torch_qwen3_ref = import_shared_refs()
    return torch_qwen3_ref, opd_ref


def _grads(out, dy, *leaves):
    """Autograd gradients of <out, dy> w.r.t. leaves (float64)."""
    return torch.autograd.grad(out, leaves, grad_outputs=dy)


def _f32(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).contiguous()


def _leaf(t):
    return t.double().requires_grad_(True)


def add_linear(w, gen):
    n, fin, fout = 37, 64, 48
    x, wt, dy = _f32(gen, n, fin), _f32(gen, fout, fin, scale=0.1), _f32(gen, n, fout)
    xl, wl = _leaf(x), _leaf(wt)
    y = F.linear(xl, wl)
    dx, dw = _grads(y, dy.double(), xl, wl)
    for k, v in dict(x=x, w=wt, dy=dy, y=y, dx=dx, dw=dw).items():
        w.add("linear." + k, v)
    # Batched matmul with both operands transposed and a broadcast 2-D right operand.
    a, b3, b2 = _f32(gen, 3, 24, 17), _f32(gen, 3, 19, 24), _f32(gen, 19, 24)
    w.add("matmul.a", a)
    w.add("matmul.b3", b3)
    w.add("matmul.b2", b2)
    w.add("matmul.c3", torch.matmul(a.double().transpose(1, 2), b3.double().transpose(1, 2)))
    w.add("matmul.c2", torch.matmul(a.double().transpose(1, 2), b2.double().t()))


def add_embedding(w, gen):
    V, D, n = 50, 32, 40
    table = _f32(gen, V, D)
    ids = torch.randint(0, V, (n,), generator=gen)
    ids[5:12] = ids[0]  # guaranteed repeats
    dy = _f32(gen, n, D)
    tl = _leaf(table)
    out = F.embedding(ids, tl)
    (dtable,) = _grads(out, dy.double(), tl)
    for k, v in dict(table=table, ids=ids, dy=dy, out=out, dtable=dtable).items():
        w.add("embedding." + k, v)


def add_rmsnorm(w, gen, qwen):
    eps = 1e-6
    # Hidden-state norm [rows, D] with very different row scales, and a per-head q-norm case
    # [tokens, heads, head_dim] viewed as [tokens*heads, head_dim].
    cases = {"hidden": (_f32(gen, 24, 64) * torch.logspace(-2, 2, 24)[:, None].float(), 64),
             "qnorm": (_f32(gen, 10, 3, 16).view(30, 16), 16)}
    for name, (x, d) in cases.items():
        x = x.contiguous()
        wt = (1.0 + 0.1 * torch.randn(d, generator=gen)).float()
        dy = _f32(gen, *x.shape)
        norm = qwen.RMSNorm(d, eps).double()
        with torch.no_grad():
            norm.weight.copy_(wt.double())
        xl = _leaf(x)
        y = norm(xl)
        dx, dw = _grads(y, dy.double(), xl, norm.weight)
        rstd = torch.rsqrt(xl.detach().pow(2).mean(-1) + eps)
        p = f"rmsnorm.{name}."
        for k, v in dict(x=x, w=wt, dy=dy, y=y, rstd=rstd, dx=dx, dw=dw).items():
            w.add(p + k, v)
        w.add(p + "eps", torch.tensor([eps], dtype=torch.float64))


def add_rope(w, gen, qwen, opd):
    # Training-row positions (pad -> 1, prompt 0..P-1, x0 and xt sharing P..P+L1-1), odd head count,
    # both thetas; plus large positions where angle precision matters.
    pos_train = opd.position_ids(3, 4, pad_left=1)           # [1,0,1,2,3,4,5,6,3,4,5,6]
    cases = {"train_1e6": (pos_train, 1e6, 3, 32),
             "train_1e4": (pos_train, 1e4, 3, 32),
             "far_1e6": (pos_train * 997 + 20000, 1e6, 5, 64)}
    for name, (pos, theta, heads, hd) in cases.items():
        T = pos.shape[0]
        x, dy = _f32(gen, T, heads, hd), _f32(gen, T, heads, hd)
        cos, sin = opd.rope_from_pos(pos, hd, theta, torch.float64)    # [T, hd]
        xl = _leaf(x)
        y = qwen.apply_rope(xl.transpose(0, 1), cos, sin).transpose(0, 1)  # apply_rope wants [.., T, hd]
        (dx,) = _grads(y, dy.double(), xl)
        p = f"rope.{name}."
        for k, v in dict(x=x, pos=pos, dy=dy, y=y, dx=dx).items():
            w.add(p + k, v)
        w.add(p + "theta", torch.tensor([theta], dtype=torch.float64))


def add_swiglu(w, gen):
    rows, f = 20, 96
    gate, up, dh = _f32(gen, rows, f, scale=4.0), _f32(gen, rows, f), _f32(gen, rows, f)
    gl, ul = _leaf(gate), _leaf(up)
    h = F.silu(gl) * ul
    dg, du = _grads(h, dh.double(), gl, ul)
    for k, v in dict(gate=gate, up=up, dh=dh, h=h, dgate=dg, dup=du).items():
        w.add("swiglu." + k, v)


def build(w):
    qwen, opd = _shared_bench()
    gen = torch.Generator().manual_seed(20240611)
    add_linear(w, gen)
    add_embedding(w, gen)
    add_rmsnorm(w, gen, qwen)
    add_rope(w, gen, qwen, opd)
    add_swiglu(w, gen)
