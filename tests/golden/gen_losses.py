"""gen_losses.py -- PyTorch references (float64) for the loss and optimizer ops: log-softmax, weighted
cross-entropy with ignore_index, the KL family (the functions of the shared bench's opd_ref.py), AdamW
(torch.optim.AdamW) and clip_grad_norm_. Inputs are float32 values; references are computed on them
in float64, gradients by autograd for a fixed random upstream gradient.
"""
import math

import torch
import torch.nn.functional as F

from golden_io import import_shared_refs  # noqa: E402


def _opd_ref():
    return import_shared_refs()[0]  # shared/bench/opd_ref.py, the independent oracle


def _restricted_reverse_kl(t_logp, s_logp):
    """KL(u || t) over the teacher's support only: opdlm's documented rule for teacher zeros (the
    true reverse KL is +inf there, and opd_ref.reverse_kl returns inf with NaN gradients)."""
    zero = t_logp == float("-inf")
    ts = torch.where(zero, torch.zeros_like(t_logp), t_logp)
    return torch.where(zero, torch.zeros_like(s_logp), s_logp.exp() * (s_logp - ts)).sum(-1)


def _teacher(g, n, V, holes):
    """Peaked teacher log-probs [n, V] (float32 values); with `holes`, row 1 gets every third token
    and row 3 all but four tokens at probability 0 (-inf)."""
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 2.5
    if holes:
        z[1, ::3] = float("-inf")
        z[3, 4:] = float("-inf")
    return F.log_softmax(z, dim=-1).float()


def _add_divergence(w, name, fn, t_logp, s_logits, dloss):
    s = s_logits.double().requires_grad_()
    D = fn(t_logp.double(), F.log_softmax(s, dim=-1))
    (D * dloss.double()).sum().backward()
    assert torch.isfinite(D).all() and torch.isfinite(s.grad).all(), name
    w.add(f"kl.{name}.teacher", t_logp)
    w.add(f"kl.{name}.student", s_logits)
    w.add(f"kl.{name}.dloss", dloss)
    w.add(f"kl.{name}.D", D.detach())
    w.add(f"kl.{name}.dstudent", s.grad)


def build(w):
    ref = _opd_ref()
    g = torch.Generator().manual_seed(20240611)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).float()

    # ---- log-softmax ---------------------------------------------------------------------------
    x, dy = randn(5, 37, scale=3.0), randn(5, 37)
    xr = x.double().requires_grad_()
    y = F.log_softmax(xr, dim=-1)
    y.backward(dy.double())
    w.add("softmax.x", x)
    w.add("softmax.dy", dy)
    w.add("softmax.y", y.detach())
    w.add("softmax.dx", xr.grad)

    # ---- cross-entropy: per-row weights, two ignored rows ----------------------------------------
    n, V = 9, 23
    z, dl = randn(n, V, scale=2.0), randn(n)
    tgt = torch.randint(0, V, (n,), generator=g)
    tgt[2] = tgt[6] = -100
    wt = (torch.rand(n, generator=g, dtype=torch.float64) * 2.0 + 0.1).float()
    zr = z.double().requires_grad_()
    loss = F.cross_entropy(zr, tgt, reduction="none", ignore_index=-100) * wt.double()
    loss.backward(dl.double())
    assert (zr.grad[2] == 0).all() and loss[6] == 0
    w.add("ce.logits", z)
    w.add("ce.targets", tgt.to(torch.int32))
    w.add("ce.weight", wt)
    w.add("ce.dloss", dl)
    w.add("ce.loss", loss.detach())
    w.add("ce.dlogits", zr.grad)

    # ---- KL family (B 6.1): teacher log-probs (some with -inf holes), student logits ------------
    n, V = 6, 50
    t_holes, t_full = _teacher(g, n, V, True), _teacher(g, n, V, False)
    s, dl = randn(n, V, scale=2.0), randn(n)
    # The restricted reverse KL agrees with opd_ref wherever the teacher has no holes.
    assert torch.allclose(_restricted_reverse_kl(t_full.double(), F.log_softmax(s.double(), -1)),
                          ref.reverse_kl(t_full.double(), F.log_softmax(s.double(), -1)), rtol=0, atol=1e-14)
    cases = [
        ("fkl", ref.forward_kl, t_holes),
        ("rkl", ref.reverse_kl, t_full),
        ("rkl_holes", _restricted_reverse_kl, t_holes),
        ("mix03", lambda t, u: ref.mixture(t, u, 0.3), t_full),
        ("mix03_holes", lambda t, u: 0.7 * ref.forward_kl(t, u) + 0.3 * _restricted_reverse_kl(t, u), t_holes),
        ("jsd05", lambda t, u: ref.jsd(t, u, 0.5), t_holes),
        ("jsd02", lambda t, u: ref.jsd(t, u, 0.2), t_holes),
        ("topk1", lambda t, u: ref.topk_forward_kl(t, u, 1), t_holes),
        ("topk5", lambda t, u: ref.topk_forward_kl(t, u, 5), t_holes),
        ("topkV", lambda t, u: ref.topk_forward_kl(t, u, V), t_holes),
    ]
    for name, fn, t in cases:
        _add_divergence(w, name, fn, t, s, dl)
    # A larger vocabulary for the top-K selection (K = 16 as in the 4B/8B paper runs).
    n2, V2 = 4, 300
    _add_divergence(w, "topk16_v300", lambda t, u: ref.topk_forward_kl(t, u, 16), _teacher(g, n2, V2, True),
                    randn(n2, V2, scale=2.0), randn(n2))

    # ---- AdamW: 5 steps, lr 1e-3, weight_decay 0.1; one row of tiny grads so eps matters ---------
    p0 = randn(4, 9)
    grads = randn(5, 4, 9) * torch.logspace(-2, 1, 9).float()
    grads[:, 0, :] *= 1e-7
    P = torch.nn.Parameter(p0.double().clone())
    opt = torch.optim.AdamW([P], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    w.add("adamw.param0", p0)
    w.add("adamw.grads", grads)
    for k in range(5):
        P.grad = grads[k].double().clone()
        opt.step()
        w.add(f"adamw.param{k + 1}", P.detach().clone())
    w.add("adamw.m", opt.state[P]["exp_avg"])
    w.add("adamw.v", opt.state[P]["exp_avg_sq"])

    # ---- clip_grad_norm_ (max_norm 1.0; the total norm is about 5, so it clips) ----------------
    gs = [randn(3, 4), randn(7), randn(2, 2, 2)]
    ps = [torch.nn.Parameter(torch.zeros(t.shape, dtype=torch.float64)) for t in gs]
    for p, t in zip(ps, gs):
        p.grad = t.double().clone()
    norm = torch.nn.utils.clip_grad_norm_(ps, max_norm=1.0)
    assert norm > 1.0
    w.add("clip.norm", torch.tensor([float(norm)], dtype=torch.float64))
    for i, (p, t) in enumerate(zip(ps, gs)):
        w.add(f"clip.grad{i}", t)
        w.add(f"clip.out{i}", p.grad)
    assert math.isfinite(float(norm))
